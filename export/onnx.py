"""Model (random init, official/timm/torchvision or project checkpoint) -> verified ONNX in a repository version.

What is exported (the model and its manifest metadata) comes from export/source.py; this module writes the ONNX files,
verifies them and publishes the version.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from convnext_common import project_version
from runtime.repository import (
    Artifact,
    InputSpec,
    Manifest,
    ModelRepository,
    ModelVersion,
    RepositoryError,
    StagedVersion,
    describe_file,
    now_utc,
)
from runtime.verify import (
    VerificationInputs,
    default_image_paths,
    image_paths_in,
    in_chunks,
    run_onnxruntime,
    verification_inputs,
    verify_outputs,
)

from .quantize import make_variant
from .source import RANDOM_INIT_SEED, ExportError, ExportSource, load_source

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 17
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ONNX_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "bf16": "model.bf16.onnx", "int8": "model.int8.onnx"}
# The example batch used for tracing; 2, not 1, so torch.export does not specialise the batch axis to 1.
TRACE_BATCH = 2
MAX_BATCH = 4096


class InterruptedAfterPublishing(KeyboardInterrupt):
    """Ctrl-C after the version was renamed into place (while the rename was synced, or an overwritten version
    removed): the version is published and complete."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def export_module_to_onnx(module, path: Path, in_chans: int, size_px: int, opset: int = DEFAULT_OPSET) -> None:
    """Export with the dynamo exporter: input "input" (batch, C, H, W) float32, output "logits", dynamic batch.

    The dynamo exporter (torch.export + onnxscript, with its graph optimizer: constant folding, no Identity
    nodes) gives a clean graph: one LayerNormalization per norm, no Dropout in eval mode.
    """
    import onnx
    import torch

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} < {MIN_OPSET}: LayerNormalization needs opset 17 or newer")
    example = torch.randn(TRACE_BATCH, in_chans, size_px, size_px)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.onnx.export(
            module, (example,), input_names=["input"], output_names=["logits"], opset_version=opset,
            dynamo=True, dynamic_shapes=({0: batch},), optimize=True, verbose=False,
        )
    program.save(str(path), external_data=False)
    model_proto = onnx.load(str(path))
    onnx.checker.check_model(model_proto, full_check=True)
    dim = model_proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        raise ExportError(f"the exported batch axis is static ({dim.dim_value}); expected a dynamic axis")
    written = default_opset(model_proto)
    if written != opset:  # torch keeps its own opset (18) when converting to the asked one fails, with a warning only
        raise ExportError(f"asked for opset {opset}, but the exporter wrote opset {written} (its conversion failed; "
                          "see the warning above): the manifest would misstate it; export with --opset "
                          f"{written or DEFAULT_OPSET}")


def default_opset(model_proto) -> int | None:
    """The opset of the default ONNX domain a model imports (what its ops are specified by)."""
    return next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), None)


def onnx_opset_of(path: Path) -> int | None:
    """The default-domain opset of the ONNX file at `path` (a variant may have moved up: bf16 to 22)."""
    import onnx

    return default_opset(onnx.load(str(path), load_external_data=False))


def pytorch_logits(module, batch: np.ndarray) -> np.ndarray:
    """The module's logits of `batch`, VERIFY_CHUNK inputs at a time (a big --verify-images folder stays in memory)."""
    import torch

    with torch.no_grad():
        return in_chunks(lambda chunk: module(torch.from_numpy(chunk)).numpy(), batch)


def export_onnx_version(repository_root: str | Path, name: str, model_name: str | None = None,
                        checkpoint: str | Path | None = None, *, version: int | None = None, overwrite: bool = False,
                        opset: int = DEFAULT_OPSET, precisions: Sequence[str] = ("fp32",),
                        num_classes: int | None = None, activation: str | None = None, input_size: int | None = None,
                        labels: Sequence[str] | None = None,
                        calibration_images: str | Path | Sequence[Path] | None = None,
                        verify_images: str | Path | Sequence[Path] | None = None, use_ema: bool = False,
                        dataset: str | None = None, timm_name: str | None = None,
                        init_seed: int = RANDOM_INIT_SEED) -> ModelVersion:
    """Build, export, verify (ONNX Runtime vs PyTorch) and write one repository version atomically.

    Without a checkpoint the weights are random, drawn from `init_seed`: the same call exports the same weights.

    Each stage logs one line as it starts (INFO on `export.onnx`): build, ONNX, parity, each extra precision.
    """
    precisions = tuple(dict.fromkeys(precisions))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or "fp32" not in precisions:
        raise ExportError(f"precisions {list(precisions)}: choose from {PRECISIONS}, fp32 included (the reference)")
    if version is not None and version < 1:  # new_version refuses it too, but only once the model is built
        raise ExportError(f"version {version}: versions are numbered from 1")
    # The folders are listed before the build (minutes): a wrong one fails at once.
    verify_paths = _image_paths(verify_images, "--verify-images")
    calibration_paths = _calibration_paths(calibration_images, verify_paths, precisions)
    stage = _StageLog(3 + len(precisions) - 1)
    stage(f"build {model_name or 'the checkpoint model'}"
          + (f" from {checkpoint}" if checkpoint else f" (random init, seed {init_seed})"))
    src = load_source(
        model_name, checkpoint, num_classes=num_classes, activation=activation, input_size=input_size, labels=labels,
        use_ema=use_ema, dataset=dataset, timm_name=timm_name, init_seed=init_seed,
    )
    inputs = verification_inputs(src.preprocess, verify_paths)
    if inputs.num_real_images == 0:
        logger.warning("no real images to verify with: parity is on seeded random inputs only")
    reference = pytorch_logits(src.module, inputs.batch)
    repository = ModelRepository(repository_root)
    staged = None
    try:
        with repository.new_version(name, version, overwrite=overwrite) as staged:
            _write_version(staged, src, opset, precisions, inputs, reference, calibration_paths, stage)
    except KeyboardInterrupt:  # it may come after the rename into place (syncing it, removing an overwritten version)
        published = _published(repository, staged)
        if published is not None:
            raise InterruptedAfterPublishing(published.path) from None
        raise
    # The files were hashed as they were described: re-reading them (seconds for a large model) checks nothing new.
    return ModelVersion(staged.manifest, repository.root / name / str(staged.version))


