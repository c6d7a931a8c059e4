"""The ONNX Runtime steps of scripts/gpu_check.sh, kept out of the shell so that a CPU test runs the very same code:
a model version's ONNX variants on a GPU provider held to the export's parity thresholds against CPU fp32 (the
ort-cuda step), and the file of one variant (the bench step).

    python scripts/gpu_check_onnx.py parity REPOSITORY MODEL [--provider cuda] [--precisions fp32 fp16]
    python scripts/gpu_check_onnx.py path REPOSITORY MODEL PRECISION
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convnext_common import CliParser, exit_on_expected_errors, exit_status
from runtime.ort_session import PROVIDERS, ProviderError, create_session, cuda_provider_options
from runtime.repository import ModelRepository, ModelVersion, Parity, RepositoryError
from runtime.verify import ParityError, default_image_paths, in_chunks, verification_inputs, verify_outputs

PROG = "scripts/gpu_check_onnx.py"
REFERENCE = "onnxruntime CPU fp32"
# ONNX Runtime has no bfloat16 Conv kernel (export/bf16.py): the bf16 variant runs on TensorRT only.
ORT_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class ProviderParity:
    """One variant on the provider: its parity against CPU fp32, and why it is outside the thresholds (or "")."""

    precision: str
    parity: Parity | None
    problem: str = ""


def onnx_path(version: ModelVersion, precision: str) -> Path:
    """The version's ONNX file of `precision`; ValueError naming the precisions it has when there is none."""
    artifact = version.manifest.find("onnx", precision)
    if artifact is None:
        have = [a.precision for a in version.manifest.artifacts if a.format == "onnx"]
        raise ValueError(f"{version.manifest.name}/{version.manifest.version} has no {precision} ONNX (it has {have}): "
                         f"export it with --precisions fp32,{precision}")
    return version.artifact_path(artifact)


def provider_logits(path: Path, provider: str, batch: np.ndarray) -> np.ndarray:
    """`batch`'s logits from a session on `provider` with the service's CUDA options (TF32 off); ProviderError when
    ONNX Runtime put the session on another provider (create_session checks session.get_providers())."""
    session = create_session(path, provider, provider_options={"cuda": cuda_provider_options()})
    feed = session.get_inputs()[0]
    dtype = np.float16 if feed.type == "tensor(float16)" else np.float32  # the fp16 export keeps fp32 I/O; in case
    return in_chunks(lambda chunk: session.run(None, {feed.name: chunk.astype(dtype)})[0].astype(np.float32), batch)


def provider_parity(repository: str | Path, model: str, provider: str,
                    precisions: Sequence[str] = ORT_PRECISIONS) -> list[ProviderParity]:
    """The newest version of `model`: each of `precisions` on `provider` against the fp32 variant on CPU, over the
    export's verification inputs (seeded random + the real photos), judged by the export's thresholds."""
    version = ModelRepository(repository).load(model)
    inputs = verification_inputs(version.manifest.preprocess, default_image_paths())
    reference = provider_logits(onnx_path(version, "fp32"), "cpu", inputs.batch)
    results = []
    for precision in precisions:
        output = provider_logits(onnx_path(version, precision), provider, inputs.batch)
        try:
            parity = verify_outputs(reference, output, inputs, precision, REFERENCE,
                                    f"ONNX Runtime {PROVIDERS[provider]}")
            results.append(ProviderParity(precision, parity))
        except ParityError as err:  # the other precisions are still worth knowing
            results.append(ProviderParity(precision, None, str(err)))
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    parity = commands.add_parser("parity", help="the variants on a provider vs CPU fp32 (exit 1 outside thresholds)")
    parity.add_argument("repository", type=Path)
    parity.add_argument("model")
    parity.add_argument("--provider", choices=sorted(PROVIDERS), default="cuda")
    parity.add_argument("--precisions", nargs="+", choices=ORT_PRECISIONS, default=list(ORT_PRECISIONS))
    path = commands.add_parser("path", help="print the newest version's ONNX file of a precision")
    path.add_argument("repository", type=Path)
    path.add_argument("model")
    path.add_argument("precision")
    return parser


@exit_on_expected_errors(PROG, (ParityError, ProviderError, RepositoryError, ValueError, OSError))
def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.command == "path":
        print(onnx_path(ModelRepository(args.repository).load(args.model), args.precision))
        return 0
    results = provider_parity(args.repository, args.model, args.provider, args.precisions)
    for result in results:
        if result.parity is None:
            print(f"{PROVIDERS[args.provider]} {result.precision}: {result.problem}")
        else:
            print(f"{PROVIDERS[args.provider]} {result.precision}: max|diff| {result.parity.max_abs_diff:.3g}, top-1 "
                  f"agreement {result.parity.top1_agreement:.3f} on {result.parity.num_inputs} inputs vs {REFERENCE}, "
                  f"the session on {PROVIDERS[args.provider]}")
    return 1 if any(r.parity is None for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
