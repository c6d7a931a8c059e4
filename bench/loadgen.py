"""HTTP load for loopback URLs: real JPEG payloads, the closed loop (fixed concurrency) and the result both loops give.

Payloads are the scikit-learn / scikit-image photographs re-encoded as JPEG (quality 90) at typical upload sizes,
so every request pays a realistic decode + resize. Results: images/s, p50/p95/p99 latency of the successful (200)
answers, errors by status with the failed requests' own latency (p50, max: a slow refusal or a timeout shows). The
open loop (arrivals on a schedule, latency from each request's due time) is bench/open_loop.py.
"""
from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from bench.api_key import API_KEY_HEADER
from bench.http_client import Connection, HttpError, PreparedRequest, prepare_post
from convnext_common import one_line

PAYLOAD_SIZES = ((500, 375), (1024, 768))
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def photo_paths() -> list[Path]:
    import skimage
    import sklearn.datasets

    sklearn_images = Path(sklearn.datasets.__file__).parent / "images"
    skimage_data = Path(skimage.__file__).parent / "data"
    return [sklearn_images / "china.jpg", sklearn_images / "flower.jpg", skimage_data / "chelsea.png",
            skimage_data / "coffee.png", skimage_data / "astronaut.png", skimage_data / "rocket.jpg"]


def jpeg_payloads(paths: list[Path] | None = None, sizes=PAYLOAD_SIZES, quality: int = 90) -> list[bytes]:
    """Each photo resized to each size and re-encoded as a baseline JPEG."""
    payloads = []
    for path in paths or photo_paths():
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        for size in sizes:
            buffer = io.BytesIO()
            rgb.resize(size, Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=quality)
            payloads.append(buffer.getvalue())
    return payloads


@dataclass
class LoadResult:
    mode: str
    url: str
    concurrency: int | None
    rate_per_s: float | None
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str | None = None  # what the first failed request met, e.g. "HTTP 503: ..." or "TimeoutError"
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # the 200 answers'
    # Each failed request's (a non-200 answer, or no answer: its timeout, a refused connection) until it failed.
    failed_latencies_ms: list[float] = field(default_factory=list)
    # Open loop only: how late each request was sent after its due time (a lagging generator shows here).
    send_lags_ms: list[float] = field(default_factory=list)
    # Closed loop: when each counted 200 completed (time.perf_counter()); a steady run fits its images/s to these.
    completed_at_s: list[float] = field(default_factory=list)
    steady: bool = False

    def images_per_s(self) -> float:
        """Successes per second: over the run, or (a steady window) the rate fitted to the window's completions."""
        if self.steady:
            return steady_rate(self.completed_at_s, self.elapsed_s)
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict:
        """The run's figures. p50/p95/p99_ms: of the 200 answers alone, None (JSON null) when no request succeeded;
        failed_p50/max_ms: of the failed requests, None when none failed (a slow refusal is no success's latency)."""
        lat = np.asarray(self.latencies_ms)
        p50, p95, p99 = (float(v) for v in np.percentile(lat, [50, 95, 99])) if lat.size else (None, None, None)
        failed = np.asarray(self.failed_latencies_ms)
        return {
            "mode": self.mode, "url": self.url, "concurrency": self.concurrency, "rate_per_s": self.rate_per_s,
            "sent": self.sent, "ok": self.ok, "errors": dict(self.errors), "first_error": self.first_error,
            "elapsed_s": self.elapsed_s, "images_per_s": self.images_per_s(),
            "p50_ms": p50, "p95_ms": p95, "p99_ms": p99,
            "failed_p50_ms": float(np.percentile(failed, 50)) if failed.size else None,
            "failed_max_ms": float(failed.max()) if failed.size else None, **send_lag_summary(self.send_lags_ms),
        }


def steady_rate(completed_at_s: list[float], window_s: float) -> float:
    """Completions per second in a steady window: the least-squares slope of the running count against completion
    time. A batching server answers a batch's requests together, so a count over a fixed window moves in steps of a
    batch (batches of 8 every 0.5 s: 13.3 or 20/s over a 1.2 s window, for a true 16/s); the slope does not. With
    completions spanning under a quarter of the window (too few batches to fit), the count over the window."""
    times = np.sort(np.asarray(completed_at_s, dtype=np.float64))
    if len(times) < 2 or times[-1] - times[0] < window_s / 4:
        return len(times) / window_s
    return float(np.polyfit(times - times[0], np.arange(1, len(times) + 1), 1)[0])


def send_lag_summary(send_lags_ms: list[float]) -> dict:
    """p99 and max send lag in ms (None when nothing was scheduled): how far behind its schedule a generator fell."""
    lags = np.asarray(send_lags_ms)
    return {"send_lag_p99_ms": float(np.percentile(lags, 99)) if lags.size else None,
            "send_lag_max_ms": float(lags.max()) if lags.size else None}


