"""/metrics renders: never stale (each scrape gets a render that started after it arrived), shared by the scrapes that
wait for the same one, and at most one every METRICS_RENDER_INTERVAL_S, so a flood of open scrapes cannot take the
event loop (a render is ~4 ms of it)."""
from __future__ import annotations

import asyncio
import time

from service.metrics import METRICS_RENDER_INTERVAL_S, ServiceMetrics


def test_a_burst_of_scrapes_shares_one_render_and_the_next_waits_its_turn():
    metrics = ServiceMetrics()

    async def scrape_twice() -> tuple[list[bytes], list[bytes], float]:
        first = await asyncio.gather(*(metrics.rendered() for _ in range(50)))
        started = time.monotonic()
        second = await asyncio.gather(*(metrics.rendered() for _ in range(50)))
        return first, second, time.monotonic() - started

    first, second, waited_s = asyncio.run(scrape_twice())
    assert metrics.renders == 2
    assert len(set(first)) == 1 and len(set(second)) == 1
    assert waited_s >= METRICS_RENDER_INTERVAL_S * 0.9


def test_a_scrape_sees_what_happened_before_it_arrived():
    """The change made between two scrapes is in the second, even when the first render was moments ago."""
    metrics = ServiceMetrics()

    async def scrape_around_a_change() -> tuple[bytes, bytes]:
        before = await metrics.rendered()
        metrics.images.labels("atto").inc(7)
        return before, await metrics.rendered()

    before, after = asyncio.run(scrape_around_a_change())
    assert b'convnext_images_total{model="atto"} 7.0' not in before
    assert b'convnext_images_total{model="atto"} 7.0' in after


def test_a_scrape_that_leaves_does_not_cancel_the_render_the_others_wait_for():
    metrics = ServiceMetrics()

    async def one_leaves() -> bytes:
        await metrics.rendered()  # the next render has to wait its turn
        leaving = asyncio.ensure_future(metrics.rendered())
        staying = asyncio.ensure_future(metrics.rendered())
        await asyncio.sleep(0)
        leaving.cancel()
        return await staying

    assert b"convnext_queue_depth" in asyncio.run(one_leaves())
    assert metrics.renders == 2
