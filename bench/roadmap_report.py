"""The roadmap benchmark's report: results.json, report.md (images/s and the ledger of deltas) and one PNG plot.

The ledger sets each step's delta top-1 (the paper's) against its delta images/s (measured here), both against
the row the step modifies, and says which way the trade went; where the steps were timed in interleaved rounds (the
CPU engines), it also gives each delta's range over the rounds.
"""
from __future__ import annotations

from pathlib import Path

from bench.report import pyplot, render_figure, write_files

# The least throughput change read as a change. A run measures its own noise on top: rows 0 and 1 are the same
# network twice (the two recipes; in Table 10 torchvision's ResNet-50 and ours), so any speed difference between
# them is noise, and the verdicts use the larger of the two.
NOISE = 0.05
PLOT = "roadmap_top1_vs_images_per_s.png"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _points(results: dict) -> list[tuple[str, str]]:
    """(engine, batch) columns in a stable order: every engine at every batch size."""
    return [(e, str(b)) for e in results["engines"] for b in results["config"]["batch_sizes"]]


def verdict_point(results: dict) -> tuple[str, str]:
    """The (engine, batch) the verdicts read: the first engine at the largest batch (ONNX Runtime CPU fp32 on a CPU
    run, TensorRT fp16 on a GPU run: each the service's engine there)."""
    return results["engines"][0], str(max(results["config"]["batch_sizes"]))


def noise_level(results: dict) -> float:
    """NOISE, or this run's own speed difference between its two same-network rows (0 and 1) if larger."""
    engine, batch = verdict_point(results)
    twins = [s for s in results["steps"] if s["row"] in (0, 1)]
    if len(twins) < 2:
        return NOISE
    first, second = (s["results"][engine][batch]["images_per_s"] for s in twins)
    return max(NOISE, abs(second / first - 1))


def ledger(results: dict) -> list[dict]:
    """Per step: delta top-1 and delta GMACs vs the row it modifies, delta images/s per (engine, batch), verdict."""
    by_key = {s["key"]: s for s in results["steps"]}
    (engine, batch), noise = verdict_point(results), noise_level(results)
    out = []
    for step in results["steps"]:
        parent = by_key.get(step["parent"])
        entry = {"row": step["row"], "key": step["key"], "label": step["label"], "parent": step["parent"],
                 "delta_top1": None, "delta_gmacs": None, "delta_images_per_s": {},
                 "delta_images_per_s_rounds": {}, "verdict": "baseline"}
        if parent is not None:
            entry["delta_top1"] = round(step["top1"] - parent["top1"], 2)
            entry["delta_gmacs"] = step["gmacs"] / parent["gmacs"] - 1
            entry["delta_images_per_s"] = {
                f"{e} b{b}": step["results"][e][b]["images_per_s"] / parent["results"][e][b]["images_per_s"] - 1
                for e, b in _points(results)
            }
            entry["delta_images_per_s_rounds"] = {
                f"{e} b{b}": spread for e, b in _points(results)
                if (spread := round_spread(step["results"][e][b], parent["results"][e][b])) is not None
            }
            std = max(step["top1_std"] or 0.0, parent["top1_std"] or 0.0)
            entry["verdict"] = verdict(entry["delta_top1"], std, entry["delta_images_per_s"][f"{engine} b{batch}"],
                                       noise)
        out.append(entry)
    return out


def round_spread(point: dict, parent_point: dict) -> list[float] | None:
    """[lowest, highest] of a point's per-round delta images/s against the same round of its parent's point, or None
    where the two were not timed in the same rounds (GPU engines: one step after another)."""
    rates, parent_rates = point.get("round_rates"), parent_point.get("round_rates")
    if not rates or not parent_rates or len(rates) != len(parent_rates):
        return None
    deltas = [rate / parent_rate - 1 for rate, parent_rate in zip(rates, parent_rates, strict=True)]
    return [min(deltas), max(deltas)]


