"""The batcher with engines that run several batches at once: slots, the hand-over between engines, buffers."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from runtime.engines.base import Engine
from service.batcher import (
    Batcher,
    BatchFailedError,
    EngineThread,
    EngineTimeoutError,
    ServedModel,
)
from service.metrics import ServiceMetrics
from tests.service.test_batcher import RecordingEngine, hold_first_batch, run, served, tensors


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


def test_images_of_different_shapes_fail_their_batch_instead_of_broadcasting(caplog):
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
    assert all(isinstance(r, BatchFailedError) and "incident" in str(r) for r in results)
    assert any("an image of shape (1, 2, 2)" in record.getMessage() for record in caplog.records)  # in the log


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
        # Each step below has 1.5-2.5 s of room for a pause of the machine: the second batch starts 1.5 s before the
        # first times out, the swap gets 2 s where waiting for the second batch would take 2.5, and the fresh
        # engine answers within the 2.5 s the second batch still runs.
        batcher = Batcher(concurrent_served(hung), max_batch_size=4, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics(), engine_timeout_ms=4000)
        batcher.start()
        (first,) = batcher.submit(tensors(1), time.monotonic() + 30)  # never released: the engine hangs
        await asyncio.sleep(2.5)
        (second,) = batcher.submit(tensors(2), time.monotonic() + 30)  # in the second slot, times out 2.5 s later
        with pytest.raises(EngineTimeoutError):
            await asyncio.wait_for(first.future, 10)
        # No wait for the hung engine's other batch: waiting for it would take until it times out, ~2.5 s from here.
        await asyncio.wait_for(batcher.swap(served(fresh, 2)), 2.0)
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


def test_an_engine_whose_batch_times_out_while_a_swap_waits_for_it_stays_abandoned():
    """The swap waits for the old engine's batch, which then hits engine_timeout_ms: once that batch's task is done the
    engine is still abandoned (the hung call may still be inside it), so its close is not queued and waited for."""
    async def scenario():
        old = RecordingEngine()
        batcher = Batcher(served(old, 1), max_batch_size=4, max_queue_delay_ms=1, queue_size=32,
                          metrics=ServiceMetrics(), engine_timeout_ms=200)
        batcher.start()
        (taken,) = await hold_first_batch(batcher, old)  # the old engine's call hangs (its gate stays shut)
        previous = await asyncio.wait_for(batcher.swap(served(RecordingEngine(), 2)), 5)
        with pytest.raises(EngineTimeoutError):
            await taken.future
        abandoned = batcher.abandoned(previous)
        old.gate.set()
        await batcher.drain()
        return previous.version, abandoned, batcher._running

    version, abandoned, running = run(scenario())
    assert version == 1 and running == {} and abandoned
