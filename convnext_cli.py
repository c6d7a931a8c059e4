"""`convnext`: one console script that fronts each package's own CLI (`python -m <package>`)."""
from __future__ import annotations

import importlib
import sys

from convnext_common import exit_status, run_from_front, version_text

COMMANDS = {  # command: (module, how that module's CLI is run without the front, help)
    "model": ("model.__main__", "python -m model", "model info: params, FLOPs and the paper table"),
    "train": ("training.__main__", "python -m training",
              "train or fine-tune (presets from the paper's Tables 5/6, or the offline demo)"),
    "export": ("export.__main__", "python -m export", "checkpoint -> verified ONNX / TensorRT in the model repository"),
    "serve": ("service.__main__", "python -m service",
              "serve the model repository over HTTP (/classify, KServe v2, /metrics); "
              "--pretrained NAME or --checkpoint PATH: download/export it first"),
    "doctor": ("service.doctor", "python -m service doctor",
               "GPU host check: driver, CUDA, cuDNN, TensorRT, ONNX Runtime providers, a tiny engine"),
    "bench": ("bench.__main__", "python -m bench",
              "benchmarks: engines, end-to-end HTTP, GELU vs ReLU, ConvNeXt-T vs ResNet-50"),
}
# `convnext serve --pretrained NAME | --checkpoint PATH` needs torch (download + export); plain `serve` never does.
SERVE_WITH_EXPORT = ("--pretrained", "--checkpoint")


def usage() -> str:
    lines = ["usage: convnext [--version] <command> [args...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def command_module(argv: list[str]) -> str:
    if argv[0] == "serve" and any(arg.split("=")[0] in SERVE_WITH_EXPORT for arg in argv[1:]):
        return "convnext_serve"
    return COMMANDS[argv[0]][0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(version_text())
        return 0
    if argv[0] not in COMMANDS:
        print(f"convnext: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)} "
              "(see convnext --help)", file=sys.stderr)
        return 2
    run_from_front(f"convnext {argv[0]}", COMMANDS[argv[0]][1])  # its errors then name `convnext <command>`
    try:
        module = importlib.import_module(command_module(argv))
    except ImportError as error:  # e.g. the serving image has no torch: no training, export or --pretrained there
        print(f"convnext {argv[0]}: error: {error}; install the extra it needs, e.g. "
              "pip install 'convnext-serve[train,export]'", file=sys.stderr)
        return 1
    return exit_status(lambda: module.main(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main())
