"""`convnext`: one console script that fronts each package's own CLI (`python -m <package>`)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "model": ("model.__main__", "model info: params, FLOPs and the paper table"),
    "train": ("training.__main__", "train or fine-tune (presets from the paper's Tables 5/6, or the offline demo)"),
    "export": ("export.__main__", "checkpoint -> verified ONNX / TensorRT in the model repository"),
    "serve": ("service.__main__", "serve the model repository over HTTP (/classify, KServe v2, /metrics)"),
    "doctor": ("service.doctor", "GPU host check: driver, CUDA, cuDNN, TensorRT, ONNX Runtime providers, a tiny engine"),
    "bench": ("bench.__main__", "benchmarks: engines, end-to-end HTTP, GELU vs ReLU, ConvNeXt-T vs ResNet-50"),
}


def usage() -> str:
    lines = ["usage: convnext <command> [args...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"convnext: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
