"""Benchmark report: results.json, report.md (Markdown tables) and PNG plots (matplotlib, Agg backend).

Service efficiency = end-to-end images/s / engine-alone images/s at the service's max batch size: the share of the
bare engine's throughput that survives HTTP, JPEG decode, preprocessing and the batcher. The engine alone is the
sweep's: on a GPU its TensorRT engine is the sweep's build (opt 64), not the one the service builds (efficiency_line).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from bench.service_metrics import histogram_buckets
from convnext_files import write_bytes_atomic, write_text_atomic


def batch_histogram(metrics_text: str) -> dict[str, float]:
    """Cumulative convnext_batch_size buckets {le: count} from a Prometheus /metrics page."""
    return histogram_buckets(metrics_text, "convnext_batch_size")


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Batches per bucket during a run: (after - before), de-cumulated; keys are 'le' bounds."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
    out, previous = {}, 0.0
    for le in sorted(delta, key=lambda b: float("inf") if b == "+Inf" else float(b)):
        out[le] = delta[le] - previous
        previous = delta[le]
    return out


def service_efficiency(end_to_end_images_per_s: float, engine_results: list[dict], batch_size: int) -> float | None:
    same = [r["images_per_s"] for r in engine_results if r["batch_size"] == batch_size]
    return end_to_end_images_per_s / max(same) if same and max(same) > 0 else None


def format_ms(value: float | None) -> str:
    """A latency for a table: one decimal, or "-" when there is none (a run in which no request succeeded)."""
    return "-" if value is None else f"{value:.1f}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    parts = [f"# Benchmark ({results['config']['name']})", "", f"Host: {results['host']}", ""]
    parts += phases_lines(results)
    rows = [r for m in results["compare"]["models"] for r in m["results"]]
    native_tensorrt = any(r["provider"] == "tensorrt-engine" for r in rows)
    engines = "ONNX Runtime providers and native TensorRT engines" if native_tensorrt else "ONNX Runtime"
    parts += [f"## Engine alone ({engines}; random-init weights: speed only)", ""]
    # n: the timed calls a row rests on; with few, p99 is the slowest call rather than a percentile.
    rows = [[r["model"], r["activation"], r["precision"], provider_cell(r), r["batch_size"], f"{r['images_per_s']:.1f}",
             f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f} (n={r['iterations']})"]
            for m in results["compare"]["models"] for r in m["results"]]
    parts += [_table(["model", "act", "precision", "provider", "batch", "images/s", "p50 ms", "p99 ms (n calls)"],
                     rows), ""]
    profile_note = tensorrt_profile_note(results)
    parts += [profile_note, ""] if profile_note else []
    parts += ["## Model comparison (accuracy is not measured here: no ImageNet; top-1 is the published figure)", ""]
    rows = [[m["model"], m["activation"], f"{m['params_m']:.1f}", f"{m['gmacs']:.2f}",
             "-" if m["published_top1"] is None else f"{m['published_top1']} (published)", m["published_top1_source"]]
            for m in results["compare"]["models"]]
    parts += [_table(["model", "act", "params (M)", "GMACs", "ImageNet top-1", "source"], rows), ""]
    if results["compare"]["skipped"]:
        parts += ["Skipped: " + "; ".join(f"{k}: {v}" for k, v in results["compare"]["skipped"].items()), ""]
    parts += ["## End to end (HTTP load, real JPEGs 500x375 and 1024x768, quality 90)", ""]
    rows = [[run["server"], run["mode"], run["concurrency"] or "-", run["rate_per_s"] or "-", run["ok"],
             sum(run["errors"].values()), f"{run['images_per_s']:.1f}", format_ms(run["p50_ms"]),
             format_ms(run["p95_ms"]), format_ms(run["p99_ms"]), failed_latency_cell(run),
             format_ms(run.get("send_lag_max_ms")),
             "-" if run.get("efficiency") is None else f"{run['efficiency']:.2f}"]
            for run in results["load"]]
    parts += [_table(["server", "mode", "concurrency", "rate/s", "ok", "errors", "images/s", "p50 ms (200s)",
                      "p95 ms (200s)", "p99 ms (200s)", "errors: p50 / max ms", "max send lag ms",
                      "service efficiency"], rows), ""]
    parts += ["Latency percentiles are of the successful (200) answers alone; a failed request's latency (until its "
              "error answer, or its timeout) is in the errors column, so a slow refusal cannot pass for a fast "
              "success. Closed loop: the whole run, its ramp-up and drain included (no steady-state window), until "
              "its request count or time limit. Open loop: each request's latency counts from its scheduled arrival, "
              "so a generator that falls behind cannot hide the wait (no coordinated omission); max send lag = how "
              "late the latest send was.", ""]
    engines = results.get("engines_under_load")
    if engines:
        same = engines["ours"] == engines["litserve"]
        parts += [f"Under load, ours runs {engines['ours']} and the LitServe peer {engines['litserve']}"
                  + ("." if same else ": not the same engine (the peer runs ONNX Runtime only), so the gap between "
                     "them is the engines' as well as the serving stacks'."), ""]
    parts += [efficiency_line(results), ""]
    parts += activation_and_baseline_sections(results)
    parts += low_load_and_preprocess_sections(results)
    if results.get("batch_distribution"):
        rows = [[le, int(n)] for le, n in results["batch_distribution"].items()]
        parts += ["## Engine batch sizes during our load runs (service /metrics convnext_batch_size)", "",
                  _table(["batch size <=", "batches"], rows), ""]
    return "\n".join(parts)


def efficiency_line(results: dict) -> str:
    """What the closed loops' service efficiency divides by: the sweep's rows of the engine the service runs. On the CPU
    that is the served engine (its ONNX file in an ONNX Runtime session); a TensorRT engine of the sweep was built for
    the sweep's largest batch (opt 64), the service's own for its max batch size, so it is named as the sweep's."""
    served = results.get("served_engine", {}).get("engine_rows", "fp32/cpu")
    precision, _, provider = served.partition("/")
    opts = sorted({r["opt_batch"] for r in results["compare"]["models"][0]["results"]
                   if (r["precision"], r["provider"]) == (precision, provider) and r.get("opt_batch") is not None})
    batch = results.get("efficiency_batch_size", "?")
    if not opts:
        return (f"Service efficiency (closed loop) = end-to-end images/s / the served engine alone ({served}) images/s "
                f"at batch {batch}, the service's max batch size.")
    service_opt = results["config"].get("max_batch_size", "its max batch size")
    return (f"Service efficiency (closed loop) = end-to-end images/s / the sweep's engine alone ({served}, opt "
            f"{'/'.join(map(str, opts))}) images/s at batch {batch}, the service's max batch size: not the engine the "
            f"service serves, which it builds itself (opt {service_opt}).")