def _delta_cell(entry: dict, point: str) -> str:
    """A ledger cell: the delta images/s, and its range over the rounds where there is one."""
    if not entry["delta_images_per_s"]:
        return "-"
    cell = f"{entry['delta_images_per_s'][point]:+.1%}"
    spread = entry.get("delta_images_per_s_rounds", {}).get(point)
    return cell if spread is None else f"{cell} ({spread[0]:+.0%} to {spread[1]:+.0%})"


def verdict(delta_top1: float, top1_std: float, delta_speed: float, noise: float = NOISE) -> str:
    """Which way the trade went: accuracy (the paper's, beyond its seed std) against throughput (beyond `noise`)."""
    gained = delta_top1 > top1_std
    lost = delta_top1 < -top1_std
    if delta_speed < -noise:
        return "bought: accuracy for throughput" if gained else "lost both" if lost else "paid, no gain beyond std"
    if delta_speed > noise:
        return "won both" if gained else "traded accuracy for speed" if lost else "faster, same accuracy"
    return "free: accuracy at no throughput cost" if gained else "lost accuracy, same speed" if lost else "no change"


def markdown(results: dict) -> str:
    cfg, points = results["config"], _points(results)
    size = cfg["input_size"]
    load_before, load_after = results["load_average_before"], results["load_average_after"]
    parts = [f"# Roadmap benchmark: {cfg['source']} ({cfg['regime']}), every step on every "
             f"{results.get('device', 'CPU')} engine", "",
             f"Host: {results['host']}. Load average (1/5/15 min) before {load_before}, after {load_after}: the "
             "machine is shared, so figures are noisy; rerun on a quiet machine with the command below.", "",
             f"Reproduce (one line): `nice -n 0 {cfg['command']}`", "",
             f"Engines: {', '.join(results['engines'])}, {cfg['threads']} threads, fp32 unless named, input "
             f"{cfg['input_size']}x{cfg['input_size']}, {cfg['seconds_per_point']} s timed per point (and at least "
             f"{cfg['min_calls_per_point']} calls) after 2 warm-up calls.{timing_note(results)}{calls_note(results)} "
             f"Versions: {results['versions']}."]
    if results["skipped_engines"]:
        parts += [""] + [f"Not timed: {name}: {why}." for name, why in results["skipped_engines"].items()]
    parts += ["", f"Top-1 is the paper's (ImageNet-1K, {seed_std_note(results)}), never measured here; weights are "
              f"random (speed only). GMACs: conv + linear multiply-accumulates of one {size}x{size} image, the size "
              "timed (`python -m model roadmap` gives them at 224 px, the paper's).",
              "", "## Images/s per step", ""]
    worst = max(s["parity_max_abs_diff"] for s in results["steps"])
    rows = [[s["row"], s["label"] + ("" if s["on_path"] else " (not kept)"), f"{s['params_m']:.2f}",
             f"{s['gmacs']:.2f}", f"{s['top1']:.2f}"] + [f"{s['results'][e][b]['images_per_s']:.1f}" for e, b in points]
            for s in results["steps"]]
    parts += [_table(["#", "step", "params (M)", "GMACs", "paper top-1"] + [f"{e} b{b}" for e, b in points], rows),
              "", f"Every step was exported with `export.onnx.export_onnx_version` and verified against PyTorch: "
              f"max |logit diff| <= {worst:.2g}, top-1 agreement "
              f"{min(s['parity_top1_agreement'] for s in results['steps']):.2f}." + engine_parity_note(results)
              + tensorrt_profile_note(results), ""]
    entries = ledger(results)
    rows = [[e["row"], e["label"], "-" if e["delta_top1"] is None else f"{e['delta_top1']:+.2f}",
             "-" if e["delta_gmacs"] is None else f"{e['delta_gmacs']:+.1%}"]
            + [_delta_cell(e, f"{n} b{b}") for n, b in points]
            + [e["verdict"]] for e in entries]
    engine, batch = verdict_point(results)
    parts += ["## The ledger: accuracy gained (paper) against throughput (measured), each vs the row it modifies", "",
              _table(["#", "step", "delta top-1", "delta GMACs"] + [f"delta img/s {e} b{b}" for e, b in points]
                     + [f"verdict ({engine} b{batch})"], rows), "",
              f"{rounds_legend(entries)}Verdict: {top1_rule(results)}; an images/s change within "
              f"{noise_level(results):.0%} is no change: "
              f"this run's noise, the larger of {NOISE:.0%} and the speed difference between rows 0 and 1, which are "
              "the same network. The kernel-size rows are a sweep: 9 and 11 were tried and left; ReLU -> GELU "
              "modifies kernel 7.", "", f"![top-1 vs images/s]({PLOT})", ""]
    parts += gelu_section(results)
    return "\n".join(parts)


