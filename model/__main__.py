"""`python -m model`: params and GMACs of a model (`info`), every model against the paper (`table`), the
modernization roadmap against Tables 10/11 (`roadmap`), the pretrained list."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from convnext_common import CliParser, add_version_argument, exit_on_expected_errors, exit_status, positive_int

from .flops import check_input_size, measure, relative_error
from .pretrained import (
    OFFICIAL_BASE_URL,
    PRETRAINED_CHECKPOINTS,
    DownloadError,
    default_cache_dir,
    download_pretrained,
)
from .registry import ACTIVATIONS, MODEL_CONFIGS, get_config, list_models
from .roadmap_steps import REGIMES, Step, steps_of

MACS_CONVENTION = (
    "GMACs: multiply-accumulates of conv and linear layers, one image at 224x224 (PyTorch FlopCounterMode / 2), the "
    "convention of the paper's GFLOPs (fvcore); norms, activations and adds are not counted. A row matches when "
    "within 1% of the paper; a row that cannot match says why."
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m model", description=__doc__)
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="params (M) and GMACs of one model, or of all with --all")
    info.add_argument("name", nargs="?", choices=list_models(), metavar="NAME",
                      help="a model name (see `table`, and `roadmap` for the roadmap steps)")
    info.add_argument("--input-size", type=positive_px, default=None,
                      help="square input side in px, at least the model's total stride (default: the model's own)")
    info.add_argument("--activation", choices=ACTIVATIONS, default=None, help="default: the model's own")
    info.add_argument("--num-classes", type=positive_int, default=None, help="default: 1000")
    info.add_argument("--all", action="store_true", help="the table of every model against the paper (each at its "
                                                         "own size and activation, 1000 classes: no NAME or option)")
    commands.add_parser("table", help="every model family: params and GMACs against the paper's tables")
    roadmap = commands.add_parser("roadmap", help="each step from ResNet to ConvNeXt: GMACs and top-1 vs Table 10/11")
    roadmap.add_argument("--regime", choices=sorted(REGIMES), default="r50",
                         help="r50: Table 10, ResNet-50 -> ConvNeXt-T; r200: Table 11, ResNet-200 -> ConvNeXt-B")
    roadmap.add_argument("--json", action="store_true", help="one JSON document instead of the Markdown table")
    commands.add_parser("pretrained", help="the official pretrained checkpoints")
    download = commands.add_parser(
        "download", help="download (or verify the cached copy of) an official checkpoint",
        description="Upstream publishes no sha256 for its checkpoints, so the first download is trusted (HTTPS from "
                    "the official host, or your --mirror) once it is a torch.save file; its hash and URL are recorded "
                    "beside the file, and the cached copy is used again only for the same URL, checked against its "
                    "hash.")
    download.add_argument("name", choices=sorted(PRETRAINED_CHECKPOINTS), metavar="NAME")
    download.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()} ($CONVNEXT_CACHE_DIR)")
    download.add_argument("--mirror", default=OFFICIAL_BASE_URL, help="base URL holding the official file names")
    download.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser


def positive_px(text: str) -> int:
    """argparse type of a size in px: a positive whole number."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of px, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of px, got {value}")
    return value


def format_info(name: str, input_size_px: int | None, activation: str | None, num_classes: int) -> str:
    cost = measure(name, input_size_px, activation=activation, num_classes=num_classes)
    activation = activation or get_config(name).default_activation
    return (f"{name} ({activation}, {num_classes} classes) at {cost.input_size_px}x{cost.input_size_px}: "
            f"{cost.params_m:.2f} M params, {cost.gmacs:.2f} GMACs")