def phases_lines(results: dict) -> list[str]:
    """How each phase of the run ended, and, while the run is not complete, that the report stops where it did."""
    phases = results.get("phases")
    if not phases:
        return []
    line = "Phases: " + "; ".join(f"{name}: {outcome}" for name, outcome in phases.items()) + "."
    if not results.get("complete", True):
        line = ("**Incomplete run**: this report was written when the last phase listed ended; the phases after it "
                "have not run (the run is still going, or it stopped there). " + line)
    return [line, ""]


def provider_cell(row: dict) -> str:
    """An engine row's provider, with the TensorRT profile's opt batch where it has one ("tensorrt-engine, opt 64")."""
    return row["provider"] if row.get("opt_batch") is None else f"{row['provider']}, opt {row['opt_batch']}"


def tensorrt_profile_note(results: dict) -> str:
    """What the TensorRT rows were tuned for, and how they were timed; "" for a run without them."""
    opts = sorted({r["opt_batch"] for m in results["compare"]["models"] for r in m["results"]
                   if r.get("opt_batch") is not None})
    if not opts:
        return ""
    return (f"TensorRT rows (native engines and ONNX Runtime's TensorRT provider): each engine's optimization profile "
            f"is batch 1 to {'/'.join(map(str, opts))}, opt = max, as the service's engine (opt = max = its max batch "
            "size): TensorRT chose its kernels for that batch, so a smaller batch runs on kernels tuned for the "
            "largest. Like the ONNX Runtime rows, the variants' engines of one precision are timed in alternating "
            "rounds, so their ratios come from the same minutes.")


def _engine_rows(results: dict) -> dict[tuple, dict]:
    """{(model, activation, precision, provider, batch): engine result} from the sweep."""
    return {(r["model"], r["activation"], r["precision"], r["provider"], r["batch_size"]): r
            for m in results["compare"]["models"] for r in m["results"]}