def _write_version(staged: StagedVersion, src: ExportSource, opset: int, precisions: tuple[str, ...],
                   inputs: VerificationInputs, reference: np.ndarray, calibration_paths: list[Path],
                   stage: Callable[[str], None]) -> None:
    """The staged version's files, each verified (fp32 against PyTorch's `reference`, the others against fp32), and
    its manifest."""
    fp32_path = staged.path / ONNX_FILES["fp32"]
    stage(f"ONNX: export {src.model_name} at {src.preprocess.crop_px} px, opset {opset}")
    export_module_to_onnx(src.module, fp32_path, src.in_chans, src.preprocess.crop_px, opset)
    stage(f"parity: ONNX Runtime fp32 vs PyTorch on {inputs.batch.shape[0]} inputs "
          f"({inputs.num_real_images} real photos)")
    onnx_logits = run_onnxruntime(fp32_path, inputs.batch)  # also the other precisions' reference
    parity = verify_outputs(reference, onnx_logits, inputs, "fp32", "pytorch-fp32", "ONNX fp32")
    artifacts = [describe_file(staged.path, ONNX_FILES["fp32"], format="onnx", precision="fp32", parity=parity,
                               onnx_opset=opset)]
    artifacts += _other_precisions(staged, src, precisions, inputs, onnx_logits, calibration_paths, stage)
    staged.manifest = Manifest(
        name=staged.name, version=staged.version, architecture=src.model_name, activation=src.activation,
        num_classes=src.num_classes, labels=src.labels, source=src.source,
        input=InputSpec(channels=src.in_chans, height=src.preprocess.crop_px, width=src.preprocess.crop_px),
        preprocess=src.preprocess, onnx_opset=opset, artifacts=tuple(artifacts), created_at=now_utc(),
        project_version=project_version(),
    )


def _published(repository: ModelRepository, staged: StagedVersion | None) -> ModelVersion | None:
    """The version `staged` once it is in place: its manifest, not the one an overwrite replaced (put back when the
    rename did not happen) nor another export's; None before the rename."""
    if staged is None or staged.manifest is None:
        return None
    try:
        on_disk = repository.load(staged.name, staged.version, verify_files=False)
    except (RepositoryError, OSError):
        return None
    return on_disk if on_disk.manifest == staged.manifest else None


def _other_precisions(staged: StagedVersion, src: ExportSource, precisions: tuple[str, ...],
                      inputs: VerificationInputs, onnx_reference: np.ndarray, calibration_paths: list[Path],
                      stage: Callable[[str], None]) -> list[Artifact]:
    """Convert the staged fp32 ONNX to each other precision and verify it against `onnx_reference`, ONNX Runtime
    fp32's logits of `inputs` (int8 calibrates on `calibration_paths`)."""
    fp32_path = staged.path / ONNX_FILES["fp32"]
    artifacts = []
    for precision in precisions:
        if precision == "fp32":
            continue
        stage(f"{precision}: convert and verify against ONNX fp32")
        parity = make_variant(
            precision, fp32_path, staged.path / ONNX_FILES[precision], onnx_reference, inputs, src.preprocess,
            calibration_paths,
        )
        path = staged.path / ONNX_FILES[precision]
        artifacts.append(describe_file(staged.path, ONNX_FILES[precision], format="onnx", precision=precision,
                                       parity=parity, onnx_opset=onnx_opset_of(path)))
    return artifacts


def _calibration_paths(calibration_images: str | Path | Sequence[Path] | None, verify_paths: list[Path],
                       precisions: tuple[str, ...]) -> list[Path]:
    """The photos int8 calibrates on (`calibration_images`, else the verification photos); none without int8, the
    only precision that calibrates."""
    if "int8" not in precisions:
        if calibration_images is not None:
            logger.warning("calibration images are not used: only int8 calibrates, and the precisions %s leave it out",
                           ",".join(precisions))
        return []
    return verify_paths if calibration_images is None else _image_paths(calibration_images, "--calibration-images")


def _image_paths(images: str | Path | Sequence[Path] | None, flag: str) -> list[Path]:
    """A folder (errors name `flag`) or a list of image files; None means the shipped sample photos when importable,
    else none."""
    if images is None:
        return default_image_paths()
    if isinstance(images, (str, Path)):
        return image_paths_in(images, flag)
    return [Path(p) for p in images]


class _StageLog:
    """One numbered log line per export stage, with the seconds spent so far (exports take minutes on a CPU)."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total, 0, time.monotonic()

    def __call__(self, text: str) -> None:
        self.done += 1
        logger.info("[%d/%d] %s (%.0f s so far)", self.done, self.total, text, time.monotonic() - self.started)