def http_error_text(status: int, body: bytes) -> str:
    """A non-200 answer as one line: its status and the start of its body (the service's JSON error)."""
    return f"HTTP {status}: {one_line(body[:200].decode('utf-8', 'replace'))}"


def transport_error_text(error: BaseException) -> str:
    """A request that got no answer, as one line: the exception's name and its message when it has one."""
    return f"{type(error).__name__}: {one_line(error)}" if str(error) else type(error).__name__


def check_loopback(url: str) -> None:
    """An http:// URL on a loopback host: bench.http_client speaks plain HTTP/1.1 (an https:// URL would be sent to its
    port in plain text, a URL without a scheme has no host to urlparse), to this machine only."""
    if "://" not in url:
        raise ValueError(f"{url}: no scheme; the load generator sends plain HTTP: pass http://{url}")
    parsed = urlparse(url)
    if parsed.scheme != "http":
        raise ValueError(f"{url}: the load generator sends plain HTTP (no TLS): pass an http:// URL, not "
                         f"{parsed.scheme}://")
    if parsed.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"{url}: the load generator only targets loopback (127.0.0.1, localhost, ::1), got "
                         f"{parsed.hostname!r}")


async def _send(connection: Connection, request: PreparedRequest, result: LoadResult, errors: Counter,
                timeout_s: float, window: tuple[float, float] = (0.0, float("inf"))) -> None:
    """One POST on `connection` (bench.http_client: a lean keep-alive client, so the numbers describe the server);
    counted in `result` when it completes inside `window` (time.perf_counter() from, until)."""
    t0 = time.perf_counter()
    try:
        code, body = await asyncio.wait_for(connection.send(request), timeout_s)
        status, error = str(code), None if code == 200 else http_error_text(code, body)
    except (TimeoutError, HttpError, OSError) as err:  # counted, not fatal, during a load run
        await connection.close()
        status, error = type(err).__name__, transport_error_text(err)
    done = time.perf_counter()
    if not window[0] <= done <= window[1]:
        return  # ramp-up or drain of a steady-state run
    result.sent += 1
    if status == "200":
        result.ok += 1
        result.latencies_ms.append((done - t0) * 1000)
        result.completed_at_s.append(done)
    else:
        errors[status] += 1
        result.failed_latencies_ms.append((done - t0) * 1000)
        result.first_error = result.first_error or error


def prepared_posts(url: str, payloads: list[bytes], form_field: str | None = None,
                   api_key: str | None = None) -> list[PreparedRequest]:
    """One prebuilt POST per payload, raw JPEG or the file of a multipart `form_field`, carrying `api_key` if given."""
    headers = {API_KEY_HEADER: api_key} if api_key else None
    return [prepare_post(url, body, "image/jpeg", form_field, headers) for body in payloads]


async def closed_loop(url: str, payloads: list[bytes], concurrency: int, max_requests: int,
                      max_seconds: float, timeout_s: float = 60.0, form_field: str | None = None,
                      steady: bool = False, api_key: str | None = None) -> LoadResult:
    """`concurrency` workers, each on its own connection, sending the next request as soon as the last answers; the
    payloads go in turn across all workers, so each is sent an equal share of the requests.

    steady: the load runs max_seconds / 4 longer on each side of a max_seconds window, and only the requests that
    complete inside the window count: the ramp-up of `concurrency` requests and the drain of the last ones, whose
    batches run part-empty, stay out of a figure meant for the steady state. Its images/s is the rate fitted to those
    completions (steady_rate), not their count / max_seconds, which moves in steps of a batch; elapsed_s is the
    window's max_seconds."""
    check_loopback(url)
    result, errors = LoadResult("closed", url, concurrency, None, steady=steady), Counter[str]()
    requests = prepared_posts(url, payloads, form_field, api_key)
    start = time.perf_counter()
    margin = max_seconds / 4 if steady else 0.0
    window = (start + margin, start + margin + max_seconds) if steady else (0.0, float("inf"))
    deadline = start + max_seconds + 2 * margin
    sent = 0

    async def worker() -> None:
        nonlocal sent
        connection = Connection.for_url(url)
        try:
            while sent < max_requests and time.perf_counter() < deadline:
                # Round robin by the count sent alone: a pick that also depended on which client is free tied the mix
                # of upload sizes to the order clients resume in (a batch answered together skewed it 277:166).
                request, sent = requests[sent % len(requests)], sent + 1
                await _send(connection, request, result, errors, timeout_s, window)
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed_s = max_seconds if steady else time.perf_counter() - start
    result.errors = dict(errors)
    return result