def activation_and_baseline_sections(results: dict) -> list[str]:
    """The user's two questions from the same sweep: what GELU costs over ReLU, and ConvNeXt vs ResNet-50."""
    rows_by_key = _engine_rows(results)
    parts: list[str] = []
    gelu_rows = []
    for (model, act, precision, provider, batch), gelu in sorted(rows_by_key.items()):
        relu = rows_by_key.get((model, "relu", precision, provider, batch))
        if act == "gelu" and relu is not None:
            gelu_rows.append([model, precision, provider, batch, f"{gelu['images_per_s']:.1f}",
                              f"{relu['images_per_s']:.1f}", f"{gelu['images_per_s'] / relu['images_per_s']:.3f}",
                              f"{gelu['p50_ms']:.1f}", f"{relu['p50_ms']:.1f}"])
    if gelu_rows:
        parts += ["## GELU vs ReLU (same model, engine, precision, batch; images/s ratio < 1 = GELU is slower)", "",
                  _table(["model", "precision", "provider", "batch", "GELU img/s", "ReLU img/s", "GELU/ReLU",
                          "GELU p50 ms", "ReLU p50 ms"], gelu_rows), ""]
    # Each model at its own activation: ResNet's ReLU, ConvNeXt's GELU.
    models = {m["model"]: m for m in results["compare"]["models"]
              if m["activation"] == ("relu" if m["model"].startswith("resnet") else "gelu")}
    if "resnet50" in models and len(models) > 1:
        rows = []
        for name, m in models.items():
            speeds = [f"{r['precision']}/{r['provider']} b{r['batch_size']}: {r['images_per_s']:.1f}"
                      for r in m["results"] if r["batch_size"] in (1, 8)]
            top1 = "-" if m["published_top1"] is None else f"{m['published_top1']}"
            rows.append([name, m["activation"], f"{m['params_m']:.1f}", f"{m['gmacs']:.2f}", top1, "; ".join(speeds)])
        parts += ["## ConvNeXt vs ResNet-50 (params, GMACs, published ImageNet top-1, engine images/s)", "",
                  _table(["model", "act", "params (M)", "GMACs", "top-1 (published)", "images/s"], rows), ""]
    return parts


def low_load_and_preprocess_sections(results: dict) -> list[str]:
    parts: list[str] = []
    lone = results.get("low_load")
    if lone:
        parts += ["## Latency at low load", "", low_load_line(lone), ""]
        if lone.get("by_size"):
            rows = [[r["size"], r["requests"], f"{r['client_p50_ms']:.1f}", f"{r['engine_alone_p50_ms']:.1f}",
                     f"{r['over_engine_ms']:+.1f}", f"{r['http_ms']:.1f}", f"{r['preprocess_and_handoffs_ms']:.1f}",
                     "-" if r.get("preprocess_ms") is None else f"{r['preprocess_ms']:.1f}",
                     f"{r['queue_p50_ms']:.2f}", f"{r['inference_p50_ms']:.1f}"] for r in lone["by_size"]]
            parts += ["Where the time goes, one request at a time per JPEG size (medians; the service's own timings "
                      "from its JSON answer):", "",
                      _table(["JPEG size", "requests", "client p50 ms", "engine alone b1 p50 ms", "over engine ms",
                              "HTTP ms", "preprocess + hand-offs ms", "preprocess alone ms", "queue ms",
                              "engine in service ms"], rows), "",
                      "HTTP = client latency - the service's total; preprocess + hand-offs = total - queue - engine "
                      "call; preprocess alone is the one-thread measurement below (the same image repeated: warm "
                      "caches). Over engine = HTTP + preprocess + hand-offs + (engine in service - engine alone).", ""]
    pre = results.get("preprocess")
    if pre:
        rows = [[r["size"], r["images"], r["kib"], *(f"{r[s]:.2f}" for s in ("decode", "resize", "crop", "normalize")),
                 f"{r['total']:.2f}"] for r in pre["rows"]]
        parts += ["## Preprocessing cost per image (one thread; the service's own functions)", "",
                  _table(["JPEG size", "images", "KiB", "decode ms", "resize ms", "crop ms", "normalize ms",
                          "total ms"], rows), ""]
        on_gpu = results.get("served_engine", {}).get("provider", "cpu") != "cpu"
        if pre.get("engine_cpu_ms_per_image") is None and on_gpu:
            parts += ["The engine runs on the GPU: its threads x wall time per image is not a CPU cost, so no share "
                      "of an image's CPU is given for preprocessing here.", ""]
        if pre.get("engine_cpu_ms_per_image"):
            parts += [f"Mean {pre['mean_ms_per_image']:.2f} ms of CPU per image vs "
                      f"{pre['engine_cpu_ms_per_image']:.1f} ms of engine CPU per image "
                      f"(batch {results.get('efficiency_batch_size')}): preprocessing is "
                      f"{100 * pre['share_of_cpu']:.1f}% of an image's CPU. It runs in a bounded thread pool while the "
                      "engine thread runs the previous batch, so it is off the engine's critical path; on a machine "
                      "whose cores the engine already fills it still competes for CPU.", ""]
    return parts


