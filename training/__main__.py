"""`python -m training --preset in1k|in22k|finetune|finetune_384|finetune_1k_384|demo [--config-field VALUE ...]`."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from convnext_common import CliParser, add_version_argument, exit_status, one_line, prog_name
from model import CheckpointError

from .config import PRESET_HELP, PRESETS, TrainConfig, resolve
from .engine import NonFiniteLossError
from .run import train

PROG = "python -m training"  # as the module runs; prog_name() gives it as the user ran it

FLAG_TYPES = {"int": int, "float": float, "str": str, "float | None": float}
FLAG_HELP = {  # what a flag does, where its name alone does not say it
    "activation": "gelu | relu; empty = the model's own (GELU for ConvNeXt, ReLU for ResNet-50 and the roadmap's "
                  "ReLU steps); recorded in the checkpoint, so the export builds the same",
    "log_every": "optimizer steps between log.jsonl records and, when stderr is not a terminal, progress lines "
                 "(images/s, ETA of the epoch and of the run)",
    "overwrite_checkpoints": "start a new run in an --output that holds an earlier run's checkpoints, removing "
                             "them and its config.json and log.jsonl at the start (without it, such a run is "
                             "refused: --resume continues it); not with --resume, nor a --finetune among them",
    "quiet": "no progress bar or progress lines (for scripts); epoch records and errors still print",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog=PROG,
        description="Train ConvNeXt / ResNet-50 with the paper's recipe. Flags left out keep the preset's values "
                    "(and the model's row of the official commands: drop path, warmup, EMA).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="presets:\n" + "\n".join(f"  {name:16s} {text}" for name, text in PRESET_HELP.items()),
    )
    add_version_argument(parser)
    parser.add_argument("--preset", default="in1k", choices=list(PRESETS),
                        help="one of: " + ", ".join(PRESETS) + " (see below)")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "preset":
            continue
        preset_value = f"(in1k preset: {getattr(PRESETS['in1k'], field.name)!r})"
        text = f"{FLAG_HELP[field.name]} {preset_value}" if field.name in FLAG_HELP else preset_value
        if field.type == "bool":
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(_flag(field.name), type=FLAG_TYPES[field.type], default=None, help=text)
    return parser


def main(argv=None) -> int:
    args = vars(get_args_parser().parse_args(argv))
    preset = args.pop("preset")
    overrides = {k: v for k, v in args.items() if v is not None}
    try:
        config = resolve(preset, overrides)
    except ValueError as error:
        print(f"{prog_name(PROG)}: error: {one_line(error)}", file=sys.stderr)
        return 2
    try:
        train(config)
    except NonFiniteLossError as error:  # the last good checkpoint is kept; the message names it
        print(f"{prog_name(PROG)}: error: {one_line(error)}", file=sys.stderr)
        return 1
    # --resume / --finetune with a missing, tampered or truncated file, or without the asked-for weights; a missing
    # --data-dir; a config the data cannot run
    except BrokenPipeError:  # the reader of stdout left: exit_status ends quietly
        raise
    except (CheckpointError, OSError, ValueError) as error:
        print(f"{prog_name(PROG)}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog_name(PROG)}: interrupted (resume with --resume <output>/checkpoint_last.pth)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
