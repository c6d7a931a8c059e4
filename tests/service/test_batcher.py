"""The dynamic batcher in-process: batching, order, dropped work, model swaps between batches, the engine watchdog."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from runtime.engines.base import Engine, EngineDescription
from service.batcher import (
    Batcher,
    BatchFailedError,
    DeadlineError,
    EngineThread,
    EngineTimeoutError,
    QueueFullError,
    ServedModel,
)
from service.metrics import ServiceMetrics


class RecordingEngine(Engine):
    """Logits = the first pixel of each image repeated; records each batch; can be held with a gate."""

    def __init__(self):
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()

    def load(self):
        pass

    def run(self, batch):
        self.gate.wait(10)
        self.batches.append([float(x) for x in batch[:, 0, 0, 0]])
        return np.repeat(batch[:, :1, 0, 0], 4, axis=1)

    def describe(self):
        return EngineDescription("recording", "input", (1, 1, 1), 8, "fp32", "cpu")


class FailingEngine(RecordingEngine):
    """Every batch raises, as a device error would."""

    def run(self, batch):
        raise RuntimeError("device error")


def served(engine: Engine, version: int = 1) -> ServedModel:
    return ServedModel(engine, "m", version, EngineThread("engine-test"))


def tensors(*values):
    return [np.full((1, 1, 1), v, np.float32) for v in values]


def run(coro):
    return asyncio.run(coro)


async def hold_first_batch(batcher: Batcher, engine: RecordingEngine, value: float = 0) -> list:
    """Submit a one-image request and hold `engine` on it, so the requests that follow queue up behind it."""
    engine.gate.clear()
    items = batcher.submit(tensors(value), time.monotonic() + 10)
    await asyncio.sleep(0.05)  # the batcher takes it to the engine, which waits at its gate
    return items


def test_lone_request_goes_at_once_even_with_a_long_delay():
    async def scenario():
        engine = RecordingEngine()
        batcher = Batcher(served(engine), max_batch_size=8, max_queue_delay_ms=60_000, queue_size=16,
                          metrics=ServiceMetrics())
        batcher.start()
        (item,) = batcher.submit(tensors(7), time.monotonic() + 10)
        row = await asyncio.wait_for(item.future, 5)  # would time out if the batch waited for the 60 s delay
        await batcher.drain()
        return engine.batches, row

    batches, row = run(scenario())
    assert batches == [[7.0]] and row[0] == 7.0


def test_queued_images_batch_together_in_order_across_batches():
    async def scenario():
        engine = RecordingEngine()
        batcher = Batcher(served(engine), max_batch_size=4, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics())
        batcher.start()
        first = await hold_first_batch(batcher, engine)
        items = batcher.submit(tensors(*range(1, 11)), time.monotonic() + 10)  # one request, 10 images
        engine.gate.set()
        rows = await asyncio.gather(*(i.future for i in first + items))
        await batcher.drain()
        return engine.batches, rows

    batches, rows = run(scenario())
    assert batches == [[0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0]]
    assert [r[0] for r in rows] == [float(v) for v in range(11)]


def test_cancelled_items_are_dropped_before_running_and_full_queue_refuses_whole_request():
    async def scenario():
        engine = RecordingEngine()
        batcher = Batcher(served(engine), max_batch_size=8, max_queue_delay_ms=1, queue_size=4,
                          metrics=ServiceMetrics())
        batcher.start()
        await hold_first_batch(batcher, engine)
        gone = batcher.submit(tensors(1, 2), time.monotonic() + 10)
        kept = batcher.submit(tensors(3), time.monotonic() + 10)
        with pytest.raises(QueueFullError):
            batcher.submit(tensors(4, 5), time.monotonic() + 10)  # 3 queued of 4: both or neither
        for item in gone:
            item.future.cancel()  # the client went away
        later = batcher.submit(tensors(6, 7), time.monotonic() + 10)  # their places are free again
        engine.gate.set()
        await kept[0].future
        await asyncio.gather(*(item.future for item in later))
        await batcher.drain()
        return engine.batches

    assert run(scenario()) == [[0.0], [3.0, 6.0, 7.0]]


def test_swap_happens_between_batches_and_the_taken_batch_finishes_on_the_old_engine():
    async def scenario():
        old, new = RecordingEngine(), RecordingEngine()
        batcher = Batcher(served(old, 1), max_batch_size=8, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics())
        batcher.start()
        taken = await hold_first_batch(batcher, old, 1)  # the old engine is busy with the first batch
        queued = batcher.submit(tensors(2, 3), time.monotonic() + 10)
        swap = asyncio.ensure_future(batcher.swap(served(new, 2)))
        await asyncio.sleep(0.05)
        swap_waited_for_old_batch = not swap.done()
        old.gate.set()
        previous = await swap
        await asyncio.gather(*(i.future for i in taken + queued))
        await batcher.drain()
        versions = [i.served_by.version for i in taken + queued]
        return old.batches, new.batches, previous, versions, swap_waited_for_old_batch

    old_batches, new_batches, previous, versions, waited = run(scenario())
    assert old_batches == [[1.0]] and new_batches == [[2.0, 3.0]]  # no batch mixes the two models
    assert versions == [1, 2, 2] and previous.version == 1 and waited


def test_a_batch_past_the_engine_timeout_fails_at_once_and_later_work_waits_for_a_new_engine():
    async def scenario():
        hung, fresh = RecordingEngine(), RecordingEngine()
        broken = []
        # 1 s: the hung call (held 10 s) still times out well before it returns, and the fresh engine's batch, under
        # the same timeout, has room for a pause of the machine (100 ms had none).
        batcher = Batcher(served(hung), max_batch_size=8, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics(), engine_timeout_ms=1000,
                          on_broken=lambda model, reason, detail: broken.append((model, reason)))
        batcher.start()
        hung.gate.clear()  # never released during the test: the engine call hangs
        (stuck,) = batcher.submit(tensors(1), time.monotonic() + 10)
        with pytest.raises(EngineTimeoutError, match="engine_timeout_ms"):
            await asyncio.wait_for(stuck.future, 5)
        (waiting,) = batcher.submit(tensors(2), time.monotonic() + 10)
        await asyncio.sleep(0.05)
        waited = not waiting.future.done()  # no engine: the image stays queued instead of failing
        await batcher.swap(served(fresh, 2))
        row = await asyncio.wait_for(waiting.future, 5)
        hung.gate.set()
        await batcher.drain()
        return broken, waited, row, waiting.served_by.version, fresh.batches

    broken, waited, row, version, fresh_batches = run(scenario())
    assert [reason for _, reason in broken] == ["engine_timeout"] and waited
    assert row[0] == 2.0 and version == 2 and fresh_batches == [[2.0]]


# TimeoutError: the engine's own (socket.timeout, concurrent.futures.TimeoutError are one), raised at once: a failed
# batch like any other, not the engine_timeout_ms hang that detached the engine on its first occurrence.
@pytest.mark.parametrize("error", [RuntimeError, TimeoutError])
def test_consecutive_failed_batches_detach_the_engine_but_one_failure_does_not(error):
    class FailingEngine(RecordingEngine):
        def run(self, batch):
            raise error("device error")

    async def scenario():
        broken = []
        batcher = Batcher(served(FailingEngine()), max_batch_size=8, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics(), max_consecutive_failures=3,
                          on_broken=lambda model, reason, detail: broken.append((reason, detail)))
        batcher.start()
        counts = []
        for value in range(3):
            (item,) = batcher.submit(tensors(value), time.monotonic() + 10)
            with pytest.raises(BatchFailedError, match="incident"):
                await item.future
            counts.append(len(broken))
        batcher.task.cancel()
        return counts, broken

    counts, broken = run(scenario())
    assert counts == [0, 0, 1]
    assert broken[0][0] == "consecutive_failures" and "3 batches failed in a row" in broken[0][1]
    assert f"the last with {error.__name__}" in broken[0][1]


def test_a_swapped_out_engines_last_failed_batch_does_not_count_against_the_new_engine():
    class HeldThenFailing(RecordingEngine):
        def run(self, batch):
            self.gate.wait(10)
            raise RuntimeError("device error")

    async def scenario():
        old, broken = HeldThenFailing(), []
        batcher = Batcher(served(old), max_batch_size=8, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics(), max_consecutive_failures=2,
                          on_broken=lambda model, reason, detail: broken.append(reason))
        batcher.start()
        old.gate.clear()
        (held,) = batcher.submit(tensors(0), time.monotonic() + 10)
        while not batcher._running:  # the batch is on the old engine
            await asyncio.sleep(0.001)
        swapped = asyncio.create_task(batcher.swap(served(RecordingEngine(), 2)))
        await asyncio.sleep(0)  # the swap has begun: the new engine serves, the old one's batch is still held
        old.gate.set()
        with pytest.raises(BatchFailedError, match="incident"):
            await held.future
        await swapped
        failures_after_swap = batcher.consecutive_failures
        (item,) = batcher.submit(tensors(1), time.monotonic() + 10)
        row = await asyncio.wait_for(item.future, 5)
        await batcher.drain()
        return failures_after_swap, row, broken

    failures_after_swap, row, broken = run(scenario())
    assert failures_after_swap == 0 and row[0] == 1.0 and broken == []


def test_readyz_goes_false_when_the_batcher_dies(model_repository, launch, real_photos):
    with launch(model_repository) as url:
        assert httpx.get(f"{url}/readyz").status_code == 200
        task = url.app.state.service.batcher.task
        task.get_loop().call_soon_threadsafe(task.cancel)  # the loop dies, as an unexpected bug would end it
        deadline = time.monotonic() + 10
        while not task.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert httpx.get(f"{url}/readyz").status_code == 503
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        response = httpx.post(f"{url}/classify", content=real_photos[0].read_bytes(),
                              headers={"content-type": "image/jpeg"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"


def test_an_image_whose_logits_are_not_finite_fails_alone_and_its_batch_mates_are_answered():
    async def scenario():
        engine = RecordingEngine()
        batcher = Batcher(served(engine), max_batch_size=4, max_queue_delay_ms=50, queue_size=16,
                          metrics=ServiceMetrics())
        batcher.start()
        engine.gate.clear()
        held = batcher.submit(tensors(0), time.monotonic() + 10)
        await asyncio.sleep(0.05)
        items = batcher.submit(tensors(1, float("nan"), 3), time.monotonic() + 10)  # one batch behind the held one
        engine.gate.set()
        outcomes = await asyncio.gather(*(item.future for item in held + items), return_exceptions=True)
        await batcher.drain()
        return outcomes, engine.batches, batcher.consecutive_failures

    outcomes, batches, failures = run(scenario())
    assert len(batches[1]) == 3  # the three ran together
    assert outcomes[1][0] == 1.0 and outcomes[3][0] == 3.0
    assert isinstance(outcomes[2], BatchFailedError) and "not finite" in str(outcomes[2])
    assert failures == 0  # an input's numbers, not an engine fault


def test_images_past_their_deadline_fail_without_being_counted_here():
    """A request answers 504 deadline once and is counted once (convnext_rejected_total{reason="deadline"}) where it
    is answered; the batcher counted each of its images again."""
    async def scenario():
        engine = RecordingEngine()
        metrics = ServiceMetrics()
        batcher = Batcher(served(engine), max_batch_size=8, max_queue_delay_ms=1, queue_size=16, metrics=metrics)
        batcher.start()
        held = await hold_first_batch(batcher, engine)
        late = batcher.submit(tensors(1, 2, 3), time.monotonic() + 0.01)  # expires behind the held batch
        await asyncio.sleep(0.05)
        engine.gate.set()
        outcomes = await asyncio.gather(*(item.future for item in late), return_exceptions=True)
        await asyncio.gather(*(item.future for item in held))
        await batcher.drain()
        return outcomes, metrics.rejected.labels("deadline")._value.get()

    outcomes, counted = run(scenario())
    assert all(isinstance(outcome, DeadlineError) for outcome in outcomes)
    assert counted == 0


def test_queue_depth_is_read_at_each_scrape_so_it_follows_the_queue_through_an_engine_outage():
    """Set on events only, the gauge kept its last value while the batcher waited for a new engine, as the waiting
    requests left with their 504s."""
    async def scenario():
        metrics = ServiceMetrics()

        def depth() -> float:
            return metrics.queue_depth.collect()[0].samples[0].value

        batcher = Batcher(served(FailingEngine()), max_batch_size=2, max_queue_delay_ms=1, queue_size=8,
                          metrics=metrics, max_consecutive_failures=1)
        batcher.start()
        (breaking,) = batcher.submit(tensors(0), time.monotonic() + 10)
        with pytest.raises(BatchFailedError):
            await breaking.future  # the engine is detached: a batch is gathered and waits for a new one
        items = batcher.submit(tensors(1, 2, 3), time.monotonic() + 10)
        submitted = depth()
        while batcher.queue.qsize() > 1:
            await asyncio.sleep(0.001)  # the loop takes a batch of 2 from the queue and waits for an engine
        gathered = depth()
        for item in items:
            item.future.cancel()  # their clients leave
        batcher.task.cancel()
        return submitted, gathered, depth(), batcher.queue.qsize()

    assert run(scenario()) == (3, 3, 0, 1)  # the queued one's place is taken back later; it no longer counts


def test_queue_depth_counts_a_batch_held_open_for_more_images():
    """A batch held open for max_queue_delay_ms has left the queue: it counted nowhere while it waited."""
    async def scenario():
        metrics = ServiceMetrics()
        batcher = Batcher(served(RecordingEngine()), max_batch_size=8, max_queue_delay_ms=60_000, queue_size=16,
                          metrics=metrics)
        batcher.start()
        batcher.submit(tensors(1, 2), time.monotonic() + 10)
        while not batcher.queue.empty():
            await asyncio.sleep(0.001)  # the batcher takes both and holds the batch open for more
        depth = metrics.queue_depth.collect()[0].samples[0].value
        batcher.task.cancel()
        return depth

    assert run(scenario()) == 2


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_each_images_queue_wait_is_observed_once_however_it_ends():
    """Its batch starting, its deadline passing in the queue (DeadlineError), its client leaving: each image's wait is
    observed once, when it ends (only images whose batch started were observed)."""
    async def scenario():
        engine, metrics = RecordingEngine(), ServiceMetrics()
        batcher = Batcher(served(engine), max_batch_size=8, max_queue_delay_ms=1, queue_size=16, metrics=metrics)
        batcher.start()
        held = await hold_first_batch(batcher, engine)
        (late,) = batcher.submit(tensors(1), time.monotonic() + 0.01)  # expires behind the held batch
        (gone,) = batcher.submit(tensors(2), time.monotonic() + 10)
        (ran,) = batcher.submit(tensors(3), time.monotonic() + 10)
        await asyncio.sleep(0.1)
        gone.future.cancel()  # its client leaves
        await asyncio.sleep(0)
        observed_while_held = sample(metrics, "convnext_queue_wait_seconds_count")
        gone_waited = gone.left_queue_at - gone.enqueued_at
        engine.gate.set()
        await asyncio.gather(*(item.future for item in held + [late, ran]), return_exceptions=True)
        await batcher.drain()
        return observed_while_held, gone_waited, late, ran, sample(metrics, "convnext_queue_wait_seconds_count")

    observed_while_held, gone_waited, late, ran, observed = run(scenario())
    assert observed_while_held == 2  # the held batch's image and the one whose client left
    assert 0.1 <= gone_waited < 1  # observed when it left, not when the batcher dropped its place
    assert isinstance(late.future.exception(), DeadlineError) and late.left_queue_at is not None
    assert ran.left_queue_at - ran.enqueued_at == pytest.approx(ran.timings["queue_ms"] / 1000)
    assert observed == 4


def test_queue_waits_that_end_while_the_engine_is_away_are_observed_then():
    """Through an engine outage the batcher looks at no queued image: a request that gives up meanwhile has its wait
    observed when it gives up, not once an engine is back (the histogram showed only the short waits)."""
    async def scenario():
        metrics = ServiceMetrics()
        batcher = Batcher(served(FailingEngine()), max_batch_size=1, max_queue_delay_ms=1, queue_size=8,
                          metrics=metrics, max_consecutive_failures=1)
        batcher.start()
        (breaking,) = batcher.submit(tensors(0), time.monotonic() + 10)
        with pytest.raises(BatchFailedError):
            await breaking.future  # the engine is detached
        items = batcher.submit(tensors(1, 2, 3), time.monotonic() + 10)
        await asyncio.sleep(0.2)
        for item in items:
            item.future.cancel()  # their requests give up (a deadline, a client gone)
        await asyncio.sleep(0)
        count = sample(metrics, "convnext_queue_wait_seconds_count")
        seconds = sample(metrics, "convnext_queue_wait_seconds_sum")
        batcher.task.cancel()
        return count, seconds

    count, seconds = run(scenario())
    assert count == 4 and seconds >= 3 * 0.2


def test_failed_and_timed_out_engine_calls_are_in_the_inference_and_batch_size_histograms():
    """convnext_inference_seconds{outcome} and convnext_batch_size see every engine call (only answered ones were)."""
    async def scenario():
        metrics = ServiceMetrics()
        failing = Batcher(served(FailingEngine()), max_batch_size=8, max_queue_delay_ms=1, queue_size=8,
                          metrics=metrics)
        failing.start()
        items = failing.submit(tensors(1, 2), time.monotonic() + 10)
        await asyncio.gather(*(item.future for item in items), return_exceptions=True)
        await failing.drain()
        hung = RecordingEngine()
        hung.gate.clear()  # released after the timeout
        hanging = Batcher(served(hung), max_batch_size=8, max_queue_delay_ms=1, queue_size=8, metrics=metrics,
                          engine_timeout_ms=200)
        hanging.start()
        (item,) = hanging.submit(tensors(3), time.monotonic() + 10)
        with pytest.raises(EngineTimeoutError):
            await item.future
        hung.gate.set()
        hanging.task.cancel()
        return metrics

    metrics = run(scenario())
    assert sample(metrics, "convnext_inference_seconds_count", outcome="failed") == 1
    assert sample(metrics, "convnext_inference_seconds_count", outcome="timeout") == 1
    assert sample(metrics, "convnext_inference_seconds_sum", outcome="timeout") >= 0.2
    assert sample(metrics, "convnext_inference_seconds_count", outcome="ok") == 0
    assert sample(metrics, "convnext_batch_size_count") == 2 and sample(metrics, "convnext_batch_size_sum") == 3


def test_only_images_answered_with_a_classification_are_counted():
    """convnext_images_total, through the pipeline's run_batched and count_classified, as each protocol calls them:
    not an image answered 500 for its own non-finite logits, nor its finite mate of the same request (the request is
    answered 500 as a whole: the batcher used to count it), nor one whose client left while its batch ran; a request
    answered in full counts each of its images."""
    from types import SimpleNamespace

    from service.errors import ApiError
    from service.pipeline import count_classified, run_batched

    async def outcome(state, request) -> int | str:
        try:
            items = await request
        except ApiError as err:
            return err.code
        count_classified(state, items)
        return len(items)

    async def scenario():
        engine, metrics = RecordingEngine(), ServiceMetrics()
        batcher = Batcher(served(engine), max_batch_size=4, max_queue_delay_ms=1, queue_size=16, metrics=metrics)
        state = SimpleNamespace(batcher=batcher, metrics=metrics, settings=SimpleNamespace(request_timeout_ms=10_000))
        batcher.start()
        engine.gate.clear()
        gone = asyncio.get_running_loop().create_future()
        deadline = time.monotonic() + 10
        requests = [asyncio.create_task(outcome(state, run_batched(state, tensors(*values), client, deadline)))
                    for values, client in (((1, float("nan")), None), ((3,), gone), ((5, 6), None))]
        while not batcher._running:
            await asyncio.sleep(0.001)  # a batch is on the engine, held at its gate
        gone.set_result(None)  # the second request's client leaves while its batch runs
        await asyncio.sleep(0.05)
        engine.gate.set()
        outcomes = await asyncio.gather(*requests)
        await batcher.drain()
        return outcomes, sample(metrics, "convnext_images_total", model="m")

    outcomes, counted = run(scenario())
    assert outcomes == ["inference_failed", "client_disconnected", 2]
    assert counted == 2  # 5 and 6: not 1 (its request's other image failed), nor the NaN, nor 3 (its client left)
