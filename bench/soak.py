"""Soak test: the real service as a subprocess, a fixed open-loop rate for minutes, sampled per window for drift.

Every `window_s` it records images/s, p50/p99 latency (from each request's scheduled arrival, bench.open_loop), the
generator's worst send lag, errors, the server's RSS and the batch queue depth from /metrics; at the end it reports
latency drift (p50 of the last window over the first, and a linear slope) and memory growth after the first window
(MB = 10^6 bytes, and MB/min). A benchmark script: it prints numbers, it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.host import host_description
from bench.http_client import HttpError
from bench.loadgen import closed_loop, jpeg_payloads, prepared_posts, send_lag_summary
from bench.open_loop import OpenLoop, Outcome, even_arrivals_s
from bench.server_process import measurement_pins, service
from bench.service_metrics import metric_value, scrape
from convnext_common import CliParser, add_version_argument, one_line, positive_int, positive_number
from convnext_files import write_text_atomic
from export.onnx import export_onnx_version

MAX_MINUTES = 120.0  # hard cap: a soak is bounded even when --minutes is mistyped
SMOKE_SECONDS, SMOKE_WINDOW_S = 10.0, 2.5  # four windows: the CI smoke
SCRAPE_TIMEOUT_S = 5.0


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid` in MB (10^6 bytes; Linux /proc, whose "kB" are KiB; the service runs on
    Linux hosts)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line: is {pid} a live process?")


def export_atto(root: Path, input_size_px: int = 64) -> Path:
    """A model repository with convnext_atto (random weights, 10 classes): the service's mechanics, fast."""
    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=input_size_px)
    return root


def service_args(repository: Path, queue_size: int, max_batch_size: int) -> list[str]:
    """The service as it runs by default (ONNX Runtime CPU fp32, exact decoding, one ORT stream, spinning on, its
    queue delay and preprocess workers), whatever CONVNEXT_* says."""
    return ["--repository", str(repository), "--queue-size", str(queue_size), "--max-batch-size", str(max_batch_size),
            "--engine", "onnxruntime", "--provider", "cpu", "--precision", "fp32", *measurement_pins()]


@dataclass
class Window:
    """One sampling window of the soak."""

    end_s: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    images_per_s: float = 0.0
    p50_ms: float | None = None  # latency from each request's scheduled arrival (bench.open_loop); None: no 200
    p99_ms: float | None = None
    send_lag_max_ms: float | None = None  # how far behind its schedule the generator fell; None: nothing answered
    rss_mb: float = 0.0
    queue_depth: float | None = None


def window_of(answered: list[Outcome], end_s: float, window_s: float, sent: int) -> Window:
    """A Window from the requests answered in it (`sent` = requests that fell due in it)."""
    ok_ms = np.asarray([o.latency_ms for o in answered if o.status == "200"])
    errors = Counter(o.status for o in answered if o.status != "200")
    window = Window(end_s=round(end_s, 1), sent=sent, ok=len(ok_ms), errors=dict(errors),
                    images_per_s=len(ok_ms) / window_s)
    if len(ok_ms):
        window.p50_ms, window.p99_ms = (float(v) for v in np.percentile(ok_ms, [50, 99]))
    if answered:
        window.send_lag_max_ms = max(o.send_lag_ms for o in answered)
    return window


