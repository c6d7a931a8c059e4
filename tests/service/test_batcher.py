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
        batcher = Batcher(served(hung), max_batch_size=8, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics(), engine_timeout_ms=100,
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


def test_consecutive_failed_batches_detach_the_engine_but_one_failure_does_not():
    class FailingEngine(RecordingEngine):
        def run(self, batch):
            raise RuntimeError("device error")

    async def scenario():
        broken = []
        batcher = Batcher(served(FailingEngine()), max_batch_size=8, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics(), max_consecutive_failures=3,
                          on_broken=lambda model, reason, detail: broken.append((reason, detail)))
        batcher.start()
        counts = []
        for value in range(3):
            (item,) = batcher.submit(tensors(value), time.monotonic() + 10)
            with pytest.raises(Exception, match="device error"):
                await item.future
            counts.append(len(broken))
        batcher.task.cancel()
        return counts, broken

    counts, broken = run(scenario())
    assert counts == [0, 0, 1]
    assert broken[0][0] == "consecutive_failures" and "3 batches failed in a row" in broken[0][1]


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
        with pytest.raises(BatchFailedError, match="device error"):
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


class ConcurrentEngine(RecordingEngine):
    """A RecordingEngine that runs `slots` batches at once; each call waits for its own gate, in call order."""

    def __init__(self, slots: int):
        super().__init__()
        self.max_concurrent_batches = slots
        self.lock = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.gates: list[threading.Event] = []

    def run(self, batch):
        gate = threading.Event()
        with self.lock:
            self.gates.append(gate)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.batches.append([float(x) for x in batch[:, 0, 0, 0]])
        gate.wait(10)
        with self.lock:
            self.running -= 1
        return np.repeat(batch[:, :1, 0, 0], 4, axis=1)

    async def release(self, count: int):
        """Wait until `count` calls have started, then let them finish."""
        for _ in range(500):
            if len(self.gates) >= count:
                break
            await asyncio.sleep(0.01)
        for gate in self.gates[:count]:
            gate.set()


async def eventually(condition, timeout_s: float = 5) -> bool:
    """Whether `condition()` holds within `timeout_s`, polled every 10 ms (the engine runs in its own threads)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def concurrent_served(engine: Engine, version: int = 1) -> ServedModel:
    return ServedModel(engine, "m", version, EngineThread("engine-test", workers=engine.max_concurrent_batches))


def test_up_to_max_concurrent_batches_run_at_once_and_the_next_fills_from_what_queued_meanwhile():
    async def scenario():
        engine = ConcurrentEngine(slots=2)
        batcher = Batcher(concurrent_served(engine), max_batch_size=4, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics())
        batcher.start()
        first = batcher.submit(tensors(1), time.monotonic() + 10)  # a lone request goes at once
        first_running = await eventually(lambda: engine.running == 1)
        second = batcher.submit(tensors(2), time.monotonic() + 10)  # a second slot is free: it goes at once too
        both_running = await eventually(lambda: engine.running == 2)
        queued = batcher.submit(tensors(3, 4, 5), time.monotonic() + 10)  # no slot: waits, then goes as one batch
        await asyncio.sleep(0.05)  # time to start a third batch, which it must not (an absence: nothing to poll for)
        batches_while_full = list(engine.batches)
        await engine.release(2)
        await engine.release(3)
        rows = await asyncio.gather(*(i.future for i in first + second + queued))
        await batcher.drain()
        return first_running and both_running, batches_while_full, engine.batches, engine.most_running, rows

    both_running, while_full, batches, most_running, rows = run(scenario())
    assert both_running and while_full == [[1.0], [2.0]]
    assert batches == [[1.0], [2.0], [3.0, 4.0, 5.0]] and most_running == 2
    assert [r[0] for r in rows] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_a_new_engine_starts_only_once_every_batch_of_the_previous_one_is_done():
    async def scenario():
        old, new = ConcurrentEngine(slots=2), ConcurrentEngine(slots=2)
        batcher = Batcher(concurrent_served(old, 1), max_batch_size=4, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics())
        batcher.start()
        taken = batcher.submit(tensors(1), time.monotonic() + 10)
        await asyncio.sleep(0.05)
        taken += batcher.submit(tensors(2), time.monotonic() + 10)
        await asyncio.sleep(0.05)
        swap = asyncio.ensure_future(batcher.swap(concurrent_served(new, 2)))
        queued = batcher.submit(tensors(3), time.monotonic() + 10)
        await asyncio.sleep(0.05)
        new_idle_while_old_runs = (new.batches == [] and not swap.done())
        await old.release(1)
        await asyncio.sleep(0.05)
        new_idle_while_one_old_runs = (new.batches == [] and not swap.done())
        await old.release(2)
        await swap
        await new.release(1)
        await asyncio.gather(*(i.future for i in taken + queued))
        await batcher.drain()
        return new_idle_while_old_runs, new_idle_while_one_old_runs, [i.served_by.version for i in taken + queued]

    idle, idle_still, versions = run(scenario())
    assert idle and idle_still and versions == [1, 1, 2]


def test_batches_reuse_one_buffer_and_rows_survive_its_reuse():
    class ViewEngine(RecordingEngine):
        """Returns a view of its input, which the batcher must not hand out: the buffer is reused."""

        def __init__(self):
            super().__init__()
            self.addresses = []

        def run(self, batch):
            self.addresses.append(batch.__array_interface__["data"][0])
            assert batch.dtype == np.float32 and batch.flags.c_contiguous
            return batch[:, 0, 0]

    async def scenario():
        engine = ViewEngine()
        batcher = Batcher(served(engine), max_batch_size=4, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics())
        batcher.start()
        rows = []
        for value in (1, 2, 3):
            (item,) = batcher.submit([np.full((1, 1, 1), value, np.float64)], time.monotonic() + 10)
            rows.append(await item.future)
        await batcher.drain()
        return engine.addresses, rows

    addresses, rows = run(scenario())
    assert len(set(addresses)) == 1  # the same buffer every batch
    assert [float(r[0]) for r in rows] == [1.0, 2.0, 3.0]  # each row kept its value after the buffer was refilled


def test_images_of_different_shapes_fail_their_batch_instead_of_broadcasting():
    async def scenario():
        engine = RecordingEngine()
        batcher = Batcher(served(engine), max_batch_size=4, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics())
        batcher.start()
        await hold_first_batch(batcher, engine)
        mixed = batcher.submit([np.zeros((1, 1, 1), np.float32), np.zeros((1, 2, 2), np.float32)],
                               time.monotonic() + 10)
        engine.gate.set()
        results = await asyncio.gather(*(i.future for i in mixed), return_exceptions=True)
        await batcher.drain()
        return results

    results = run(scenario())
    assert all(isinstance(r, BatchFailedError) and "shape" in str(r) for r in results)


def test_submit_last_runs_after_the_calls_other_workers_are_still_running():
    threads = EngineThread("engine-test", workers=2)
    gate, order = threading.Event(), []
    running = threads.submit(lambda: (gate.wait(10), order.append("run")))
    time.sleep(0.05)
    closing = threads.submit_last(order.append, "close")
    time.sleep(0.1)
    close_waited = order == []
    gate.set()
    closing.result(5), running.result(5)
    assert close_waited and order == ["run", "close"]
    with pytest.raises(RuntimeError, match="was stopped"):
        threads.submit(order.append, "late").result(1)


def test_batches_still_on_a_hung_engine_do_not_hold_back_its_replacement():
    async def scenario():
        hung, fresh = ConcurrentEngine(slots=2), RecordingEngine()
        batcher = Batcher(concurrent_served(hung), max_batch_size=4, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics(), engine_timeout_ms=2000)
        batcher.start()
        (first,) = batcher.submit(tensors(1), time.monotonic() + 30)  # never released: the engine hangs
        await asyncio.sleep(1.5)
        (second,) = batcher.submit(tensors(2), time.monotonic() + 30)  # in the second slot, times out 1.5 s later
        with pytest.raises(EngineTimeoutError):
            await asyncio.wait_for(first.future, 10)
        # No wait for the hung engine's other batch: waiting for it would take until it times out, ~1.5 s from here.
        await asyncio.wait_for(batcher.swap(served(fresh, 2)), 1.0)
        (third,) = batcher.submit(tensors(3), time.monotonic() + 30)
        row = await asyncio.wait_for(third.future, 10)
        second_pending_meanwhile = not second.future.done()
        with pytest.raises(EngineTimeoutError):
            await asyncio.wait_for(second.future, 10)
        for gate in hung.gates:
            gate.set()
        await batcher.drain()
        return row, second_pending_meanwhile, fresh.batches

    row, second_pending, fresh_batches = run(scenario())
    assert row[0] == 3.0 and second_pending and fresh_batches == [[3.0]]


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