def low_load_line(lone: dict) -> str:
    """A lone request's p50 against the engine's batch-1 p50 from the engine sweep (another phase of the run): their
    difference is HTTP, decode and preprocessing, unless it is below the preprocessing alone, which every request pays:
    then the two phases ran at different speeds, and the line says so instead of printing a cost."""
    head = (f"A lone request (closed loop, concurrency 1, both JPEG sizes) p50 {lone['service_p50_ms']:.1f} ms vs the "
            f"engine's batch-1 p50 {lone['engine_p50_ms']:.1f} ms")
    overhead_ms, preprocess_ms = lone["overhead_ms"], lone.get("preprocess_ms") or 0.0
    drift = "phase drift between the engine sweep and the load runs, not a cost; see the lone-request breakdown below"
    if overhead_ms < 0:
        return f"{head}: {overhead_ms:+.1f} ms, below the engine's own batch-1 p50 measured earlier: {drift}."
    if overhead_ms < preprocess_ms:
        return (f"{head}: {overhead_ms:+.1f} ms, less than the preprocessing alone ({preprocess_ms:.1f} ms) that "
                f"every request pays: {drift}.")
    return f"{head}: {overhead_ms:+.1f} ms for HTTP, JPEG decode and preprocessing."


def failed_latency_cell(run: dict) -> str:
    """The failed requests' latency, p50 / max ms, or "-" when none failed (or the run predates the figure)."""
    if run.get("failed_p50_ms") is None:
        return "-"
    return f"{format_ms(run['failed_p50_ms'])} / {format_ms(run['failed_max_ms'])}"


def latency_cdf_label(run: dict) -> str:
    """A load run in the latency CDF's legend: its clients (closed loop) or its arrival rate (open loop)."""
    if run["mode"] == "open":
        return f"{run['server']} open loop {run['rate_per_s']:g} req/s"
    return f"{run['server']} {run['mode']} c={run['concurrency']}"


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display); imported when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(results: dict, out_dir: Path) -> dict[Path, bytes]:
    """Each plot's PNG by the path it is to have under out_dir: rendered in memory, nothing written yet."""
    plt = pyplot()

    rendered = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for server in sorted({r["server"] for r in results["load"]}):
        runs = sorted((r for r in results["load"] if r["server"] == server and r["mode"] == "closed"),
                      key=lambda r: r["concurrency"])
        ax.plot([r["concurrency"] for r in runs], [r["images_per_s"] for r in runs], marker="o", label=server)
    ax.set(xlabel="concurrency (closed loop)", ylabel="images/s", title="Throughput vs concurrency")
    if ax.get_lines():  # a report written before any load run has none
        ax.legend()
    rendered[out_dir / "throughput_vs_concurrency.png"] = render_figure(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in results["load"]:
        lat = np.sort(run["latencies_ms"])
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=latency_cdf_label(run))
    ax.set(xlabel="latency (ms)", ylabel="fraction of 200 answers", title="Latency CDF (successful requests)")
    if ax.get_lines():
        ax.legend(fontsize=7)
    rendered[out_dir / "latency_cdf.png"] = render_figure(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    dist = results.get("batch_distribution") or {}
    ax.bar(list(dist), list(dist.values()))
    ax.set(xlabel="batch size bucket (<=)", ylabel="batches", title="Engine batch sizes (service /metrics)")
    rendered[out_dir / "batch_sizes.png"] = render_figure(fig)
    return rendered


def render_figure(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


def save_figure(fig, path: Path) -> Path:
    """The figure as a PNG at `path`, replaced atomically (a reader never sees half a file)."""
    write_bytes_atomic(path, render_figure(fig))
    return path


def write_files(rendered: dict[Path, bytes], results_json: Path, results: dict, report_md: Path, report: str) -> None:
    """Everything already rendered, written atomically: the plots, then results.json, then report.md, last because
    it is what a reader opens (and `bench all` prints). A failure while rendering writes nothing; a new report.md is
    never beside plots older than it."""
    for path, png in rendered.items():
        write_bytes_atomic(path, png)
    write_text_atomic(results_json, json.dumps(results, indent=2) + "\n")
    write_text_atomic(report_md, report)


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """Plots, results.json (which lists every file written, itself included) and report.md, rendered first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "results.json", "markdown": out_dir / "report.md"}
    rendered = plots(results, out_dir)
    files.update({p.stem: p for p in rendered})
    results["files"] = {k: str(v) for k, v in files.items()}
    write_files(rendered, files["json"], results, files["markdown"], markdown(results))
    return files