async def queue_depth(url: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> float | None:
    """convnext_queue_depth from the server's /metrics, or None when this window's scrape failed."""
    try:
        return metric_value(await asyncio.wait_for(scrape(url), timeout_s), "convnext_queue_depth")
    except (TimeoutError, HttpError, OSError):  # a busy server: this window has no reading
        return None


async def sample(load: OpenLoop, url: str, t0: float, seconds: float, window_s: float, pid: int) -> list[Window]:
    """Every `window_s` after t0, a Window of what was answered since the last one, the server's RSS and queue."""
    windows, seen, dispatched_seen = [], 0, 0
    for number in range(1, int(seconds / window_s) + 1):
        await asyncio.sleep(max(0.0, t0 + number * window_s - time.perf_counter()))
        answered, seen = load.outcomes[seen:], len(load.outcomes)
        window = window_of(answered, number * window_s, window_s, load.dispatched - dispatched_seen)
        dispatched_seen = load.dispatched
        # Within half a window, so that a slow scrape never reaches into the next window's slice.
        window.rss_mb, window.queue_depth = rss_mb(pid), await queue_depth(url, min(SCRAPE_TIMEOUT_S, window_s / 2))
        windows.append(window)
        print(format_row(window), flush=True)
    return windows


async def drive(url: str, payloads: list[bytes], rate_per_s: float, seconds: float, window_s: float, pid: int,
                timeout_s: float = 30.0) -> tuple[list[Window], dict]:
    """Open loop at `rate_per_s` (evenly spaced arrivals) for `seconds`; one Window per `window_s`, and totals.

    A request is counted in the window in which it was answered; those still in flight at the end of the last
    window are answered afterwards and counted in the totals only.
    """
    load = OpenLoop(f"{url}/classify", prepared_posts(f"{url}/classify", payloads),
                    even_arrivals_s(rate_per_s, seconds), timeout_s)
    t0 = time.perf_counter()
    outcomes, windows = await asyncio.gather(load.run(t0), sample(load, url, t0, seconds, window_s, pid))
    statuses = Counter(o.status for o in outcomes)
    # Every failure, those answered after the last window included (errors_in_windows, from drift, leaves them out).
    return windows, {"sent": load.dispatched, "answered": len(outcomes), "statuses": dict(statuses),
                     "errors": sum(count for status, count in statuses.items() if status != "200"),
                     **send_lag_summary([o.send_lag_ms for o in outcomes])}


def format_row(w: Window) -> str:
    errors = ",".join(f"{k}:{v}" for k, v in sorted(w.errors.items())) or "-"
    depth = "-" if w.queue_depth is None else f"{w.queue_depth:.0f}"
    p50, p99, lag = ("-" if v is None else f"{v:.1f}" for v in (w.p50_ms, w.p99_ms, w.send_lag_max_ms))
    return (f"{w.end_s:>7.0f} {w.sent:>6} {w.images_per_s:>8.1f} {p50:>8} {p99:>8} "
            f"{lag:>8} {w.rss_mb:>8.1f} {depth:>5}  {errors}")


HEADER = (f"{'t_s':>7} {'sent':>6} {'img/s':>8} {'p50_ms':>8} {'p99_ms':>8} {'lag_ms':>8} {'rss_mb':>8} {'queue':>5}"
          "  errors")


def drift(windows: list[Window]) -> dict:
    """Latency drift and memory growth, both measured after the first window (warm-up excluded from memory).
    A figure that cannot be computed (a window without a success, a single window) is None."""
    first, last = windows[0].p50_ms, windows[-1].p50_ms
    minutes = [w.end_s / 60 for w in windows if w.p50_ms is not None]
    p50s = [w.p50_ms for w in windows if w.p50_ms is not None]
    slope = float(np.polyfit(minutes, p50s, 1)[0]) if len(p50s) >= 2 else None
    rss = [w.rss_mb for w in windows]
    span_min = (windows[-1].end_s - windows[0].end_s) / 60 if len(windows) > 1 else 0.0
    growth = rss[-1] - rss[0]
    return {"p50_first_ms": first, "p50_last_ms": last,
            "p50_last_over_first": last / first if first and last is not None else None,
            "p50_slope_ms_per_min": slope, "rss_first_window_mb": rss[0], "rss_last_mb": rss[-1],
            "rss_growth_mb": growth, "rss_growth_mb_per_min": growth / span_min if span_min else None,
            "rss_max_mb": max(rss), "errors_in_windows": sum(sum(w.errors.values()) for w in windows),
            "ok_in_windows": sum(w.ok for w in windows)}


def run_soak(repository: Path | None, minutes: float, window_s: float, rate_fraction: float, rate: float | None,
             out: Path, queue_size: int, max_batch_size: int, calibrate_s: float) -> dict:
    seconds = min(minutes, MAX_MINUTES) * 60
    if seconds < 2 * window_s:
        raise ValueError(f"--minutes {minutes} gives fewer than two {window_s} s windows: nothing to compare")
    payloads = jpeg_payloads(sizes=((500, 375),))
    host = host_description()
    print(f"{host}; the service on its default threads (every core it may use)", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        repository = repository or export_atto(Path(scratch) / "models")
        with service(service_args(repository, queue_size, max_batch_size)) as server:
            url = server.url
            calibration = asyncio.run(closed_loop(f"{url}/classify", payloads, 8, 10**9, calibrate_s)).summary()
            sustainable = calibration["images_per_s"]
            rate = rate or max(1.0, rate_fraction * sustainable)
            print(f"sustainable (closed loop, 8 clients, {calibrate_s:.0f} s): {sustainable:.1f} images/s; "
                  f"soak at {rate:.1f} requests/s for {seconds:.0f} s, pid {server.pid}", flush=True)
            print(HEADER, flush=True)
            windows, totals = asyncio.run(drive(url, payloads, rate, seconds, window_s, server.pid))
    report = {"repository": str(repository), "host": host, "sustainable_images_per_s": sustainable,
              "rate_per_s": rate, "seconds": seconds, "window_s": window_s, "queue_size": queue_size,
              "max_batch_size": max_batch_size, "windows": [w.__dict__ for w in windows],
              "summary": drift(windows) | totals}
    write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="python -m bench soak", description=__doc__.splitlines()[0])
    add_version_argument(parser)
    parser.add_argument("--repository", type=Path, default=None,
                        help="model repository to serve (default: export a random convnext_atto at 64 px)")
    parser.add_argument("--minutes", type=positive_number, default=5.0,
                        help=f"soak length (capped at {MAX_MINUTES:.0f})")
    parser.add_argument("--window-s", type=positive_number, default=10.0, help="sampling window")
    parser.add_argument("--rate-fraction", type=float, default=0.7, help="open-loop rate as a fraction of the "
                        "closed-loop sustainable rate measured first")
    parser.add_argument("--rate", type=positive_number, default=None,
                        help="fixed requests/s instead of --rate-fraction")
    parser.add_argument("--queue-size", type=positive_int, default=256)
    parser.add_argument("--max-batch-size", type=positive_int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench-results/soak.json"))
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_SECONDS:.0f} s in {SMOKE_WINDOW_S:g} s windows")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server subprocess is stopped rather than orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    minutes, window_s, calibrate_s = args.minutes, args.window_s, 5.0
    if args.smoke:
        minutes, window_s, calibrate_s = SMOKE_SECONDS / 60, SMOKE_WINDOW_S, 2.0
    if not 0 < args.rate_fraction <= 2:
        parser.error("--rate-fraction must be in (0, 2]")
    try:
        report = run_soak(args.repository, minutes, window_s, args.rate_fraction, args.rate, args.out,
                          args.queue_size, args.max_batch_size, calibrate_s)
    except ValueError as err:
        print(f"{parser.prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    print(json.dumps(report["summary"], indent=2))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
