"""Dynamic batcher: gather queued images into one engine batch, run it off the event loop, scatter results."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.engines.base import Engine
from service.metrics import ServiceMetrics


class QueueFullError(Exception):
    """The queue cannot take the images now; the client should retry later (503)."""


class DeadlineError(Exception):
    """The image's deadline passed before it reached the engine (504)."""


class BatchFailedError(Exception):
    """The engine failed on the batch this image was in (500)."""


@dataclass
class Item:
    tensor: np.ndarray
    deadline: float  # time.monotonic()
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)
    timings: dict = field(default_factory=dict)


class Batcher:
    def __init__(self, engine: Engine, model_name: str, max_batch_size: int, max_queue_delay_ms: float,
                 queue_size: int, metrics: ServiceMetrics):
        self.engine = engine
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=queue_size)
        self.metrics = metrics
        self.task: asyncio.Task | None = None
        self.closing = False
        self._busy = False
        # One worker thread: the engine is not re-entrant, and batches must not overtake each other.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    def submit(self, tensors: list[np.ndarray], deadline: float) -> list[Item]:
        """Enqueue every image of a request or none of them (all-or-nothing so a 503 leaves nothing behind)."""
        if self.closing or not self.alive:
            raise QueueFullError("the service is shutting down or its batcher is not running")
        if self.queue.maxsize - self.queue.qsize() < len(tensors):
            raise QueueFullError(f"the queue is full ({self.queue.qsize()}/{self.queue.maxsize} images waiting)")
        loop = asyncio.get_running_loop()
        items = [Item(t, deadline, loop.create_future()) for t in tensors]
        for item in items:
            self.queue.put_nowait(item)
        self.metrics.queue_depth.set(self.queue.qsize())
        return items

    async def _gather(self) -> list[Item]:
        batch = [await self.queue.get()]  # blocks while idle: no polling
        while len(batch) < self.max_batch_size and not self.queue.empty():
            batch.append(self.queue.get_nowait())  # take what is already queued first
        if len(batch) == 1:
            return batch  # a lone request goes at once
        # More were waiting, so requests are arriving: hold the batch open while they keep coming.
        close_at = time.monotonic() + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
            while len(batch) < self.max_batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
        return batch

    def _live(self, batch: list[Item]) -> list[Item]:
        """Drop items whose client went away, fail those past their deadline."""
        now = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():  # cancelled by a disconnect or a timed-out request
                continue
            if now > item.deadline:
                item.future.set_exception(DeadlineError("the request deadline passed while queued"))
                self.metrics.rejected.labels("deadline").inc()
                continue
            live.append(item)
        return live

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            self._busy = True
            try:
                self.metrics.queue_depth.set(self.queue.qsize())
                batch = self._live(batch)
                if batch:
                    await self._run(loop, batch)
            finally:
                self._busy = False

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Item]) -> None:
        started = time.monotonic()
        for item in batch:
            item.timings["queue_ms"] = (started - item.enqueued_at) * 1000
            self.metrics.queue_wait.observe(started - item.enqueued_at)
        try:
            stacked = np.stack([item.tensor for item in batch])
            logits = await loop.run_in_executor(self._executor, self.engine.run, stacked)
            if logits.shape[0] != len(batch):
                raise RuntimeError(f"engine returned {logits.shape[0]} rows for a batch of {len(batch)}")
        except Exception as err:  # any engine failure fails this batch only; the loop keeps serving
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatchFailedError(f"inference failed: {type(err).__name__}: {err}"))
            return
        elapsed = time.monotonic() - started
        self.metrics.inference.observe(elapsed)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.images.labels(self.model_name).inc(len(batch))
        for item, row in zip(batch, logits):
            item.timings["inference_ms"] = elapsed * 1000
            item.timings["batch_size"] = len(batch)
            if not item.future.done():
                item.future.set_result(row)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Stop taking new work, let queued and running batches finish, then stop the loop."""
        self.closing = True
        end = time.monotonic() + timeout_s
        while self.alive and (not self.queue.empty() or self._busy) and time.monotonic() < end:
            await asyncio.sleep(0.01)  # shutdown only: a short wait for the last batch
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            except Exception:  # the loop had already died; its error was visible through /readyz
                pass
        self._executor.shutdown(wait=True)
