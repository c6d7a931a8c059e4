"""Export a model with fp32/fp16/int8 ONNX and print ONNX Runtime CPU latency per variant and parity figures."""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from bench.host import host_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--checkpoint")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT default)")
    args = parser.parse_args()

    import onnxruntime as ort

    from export.onnx import export_onnx_version

    threads = f"{args.threads} intra-op threads" if args.threads else "ONNX Runtime's default intra-op threads"
    print(f"{host_description()}; {threads}, batch {args.batch}, {args.runs} timed runs", flush=True)

    with tempfile.TemporaryDirectory() as root:
        version = export_onnx_version(root, "speed", args.model, args.checkpoint, precisions=("fp32", "fp16", "int8"))
        size = version.manifest.input.height
        x = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
        baseline = None
        for artifact in version.manifest.artifacts:
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(version.artifact_path(artifact)), options,
                                           providers=["CPUExecutionProvider"])
            for _ in range(3):
                session.run(None, {"input": x})
            start = time.perf_counter()
            for _ in range(args.runs):
                session.run(None, {"input": x})
            ms = (time.perf_counter() - start) / args.runs * 1e3
            baseline = baseline or ms
            p = artifact.parity
            print(f"{artifact.precision:5s} {artifact.size_bytes / 2**20:6.1f} MiB  {ms:8.1f} ms/batch{args.batch}  "
                  f"speed-up x{baseline / ms:4.2f}  vs {p.reference}: max|diff| {p.max_abs_diff:.3g} "
                  f"top-1 {p.top1_agreement:.3f} top-5 {p.top5_agreement:.3f} ({p.num_real_images} real)")


if __name__ == "__main__":
    main()