def format_table() -> str:
    """Markdown: every model family, and the paper's figures (Tables 1, 2, 9); the roadmap steps: `roadmap`."""
    lines = [
        "| model | input | params (M) | paper params (M) | GMACs | paper GFLOPs | GMACs vs paper | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(MODEL_CONFIGS):
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


ROADMAP_PAPER_INPUT_PX = 224  # Tables 10 and 11: every step's GFLOPs at 224 px


def roadmap_rows(regime: str, keys: Sequence[str] | None = None,
                 input_size_px: int = ROADMAP_PAPER_INPUT_PX) -> list[dict]:
    """Each step of `regime` (or those in `keys`): our params and GMACs at `input_size_px` beside the paper's GFLOPs
    and top-1 (delta: vs the row it edits). The paper's GFLOPs are at 224 px: at another size the GMACs are not set
    against them (gmacs_vs_paper and matches_paper None)."""
    steps = steps_of(regime)
    by_key = {s.key: s for s in steps}
    rows = []
    for index, step in enumerate(steps):
        if keys is not None and step.key not in keys:
            continue
        cost = measure(step.model, input_size_px)
        parent: Step | None = by_key.get(step.parent) if step.parent else None
        error = relative_error(cost.gmacs, step.gflops) if input_size_px == ROADMAP_PAPER_INPUT_PX else None
        rows.append({
            "row": index, "key": step.key, "model": step.model, "label": step.label, "change": step.change,
            "recipe": step.recipe, "on_path": step.on_path, "parent": step.parent,
            "params_m": round(cost.params_m, 3), "input_size_px": input_size_px, "gmacs": round(cost.gmacs, 4),
            "paper_gflops": step.gflops, "gmacs_vs_paper": None if error is None else round(error, 5),
            "matches_paper": None if error is None else abs(error) <= 0.01, "gflops_note": step.gflops_note,
            "top1": step.top1, "top1_std": step.top1_std,
            "delta_top1": None if parent is None else round(step.top1 - parent.top1, 2),
            "delta_vs": None if parent is None else parent.label,
        })
    return rows


def format_roadmap(regime: str, rows: list[dict]) -> str:
    """Markdown: the roadmap table, then the convention, then every row that cannot match the paper and why."""
    lines = [f"Modernization roadmap, {REGIMES[regime]} of Liu et al. 2022 (arXiv 2201.03545, Appendix C); "
             "top-1: ImageNet-1K, the paper's (mean +/- std of 3 seeds where it gives one), not measured here.", "",
             "| # | step | model | params (M) | GMACs | paper GFLOPs | GMACs vs paper | paper top-1 | delta top-1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    steps = steps_of(regime)  # rows may be a selection: the step above a row is found by its row number
    for r in rows:
        std = f" +/- {r['top1_std']:.2f}" if r["top1_std"] is not None else ""
        delta = "-" if r["delta_top1"] is None else f"{r['delta_top1']:+.2f}"
        if r["delta_vs"] is not None and r["row"] > 0 and steps[r["row"] - 1].key != r["parent"]:
            delta += f" (vs {r['delta_vs']})"
        mark = "" if r["matches_paper"] in (True, None) else " (see note)" if r["gflops_note"] else " (MISMATCH)"
        # Rows counted at a size other than the paper's 224 are set against none of its figures.
        vs_paper = "-" if r["gmacs_vs_paper"] is None else f"{r['gmacs_vs_paper']:+.1%}"
        label = r["label"] if r["on_path"] else f"{r['label']} (not kept)"
        lines.append(f"| {r['row']} | {label} | {r['model']} | {r['params_m']:.2f} | {r['gmacs']:.2f} | "
                     f"{r['paper_gflops']:.2f} | {vs_paper}{mark} | {r['top1']:.2f}{std} | {delta} |")
    lines += ["", MACS_CONVENTION]
    lines += [f"Note on '{r['label']}': {r['gflops_note']}" for r in rows if r["gflops_note"]]
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
    if args.command == "info" and args.all:
        given = [flag for flag, value in (("NAME", args.name), ("--input-size", args.input_size),
                                          ("--activation", args.activation), ("--num-classes", args.num_classes))
                 if value is not None]
        if given:
            parser.error(f"--all prints every model at its own size and activation with 1000 classes: drop "
                         f"{' and '.join(given)}, or --all")
    if args.command == "table" or (args.command == "info" and args.all):
        print(format_table())
    elif args.command == "info":
        if args.name is None:
            parser.error("info needs a model NAME, or --all")
        if args.input_size is not None:
            try:
                check_input_size(args.name, args.input_size)
            except ValueError as error:
                parser.error(f"argument --input-size: {error}")
        print(format_info(args.name, args.input_size, args.activation, args.num_classes or 1000))
    elif args.command == "roadmap":
        rows = roadmap_rows(args.regime)
        if args.json:
            print(json.dumps({"regime": args.regime, "source": REGIMES[args.regime], "convention": MACS_CONVENTION,
                              "rows": rows}, indent=2))
        else:
            print(format_roadmap(args.regime, rows))
    elif args.command == "pretrained":
        print(format_pretrained())
    else:
        print(download_pretrained(args.name, args.cache_dir, base_url=args.mirror, progress=not args.quiet))
    return 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