def has_seed_std(results: dict) -> bool:
    """Whether the paper's table gives a seed std (Table 10: 3 seeds; Table 11: none)."""
    return any(s["top1_std"] is not None for s in results["steps"])


def seed_std_note(results: dict) -> str:
    source = results["config"]["source"]
    return f"mean +/- std of 3 seeds in {source}" if has_seed_std(results) else f"{source} gives no std"


def top1_rule(results: dict) -> str:
    """When the verdicts read a top-1 change as a gain: beyond the paper's seed std, or at all where it gives none."""
    if has_seed_std(results):
        return "a top-1 change within the paper's seed std is no gain"
    return f"{results['config']['source']} gives no std, so any top-1 change counts"


def interleaved_engines(results: dict) -> list[str]:
    """The engines whose points carry per-round images/s: every step timed in the same alternating rounds."""
    return [e for e in results["engines"]
            if all("round_rates" in point for s in results["steps"] for point in s["results"][e].values())]


def timing_note(results: dict) -> str:
    """How the steps were timed against each other: in interleaved rounds (CPU engines) or one after another."""
    interleaved = interleaved_engines(results)
    sequential = [e for e in results["engines"] if e not in interleaved]

    def which(engines: list[str]) -> str:
        return "every engine" if engines == results["engines"] else ", ".join(engines)

    note = ""
    if interleaved:
        note += (f" Steps timed in {results['config'].get('rounds')} interleaved rounds per engine and batch size "
                 f"({which(interleaved)}: the steps in turn, the order reversed every other round, each point's "
                 "seconds split over the rounds), so a step and the row it modifies were timed in the same minutes.")
    if sequential:
        note += (f" Steps timed one after another ({which(sequential)}: each step minutes after the previous), so "
                 "the deltas between them carry the machine's drift over those minutes.")
    return note


def rounds_legend(entries: list[dict]) -> str:
    """What the bracketed ranges in the ledger are, when it has any."""
    if not any(e.get("delta_images_per_s_rounds") for e in entries):
        return ""
    return ("In brackets: the lowest and highest per-round delta (each round's images/s against the same round's of "
            "the row it modifies), how far the machine moved the delta during the run. ")


def calls_note(results: dict) -> str:
    """How many timed calls the points rest on: a point of a few calls is a few samples of a noisy machine."""
    points = [(p["calls"], e, b, s["row"]) for s in results["steps"] for e, by_batch in s["results"].items()
              for b, p in by_batch.items()]
    if not points:
        return ""
    fewest, engine, batch, row = min(points)
    return (f" Timed calls per point: {fewest} to {max(p[0] for p in points)} (the fewest: {engine} b{batch}, row "
            f"{row}; each point's count is `calls` in results.json).")


def engine_parity_note(results: dict) -> str:
    """The TensorRT engines' own parity against ONNX Runtime fp32 (their builds verify it), worst over the steps."""
    notes = []
    for engine in results["engines"]:
        parities = [s["engine_parity"][engine] for s in results["steps"] if engine in s.get("engine_parity", {})]
        if parities:
            notes.append(f"{engine} max |logit diff| <= {max(p['max_abs_diff'] for p in parities):.2g}, top-1 "
                         f"agreement {min(p['top1_agreement'] for p in parities):.2f}")
    return f" Every engine built was verified against ONNX Runtime fp32: {'; '.join(notes)}." if notes else ""


