"""Soak test: the real service as a subprocess, a fixed open-loop rate for minutes, sampled per window for drift.

Every `window_s` it records images/s, p50/p99 latency, errors, the server's RSS and the batch queue depth from
/metrics; at the end it reports latency drift (p50 of the last window over the first, and a linear slope) and
memory growth after the first window (MB and MB/min). A benchmark script: it prints numbers, it asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.host import free_port, server_process

MAX_MINUTES = 120.0  # hard cap: a soak is bounded even when --minutes is mistyped
SMOKE_SECONDS = 20.0
# uvicorn closes a keep-alive connection idle for 5 s; reusing one it is closing would count as a server error.
KEEP_ALIVE_REUSE_S = 2.0


def rss_mb(pid: int) -> float:
    """Resident set size of process `pid` in MiB (Linux /proc; the service runs on Linux hosts)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line: is {pid} a live process?")


def export_atto(root: Path, input_size_px: int = 64) -> Path:
    """A model repository with convnext_atto (random weights, 10 classes): the service's mechanics, fast."""
    from export.onnx import export_onnx_version

    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=input_size_px)
    return root


def service_command(repository: Path, port: int, queue_size: int, max_batch_size: int) -> list[str]:
    return [sys.executable, "-m", "service", "--repository", str(repository), "--host", "127.0.0.1",
            "--port", str(port), "--queue-size", str(queue_size), "--max-batch-size", str(max_batch_size)]


