"""Closing engines: a close queued behind a batch still running, and the engine a build was making when it was given
up on, each run once the call before them returns (nothing waits for them); a closed engine that cannot describe
itself does not break the rebuild that replaces it.

In-process ModelManager over the real model repository; the engine is a stand-in whose calls the test holds, as a slow
or stuck device would.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from runtime.engines.base import Engine, EngineDescription, EngineError
from service.batcher import BatchFailedError
from service.engine_builds import ReloadRefused
from service.metrics import ServiceMetrics
from service.model_manager import ModelManager
from service.settings import Settings


class StandInEngine(Engine):
    """Zero logits for the atto model (3 x 64 x 64 -> 10 classes). Once `hold` is set each batch waits for `release`;
    with `load_gate` set, load() waits for it to open; `failing` fails every batch. Records close()."""

    def __init__(self, load_gate: threading.Event | None = None):
        self.hold, self.release, self.running = threading.Event(), threading.Event(), threading.Event()
        self.load_gate, self.loading, self.closed = load_gate, threading.Event(), threading.Event()
        self.failing = False

    def load(self) -> None:
        self.loading.set()
        if self.load_gate is not None:
            self.load_gate.wait(30)

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.failing:
            raise RuntimeError("simulated device fault")
        if self.hold.is_set():
            self.running.set()
            self.release.wait(30)
        return np.zeros((len(batch), 10), np.float32)

    def describe(self) -> EngineDescription:
        return EngineDescription("stand-in", "input", (3, 64, 64), 8, "fp32", "cpu")

    def close(self) -> None:
        self.closed.set()


def manager_for(repository, engines: list[StandInEngine], **overrides) -> ModelManager:
    """A ModelManager over `repository` whose factory hands out `engines` in order."""
    settings = Settings(repository=str(repository), grpc_port=0, warmup_runs=0, **overrides)
    handed = iter(engines)
    return ModelManager(settings, ServiceMetrics(), lambda version, settings: next(handed))


def image() -> list[np.ndarray]:
    return [np.zeros((3, 64, 64), np.float32)]


def test_an_engine_still_running_a_batch_at_shutdown_is_closed_once_that_batch_returns(model_repository):
    """The batch outlasts the drain and the close's wait (2 x engine_timeout_ms) without timing out: the close is left
    queued, not cancelled, so it runs when the batch returns (a cancelled close never ran: TensorRT leaked memory)."""
    engine = StandInEngine()

    async def scenario():
        manager = manager_for(model_repository, [engine], engine_timeout_ms=1000)
        await manager.start()
        engine.hold.set()
        manager.running_batcher.submit(image(), time.monotonic() + 30)
        assert await asyncio.to_thread(engine.running.wait, 5)
        await manager.stop(drain_timeout_s=0.05)
        closed_under_the_batch = engine.closed.is_set()
        engine.release.set()
        return closed_under_the_batch, await asyncio.to_thread(engine.closed.wait, 5)

    closed_under_the_batch, closed_after = asyncio.run(scenario())
    assert not closed_under_the_batch and closed_after


def test_the_engine_a_rebuild_was_loading_when_the_service_stopped_is_closed_once_its_load_returns(model_repository):
    """The service stops while a rebuild's load is stuck: nothing waits for it, and the engine it makes once it returns
    is closed on its own thread instead of being left loaded."""
    load_gate = threading.Event()
    first, rebuilt = StandInEngine(), StandInEngine(load_gate)

    async def scenario():
        manager = manager_for(model_repository, [first, rebuilt], engine_max_consecutive_failures=1)
        await manager.start()
        first.failing = True  # one failed batch breaks it: the manager rebuilds it
        (item,) = manager.running_batcher.submit(image(), time.monotonic() + 30)
        with pytest.raises(BatchFailedError):
            await item.future
        assert await asyncio.to_thread(rebuilt.loading.wait, 5)
        await manager.stop(drain_timeout_s=0.05)
        closed_while_loading = rebuilt.closed.is_set()
        load_gate.set()
        return closed_while_loading, await asyncio.to_thread(rebuilt.closed.wait, 5)

    closed_while_loading, closed_after = asyncio.run(scenario())
    assert not closed_while_loading and closed_after and first.closed.is_set()


class DescribedWhileOpen(StandInEngine):
    """Cannot describe itself once closed, as an engine that reads its description from what close() frees."""

    def describe(self) -> EngineDescription:
        if self.closed.is_set():
            raise EngineError("the engine is not loaded; call load() first")
        return super().describe()


def test_a_rebuild_completes_when_the_closed_engine_it_replaces_cannot_describe_itself(model_repository):
    """convnext_model_info is updated from the labels it set, not from the replaced engine: describing the closed
    one raised after the swap and ended the rebuild with an error."""
    load_gate = threading.Event()
    first, rebuilt = DescribedWhileOpen(), DescribedWhileOpen(load_gate)

    async def scenario():
        manager = manager_for(model_repository, [first, rebuilt], engine_max_consecutive_failures=1)
        await manager.start()
        first.failing = True
        (item,) = manager.running_batcher.submit(image(), time.monotonic() + 30)
        with pytest.raises(BatchFailedError):
            await item.future
        assert await asyncio.to_thread(first.closed.wait, 5)
        load_gate.set()  # the rebuild goes on once the broken engine is closed
        recovery = manager._recovery
        await asyncio.wait_for(asyncio.wait({recovery}), 10)
        info = [sample.labels for metric in manager.metrics.model_info.collect() for sample in metric.samples]
        serving = manager.running_batcher.served
        await manager.stop(drain_timeout_s=0.05)
        return recovery.exception(), info, serving

    error, info, serving = asyncio.run(scenario())
    assert error is None and serving is not None and serving.engine is rebuilt
    assert info == [{"name": "atto", "version": "1", "engine": "stand-in", "precision": "fp32"}]


class FailsOnRelease(StandInEngine):
    """Once `hold` is set, a batch waits for `release`, then fails (a device fault during the shutdown's drain)."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        if not self.hold.is_set():
            return super().run(batch)
        self.running.set()
        self.release.wait(30)
        raise RuntimeError("simulated device fault")


def test_an_engine_that_breaks_during_the_shutdown_drain_is_closed_and_not_rebuilt(model_repository):
    """stop() has cancelled any recovery when the drain's last batch breaks the engine: a rebuild started then
    outlived stop() (a TensorRT build the exiting process then killed) and overwrote "shutting down" on /readyz."""
    broken, spare = FailsOnRelease(), StandInEngine()

    async def scenario():
        manager = manager_for(model_repository, [broken, spare], engine_max_consecutive_failures=1)
        await manager.start()
        broken.hold.set()
        (item,) = manager.running_batcher.submit(image(), time.monotonic() + 30)
        assert await asyncio.to_thread(broken.running.wait, 5)
        stopping = asyncio.create_task(manager.stop(drain_timeout_s=10))
        await asyncio.sleep(0)  # stop() runs up to the drain's first wait
        broken.release.set()
        with pytest.raises(BatchFailedError):
            await item.future
        await stopping
        return manager._recovery, manager.not_ready_reason

    recovery, reason = asyncio.run(scenario())
    assert broken.closed.is_set() and not spare.loading.is_set() and recovery is None
    assert reason == "the service is shutting down"


async def reload_waiting_in_swap(repository, old: StandInEngine, new: StandInEngine):
    """A started manager serving `old`, which holds a batch, and a reload to `new` built and served, waiting in swap()
    for that batch: (the manager, the reload's task)."""
    manager = manager_for(repository, [old, new])
    await manager.start()
    old.hold.set()
    manager.running_batcher.submit(image(), time.monotonic() + 30)
    assert await asyncio.to_thread(old.running.wait, 5)
    reload = asyncio.create_task(manager.reload(1))
    deadline = time.monotonic() + 30
    while manager.running_batcher.served.engine is not new and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return manager, reload


def test_a_reload_cancelled_while_the_old_engine_finishes_its_batch_leaves_both_engines_to_stop(model_repository):
    """uvicorn's graceful-shutdown timeout cancels an /admin/reload waiting in swap() for the old engine's last
    batch: the batcher serves the new engine already, so it is current, and the old one closes behind its batch;
    neither was closed before (the manager still named the old one, which the batcher no longer served)."""
    old, new = StandInEngine(), StandInEngine()

    async def scenario():
        manager, reload = await reload_waiting_in_swap(model_repository, old, new)
        reload.cancel()
        await asyncio.gather(reload, return_exceptions=True)
        old.release.set()
        await manager.stop(drain_timeout_s=5)
        return (await asyncio.to_thread(old.closed.wait, 5)), new.closed.is_set()

    assert asyncio.run(scenario()) == (True, True)


def test_a_reload_once_the_shutdown_has_begun_is_refused_and_swaps_nothing_in(model_repository):
    """Nothing would close an engine swapped into the drained batcher."""
    first, spare = StandInEngine(), StandInEngine()

    async def scenario():
        manager = manager_for(model_repository, [first, spare])
        await manager.start()
        await manager.stop(drain_timeout_s=5)
        with pytest.raises(ReloadRefused) as refused:
            await manager.reload(1)
        return refused.value

    refused = asyncio.run(scenario())
    assert (refused.status, refused.code) == (503, "shutting_down")
    assert first.closed.is_set() and not spare.loading.is_set()


def test_a_stop_while_a_reload_waits_for_the_old_engines_batch_closes_both_engines(model_repository):
    """The reload is not cancelled: the batcher serves the new engine, the manager still names the old one. stop()
    closes the one the batcher serves (it closed neither: the new engine was left open), the reload the old one."""
    old, new = StandInEngine(), StandInEngine()

    async def scenario():
        manager, reload = await reload_waiting_in_swap(model_repository, old, new)
        await manager.stop(drain_timeout_s=0.2)
        old.release.set()
        await asyncio.gather(reload, return_exceptions=True)
        return await asyncio.to_thread(old.closed.wait, 5), await asyncio.to_thread(new.closed.wait, 5)

    assert asyncio.run(scenario()) == (True, True)