def tensorrt_profile_note(results: dict) -> str:
    """The batch each TensorRT engine's kernels were chosen for (its profile's opt), where the run has one."""
    opts: dict[str, set[int]] = {}
    for step in results["steps"]:
        for engine, by_batch in step["results"].items():
            opts.setdefault(engine, set()).update(p["opt_batch"] for p in by_batch.values() if "opt_batch" in p)
    named = [f"{engine} opt batch {'/'.join(map(str, sorted(o)))}" for engine, o in opts.items() if o]
    if not named:
        return ""
    return (f" TensorRT profiles: {'; '.join(named)} (opt = the largest batch timed, as the service's engine: "
            "TensorRT chose the kernels for that batch, and smaller batches run on them).")


def gelu_section(results: dict) -> list[str]:
    """The user's question, "Why would you trade efficiency for nothing?", answered per engine from this run."""
    by_key = {s["key"]: s for s in results["steps"]}
    relu, gelu = by_key.get("kernel7"), by_key.get("gelu")
    if relu is None or gelu is None:
        return []
    rows = [[e, b, f"{relu['results'][e][b]['images_per_s']:.1f}", f"{gelu['results'][e][b]['images_per_s']:.1f}",
             f"{gelu['results'][e][b]['images_per_s'] / relu['results'][e][b]['images_per_s']:.3f}"]
            for e, b in _points(results)]
    return [f"## ReLU -> GELU (row {gelu['row']} vs row {relu['row']}): what GELU costs per engine", "",
            f"Paper ({results['config']['source']}): top-1 {_top1(relu)} -> {_top1(gelu)} "
            f"{_top1_change(relu, gelu, results['config']['source'])}.", "",
            _table(["engine", "batch", "ReLU img/s", "GELU img/s", "GELU / ReLU"], rows), ""]


def _top1(step: dict) -> str:
    return f"{step['top1']:.2f}" + ("" if step["top1_std"] is None else f" +/- {step['top1_std']}")


def _top1_change(parent: dict, step: dict, source: str) -> str:
    """The paper's top-1 change and what it means against the seed std, where the table gives one."""
    delta = step["top1"] - parent["top1"]
    stds = [s["top1_std"] for s in (parent, step) if s["top1_std"] is not None]
    if not stds:
        return f"({delta:+.2f}; {source} gives no std, so whether that is noise is not known)"
    if abs(delta) <= max(stds):
        return f"({delta:+.2f}, inside one seed std): no accuracy for it at this step"
    return f"({delta:+.2f}, beyond one seed std)"


def plot(results: dict) -> bytes:
    """Paper top-1 against measured images/s, one panel per batch size, the steps joined in table order (PNG)."""
    plt = pyplot()

    batches = [str(b) for b in results["config"]["batch_sizes"]]
    steps = results["steps"]
    by_key = {s["key"]: s for s in steps}
    path_rows = [s for s in steps if s["on_path"]]
    branch = [by_key[k] for k in ("kernel7", "kernel9", "kernel11") if k in by_key]
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 5.5), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for index, engine in enumerate(results["engines"]):
            color = f"C{index}"
            speed = [s["results"][engine][batch]["images_per_s"] for s in path_rows]
            ax.plot(speed, [s["top1"] for s in path_rows], "-o", color=color, markersize=4, label=engine)
            if len(branch) > 1:
                ax.plot([s["results"][engine][batch]["images_per_s"] for s in branch], [s["top1"] for s in branch],
                        "--x", color=color, markersize=5)
            for s in steps if index == 0 else ():
                ax.annotate(str(s["row"]), (s["results"][engine][batch]["images_per_s"], s["top1"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=f"measured images/s, batch {batch} ({results.get('device', 'CPU')})",
               ylabel="paper ImageNet-1K top-1 (%)",
               title=f"{results['config']['source']}: top-1 vs images/s, batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="dashed: kernel 9, 11 (left)", title_fontsize=7)
    return render_figure(fig)


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """The plot, results.json (with the ledger) and report.md under out_dir, all rendered before any is written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"plot": out_dir / PLOT, "markdown": out_dir / "report.md", "json": out_dir / "results.json"}
    png = plot(results)
    results["ledger"] = ledger(results)
    write_files({files["plot"]: png}, files["json"], results, files["markdown"], markdown(results) + "\n")
    return files