def metric_value(metrics_text: str, name: str) -> float | None:
    """The value of an unlabelled Prometheus sample `name` in a /metrics exposition, or None when absent."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@dataclass
class Window:
    """One sampling window of the soak."""

    end_s: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    images_per_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    rss_mb: float = 0.0
    queue_depth: float | None = None


async def _scrape(url: str) -> str:
    from bench.http_client import Connection, HttpError, PreparedRequest

    connection = Connection.for_url(url)
    host = url.split("//", 1)[1].split("/", 1)[0]
    try:
        status, body = await connection.send(PreparedRequest(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()))
    except (HttpError, OSError):
        return ""
    finally:
        await connection.close()
    return body.decode() if status == 200 else ""


async def drive(url: str, payloads: list[bytes], rate_per_s: float, seconds: float, window_s: float, pid: int,
                timeout_s: float = 30.0) -> tuple[list[Window], dict]:
    """Open loop at `rate_per_s` (evenly spaced arrivals) for `seconds`; one Window per `window_s`, and totals.

    A request is counted in the window in which it was answered; those still in flight at the end of the last
    window are answered afterwards and counted in the totals only.
    """
    from bench.http_client import Connection, HttpError, prepare_post

    requests = [prepare_post(f"{url}/classify", body) for body in payloads]
    idle: list[tuple[float, Connection]] = []  # (idle since, connection), most recently used last
    done: list[tuple[float, float, str]] = []  # (finished at, latency ms, status)
    start = time.perf_counter()

    async def one(index: int) -> None:
        connection = None
        while idle and connection is None:
            idle_since, candidate = idle.pop()
            if time.perf_counter() - idle_since < KEEP_ALIVE_REUSE_S:
                connection = candidate
            else:
                await candidate.close()
        connection = connection or Connection.for_url(url)
        sent_at = time.perf_counter()
        try:
            status = str((await asyncio.wait_for(connection.send(requests[index % len(requests)]), timeout_s))[0])
        except (TimeoutError, HttpError, OSError) as err:  # counted per window, not fatal
            await connection.close()
            status = type(err).__name__
        finished = time.perf_counter()
        done.append((finished - start, (finished - sent_at) * 1000, status))
        idle.append((finished, connection))

    async def sample() -> list[Window]:
        windows, seen, sent_seen = [], 0, 0
        for number in range(1, int(seconds / window_s) + 1):
            await asyncio.sleep(max(0.0, start + number * window_s - time.perf_counter()))
            batch, seen = done[seen:], len(done)
            ok_ms = np.asarray([ms for _, ms, status in batch if status == "200"])
            errors: dict[str, int] = {}
            for _, _, status in batch:
                if status != "200":
                    errors[status] = errors.get(status, 0) + 1
            window = Window(end_s=round(number * window_s, 1), sent=len(tasks) - sent_seen, ok=len(ok_ms),
                            errors=errors, images_per_s=len(ok_ms) / window_s, rss_mb=rss_mb(pid),
                            queue_depth=metric_value(await _scrape(url), "convnext_queue_depth"))
            sent_seen = len(tasks)
            if len(ok_ms):
                window.p50_ms, window.p99_ms = (float(v) for v in np.percentile(ok_ms, [50, 99]))
            windows.append(window)
            print(format_row(window), flush=True)
        return windows

    tasks: list[asyncio.Task] = []
    sampler = asyncio.create_task(sample())
    total = int(seconds * rate_per_s)
    for index in range(total):
        await asyncio.sleep(max(0.0, start + index / rate_per_s - time.perf_counter()))
        tasks.append(asyncio.create_task(one(index)))
    windows = await sampler
    await asyncio.gather(*tasks)
    for _, connection in idle:
        await connection.close()
    statuses: dict[str, int] = {}
    for _, _, status in done:
        statuses[status] = statuses.get(status, 0) + 1
    return windows, {"sent": len(tasks), "answered": len(done), "statuses": statuses}


def format_row(w: Window) -> str:
    errors = ",".join(f"{k}:{v}" for k, v in sorted(w.errors.items())) or "-"
    depth = "-" if w.queue_depth is None else f"{w.queue_depth:.0f}"
    return (f"{w.end_s:>7.0f} {w.sent:>6} {w.images_per_s:>8.1f} {w.p50_ms:>8.1f} {w.p99_ms:>8.1f} {w.rss_mb:>8.1f} "
            f"{depth:>5}  {errors}")


HEADER = f"{'t_s':>7} {'sent':>6} {'img/s':>8} {'p50_ms':>8} {'p99_ms':>8} {'rss_mb':>8} {'queue':>5}  errors"


def drift(windows: list[Window]) -> dict:
    """Latency drift and memory growth, both measured after the first window (warm-up excluded from memory)."""
    p50 = np.asarray([w.p50_ms for w in windows])
    minutes = np.asarray([w.end_s for w in windows]) / 60
    valid = ~np.isnan(p50)
    slope = float(np.polyfit(minutes[valid], p50[valid], 1)[0]) if valid.sum() >= 2 else float("nan")
    rss = [w.rss_mb for w in windows]
    span_min = (windows[-1].end_s - windows[0].end_s) / 60 if len(windows) > 1 else 0.0
    growth = rss[-1] - rss[0]
    return {"p50_first_ms": float(p50[0]), "p50_last_ms": float(p50[-1]),
            "p50_last_over_first": float(p50[-1] / p50[0]) if p50[0] > 0 else float("nan"),
            "p50_slope_ms_per_min": slope, "rss_first_window_mb": rss[0], "rss_last_mb": rss[-1],
            "rss_growth_mb": growth, "rss_growth_mb_per_min": growth / span_min if span_min else float("nan"),
            "rss_max_mb": max(rss), "errors": sum(sum(w.errors.values()) for w in windows),
            "ok_in_windows": sum(w.ok for w in windows)}


def run_soak(repository: Path | None, minutes: float, window_s: float, rate_fraction: float, rate: float | None,
             out: Path, queue_size: int, max_batch_size: int, calibrate_s: float) -> dict:
    from bench.loadgen import closed_loop, jpeg_payloads

    seconds = min(minutes, MAX_MINUTES) * 60
    if seconds < 2 * window_s:
        raise ValueError(f"--minutes {minutes} gives fewer than two {window_s} s windows: nothing to compare")
    payloads = jpeg_payloads(sizes=((500, 375),))
    with tempfile.TemporaryDirectory() as scratch:
        repository = repository or export_atto(Path(scratch) / "models")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = service_command(repository, port, queue_size, max_batch_size)
        with server_process(command, f"{url}/readyz") as process:
            calibration = asyncio.run(closed_loop(f"{url}/classify", payloads, 8, 10**9, calibrate_s)).summary()
            sustainable = calibration["images_per_s"]
            rate = rate or max(1.0, rate_fraction * sustainable)
            print(f"sustainable (closed loop, 8 clients, {calibrate_s:.0f} s): {sustainable:.1f} images/s; "
                  f"soak at {rate:.1f} requests/s for {seconds:.0f} s, pid {process.pid}", flush=True)
            print(HEADER, flush=True)
            windows, totals = asyncio.run(drive(url, payloads, rate, seconds, window_s, process.pid))
    report = {"repository": str(repository), "sustainable_images_per_s": sustainable, "rate_per_s": rate,
              "seconds": seconds, "window_s": window_s, "queue_size": queue_size, "max_batch_size": max_batch_size,
              "windows": [w.__dict__ for w in windows], "summary": drift(windows) | totals}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnext bench soak", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=None,
                        help="model repository to serve (default: export a random convnext_atto at 64 px)")
    parser.add_argument("--minutes", type=float, default=5.0, help=f"soak length (capped at {MAX_MINUTES:.0f})")
    parser.add_argument("--window-s", type=float, default=10.0, help="sampling window")
    parser.add_argument("--rate-fraction", type=float, default=0.7, help="open-loop rate as a fraction of the "
                        "closed-loop sustainable rate measured first")
    parser.add_argument("--rate", type=float, default=None, help="fixed requests/s instead of --rate-fraction")
    parser.add_argument("--queue-size", type=int, default=256)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench-results/soak.json"))
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_SECONDS:.0f} s in 5 s windows")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server subprocess is stopped rather than orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    minutes, window_s, calibrate_s = args.minutes, args.window_s, 5.0
    if args.smoke:
        minutes, window_s, calibrate_s = SMOKE_SECONDS / 60, 5.0, 2.0
    if not 0 < args.rate_fraction <= 2 or (args.rate is not None and args.rate <= 0):
        print("convnext bench soak: --rate-fraction must be in (0, 2] and --rate > 0", file=sys.stderr)
        return 2
    try:
        report = run_soak(args.repository, minutes, window_s, args.rate_fraction, args.rate, args.out,
                          args.queue_size, args.max_batch_size, calibrate_s)
    except ValueError as err:
        print(f"convnext bench soak: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report["summary"], indent=2))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
