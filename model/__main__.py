"""`python -m model`: params and GMACs of a model (`info`), every model against the paper (`table`), pretrained list."""
from __future__ import annotations

import argparse
import sys

from convnext_common import CliParser, add_version_argument, exit_on_expected_errors

from .flops import measure, relative_error
from .pretrained import (
    OFFICIAL_BASE_URL, PRETRAINED_CHECKPOINTS, DownloadError, default_cache_dir, download_pretrained,
)
from .registry import ACTIVATIONS, get_config, list_models


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m model", description=__doc__)
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="params (M) and GMACs of one model, or of all with --all")
    info.add_argument("name", nargs="?", choices=list_models(), metavar="NAME", help="a model name (see `table`)")
    info.add_argument("--input-size", type=int, default=None, help="square input side in px (default: the model's)")
    info.add_argument("--activation", choices=ACTIVATIONS, default=None, help="default: the model's own")
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--all", action="store_true", help="the table of every model against the paper")
    commands.add_parser("table", help="every model: params and GMACs against the paper's tables")
    commands.add_parser("pretrained", help="the official pretrained checkpoints")
    download = commands.add_parser("download", help="download (or verify the cached copy of) an official checkpoint")
    download.add_argument("name", choices=sorted(PRETRAINED_CHECKPOINTS), metavar="NAME")
    download.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()} ($CONVNEXT_CACHE_DIR)")
    download.add_argument("--mirror", default=OFFICIAL_BASE_URL, help="base URL holding the official file names")
    download.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def format_info(name: str, input_size_px: int | None, activation: str | None, num_classes: int) -> str:
    cost = measure(name, input_size_px, activation=activation, num_classes=num_classes)
    activation = activation or get_config(name).default_activation
    return (f"{name} ({activation}, {num_classes} classes) at {cost.input_size_px}x{cost.input_size_px}: "
            f"{cost.params_m:.2f} M params, {cost.gmacs:.2f} GMACs")


def format_table() -> str:
    """Markdown: every registered model, and the paper's figures (Tables 1, 2, 9) where it reports them."""
    lines = [
        "| model | input | params (M) | paper params (M) | GMACs | paper GFLOPs | GMACs vs paper | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in list_models():
        cfg = get_config(name)
        figures = cfg.paper_figures() or (None,)
        for paper in figures:
            size = paper.input_size_px if paper else cfg.data.input_size
            cost = measure(name, size)
            if paper:
                lines.append(
                    f"| {name} | {size} | {cost.params_m:.2f} | {paper.params_m:g} | {cost.gmacs:.2f} | "
                    f"{paper.gflops:g} | {relative_error(cost.gmacs, paper.gflops):+.1%} | {paper.source} |"
                )
            else:
                lines.append(f"| {name} | {size} | {cost.params_m:.2f} | - | {cost.gmacs:.2f} | - | - | - |")
    return "\n".join(lines)


def format_pretrained() -> str:
    lines = ["| name | model | input | dataset | top-1 (%) | URL |", "|---|---|---|---|---|---|"]
    for entry in PRETRAINED_CHECKPOINTS.values():
        top1 = f"{entry.top1:.1f}" if entry.top1 is not None else "- (21841 classes)"
        lines.append(f"| {entry.name} | {entry.model_name} | {entry.input_size_px} | {entry.dataset} | {top1} | "
                     f"{entry.url} |")
    return "\n".join(lines)


@exit_on_expected_errors("python -m model", (DownloadError, ValueError, OSError))
def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.command == "table" or (args.command == "info" and args.all):
        print(format_table())
    elif args.command == "info":
        if args.name is None:
            parser.error("info needs a model NAME, or --all")
        print(format_info(args.name, args.input_size, args.activation, args.num_classes))
    elif args.command == "pretrained":
        print(format_pretrained())
    else:
        print(download_pretrained(args.name, args.cache_dir, base_url=args.mirror, progress=not args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
