"""Where a lone request's time goes, per JPEG size: client latency, the service's own timings, the engine alone.

One request at a time on a keep-alive connection, so nothing queues and every batch has one image. The service
reports per image `preprocess_ms` (its decode + transform in the decode pool), `total_ms` (from the handler's start
to the answer), `queue_ms` and `inference_ms` (the engine call inside the service), so each lone request splits into:

- HTTP: client latency - server total (sockets, parsing, the body read, JSON out);
- preprocessing and hand-offs: server total - queue - inference (decode + transform, thread and loop hops);
- the engine in the service vs the engine alone at batch 1 (same model file, same threads, measured earlier in
  the same run): any difference is interference from everything else the process does.

Its overhead, per request: client latency - that image's own preprocessing - its batch-1 inference, both as the
service timed them; `overhead_p50_ms` is the median of those (not a difference of medians). A service that does not
report `preprocess_ms` (trees before it, which scripts/compare_service_trees.py measures too) leaves both its median
and the overhead unknown: None.
"""
from __future__ import annotations

import json
import time
from statistics import median

from bench.http_client import BlockingConnection, HttpError, prepare_post


def lone_requests(url: str, payloads: list[bytes], requests: int, warmup: int = 2, timeout_s: float = 60.0) -> dict:
    """`requests` sequential POSTs cycling over `payloads` (one JPEG size) on a blocking keep-alive socket (one at
    a time needs no event loop, whose own steps would count in every latency); medians in ms. A request that fails
    (no answer within timeout_s, a broken connection, a status other than 200) ends it with a RuntimeError."""
    connection = BlockingConnection(url, timeout_s)
    prepared = [prepare_post(url, body) for body in payloads]
    rows = []
    try:
        for index in range(warmup + requests):
            started = time.perf_counter()
            try:
                status, body = connection.send(prepared[index % len(prepared)])
            except HttpError as err:
                raise RuntimeError(f"lone request {index + 1} to {url} failed: {err}") from None
            client_ms = (time.perf_counter() - started) * 1000
            if status != 200:
                raise RuntimeError(f"lone request answered {status}: {body[:200]!r}")
            timings = json.loads(body)["results"][0]["timings"]
            if index >= warmup:
                rows.append((client_ms, timings["total_ms"], timings["queue_ms"], timings["inference_ms"],
                             timings.get("preprocess_ms")))
    finally:
        connection.close()
    client, server, queue, inference = (median(r[k] for r in rows) for k in range(4))
    preprocess_known = all(r[4] is not None for r in rows)
    return {"requests": len(rows), "client_p50_ms": client, "server_p50_ms": server, "queue_p50_ms": queue,
            "inference_p50_ms": inference,
            "served_preprocess_p50_ms": median(r[4] for r in rows) if preprocess_known else None,
            "http_ms": client - server, "preprocess_and_handoffs_ms": server - queue - inference,
            "overhead_p50_ms": median(r[0] - r[4] - r[3] for r in rows) if preprocess_known else None}
