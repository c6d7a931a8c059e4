"""Dynamic batcher: gather queued images into one engine batch, run it off the event loop, scatter results."""
from __future__ import annotations

import asyncio
import functools
import logging
import queue
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from runtime.engines.base import Engine
from runtime.repository import ModelVersion
from service.metrics import ServiceMetrics

logger = logging.getLogger("convnext.service")


class QueueFullError(Exception):
    """The queue cannot take the images now; the client should retry later (503)."""


class DeadlineError(Exception):
    """The image's deadline passed before it reached the engine (504)."""


class BatchFailedError(Exception):
    """The engine failed on the batch this image was in (500)."""


class EngineTimeoutError(Exception):
    """The engine did not finish this image's batch within engine_timeout_ms (504); the engine is reloaded."""


class EngineThread:
    """The daemon threads that run one engine's calls: one by default (the engine is not re-entrant), or as many as
    the engine runs batches at once (Engine.max_concurrent_batches).

    Daemon threads, not a ThreadPoolExecutor: a hung engine call is abandoned and must not block the process from
    exiting (executor workers are joined at interpreter exit).
    """

    def __init__(self, name: str, workers: int = 1):
        self.name = name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._stopped = False
        self._unfinished = 0  # calls submitted and not yet finished: submit_last waits until it is the only one
        self._finished = threading.Condition()
        self._threads: list[threading.Thread] = []
        self.add_workers(workers)

    @property
    def workers(self) -> int:
        return len(self._threads)

    def add_workers(self, count: int) -> None:
        for _ in range(count):
            name = self.name if not self._threads else f"{self.name}.{len(self._threads)}"
            thread = threading.Thread(target=self._work, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        return self._put(fn, args, last=False)

    def submit_last(self, fn: Callable, *args) -> Future:
        """Run fn once every call submitted before it has finished (an engine's close), then let the threads end."""
        future = self._put(fn, args, last=True)
        self.stop()
        return future

    def stop(self) -> None:
        """Let the threads end after the calls already submitted (they are never joined)."""
        self._stopped = True
        for _ in self._threads:
            self._calls.put(None)

    def _put(self, fn: Callable, args: tuple, last: bool) -> Future:
        future: Future = Future()
        if self._stopped:
            future.set_exception(RuntimeError(f"{self.name} was stopped; its engine is no longer in use"))
            return future
        with self._finished:
            self._unfinished += 1
        self._calls.put((future, fn, args, last))
        return future

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args, last = call
            if last:  # the calls taken before it by the other threads finish first
                with self._finished:
                    self._finished.wait_for(lambda: self._unfinished == 1)
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as err:  # handed to the waiting coroutine, which decides what it means
                        future.set_exception(err)
            finally:
                with self._finished:
                    self._unfinished -= 1
                    self._finished.notify_all()


def fill_and_run(engine: Engine, buffer: np.ndarray, tensors: list[np.ndarray]) -> np.ndarray:
    """In the engine thread: copy the images into the batch buffer's first rows and run the engine on them."""
    rows = buffer[:len(tensors)]  # contiguous: the first rows of a C-ordered array
    for row, tensor in zip(rows, tensors, strict=True):
        if tensor.shape != row.shape:  # assignment would broadcast where np.stack refused
            raise ValueError(f"an image of shape {tensor.shape} in a batch of {row.shape} images")
        row[...] = tensor
    logits = engine.run(rows)
    # The buffer is reused by a later batch while these rows are still being read: never hand out a view of it.
    return logits.copy() if np.may_share_memory(logits, buffer) else logits


@dataclass(eq=False)
class ServedModel:
    """A loaded, warmed-up engine, the model version it runs, and the threads that run it."""

    engine: Engine
    name: str
    version: int
    thread: EngineThread
    model: ModelVersion | None = None  # the repository version (manifest: labels, preprocess), when served from one


@dataclass
class Item:
    tensor: np.ndarray
    deadline: float  # time.monotonic()
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)
    timings: dict = field(default_factory=dict)
    served_by: ServedModel | None = None  # the model whose engine ran this image's batch
    left_queue_at: float | None = None  # time.monotonic() when its wait ended: its batch started, or its request left


class Batcher:
    """Runs every batch on the current ServedModel; swap() replaces it between batches, never within one.

    Up to the engine's max_concurrent_batches batches run at once (one for most engines); the next batch is gathered
    when a slot is free, so it fills from what queued meanwhile. Each batch is copied into a reused float32 buffer
    (max_batch_size rows), not stacked anew. Batches of two engines never run at once: after a swap, the new engine
    starts once the previous one's batches are done.

    Health: a batch past engine_timeout_s, or max_consecutive_failures failed batches in a row, detaches the
    engine and calls on_broken(served, reason, detail); queued images then wait (up to their deadline) until
    a new model is swapped in.
    """

    def __init__(self, served: ServedModel, max_batch_size: int, max_queue_delay_ms: float, queue_size: int,
                 metrics: ServiceMetrics, *, engine_timeout_ms: float = 10_000.0, max_consecutive_failures: int = 5,
                 on_broken: Callable[[ServedModel, str, str], None] | None = None):
        self.served: ServedModel | None = served
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.engine_timeout_s = engine_timeout_ms / 1000.0
        self.max_consecutive_failures = max_consecutive_failures
        self.on_broken = on_broken
        self.queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=queue_size)
        self.metrics = metrics
        # Read at each scrape: set on events only, it kept its last value through an engine outage, when every
        # queued request had left with its 504.
        metrics.queue_depth.set_function(self.waiting)
        self._gathered: list[Item] = []  # a batch taken from the queue that waits for an engine or a slot
        self.task: asyncio.Task | None = None
        self.closing = False
        self.consecutive_failures = 0
        self._running: dict[asyncio.Task, ServedModel] = {}  # the batches in flight and the model running each
        # Models abandoned at an engine timeout: their batches block nothing, and they stay abandoned (their engine may
        # still be inside the hung call) for as long as anyone holds them; weak, so a dropped model is not kept here.
        self._hung: weakref.WeakSet[ServedModel] = weakref.WeakSet()
        self._buffers: list[np.ndarray] = []  # free batch buffers, (max_batch_size, C, H, W) float32
        self._has_engine = asyncio.Event()
        self._has_engine.set()

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
            self._drop_cancelled()  # a stalled engine leaves gone clients' images queued: their places count again
        if self.queue.maxsize - self.queue.qsize() < len(tensors):
            raise QueueFullError(f"the queue is full ({self.queue.qsize()}/{self.queue.maxsize} images waiting)")
        loop = asyncio.get_running_loop()
        items = [Item(t, deadline, loop.create_future()) for t in tensors]
        for item in items:
            # A wait that ends without a batch (a 504 at the deadline, a client gone, often through an engine stall)
            # is observed when the request stops waiting, not when the batcher later drops its place in the queue:
            # those are the longest waits, and the batcher may not look at them for as long as the engine is away.
            item.future.add_done_callback(functools.partial(self._item_done, item))
            self.queue.put_nowait(item)
        return items

    def _item_done(self, item: Item, _: asyncio.Future) -> None:
        """Its future is done: answered, or its request stopped waiting (deadline, client gone, shutdown)."""
        self._left_queue(item, time.monotonic())

    def _left_queue(self, item: Item, at: float) -> None:
        """The image's wait is over (its batch starts, or its request stopped waiting): convnext_queue_wait_seconds,
        once per image, whichever comes first."""
        if item.left_queue_at is None:
            item.left_queue_at = at
            self.metrics.queue_wait.observe(at - item.enqueued_at)

    def waiting(self) -> int:
        """Images waiting for the engine (convnext_queue_depth, read at each scrape, on the event loop): those queued
        or in the batch being gathered or waiting for an engine or a slot, whose clients are still there (through an
        outage nothing is submitted, so gone clients' places stay queued until the engine is back)."""
        queued = self.queue._queue  # type: ignore[attr-defined]  # asyncio.Queue's deque, read on its own loop
        return sum(not item.future.done() for item in (*queued, *self._gathered))

    def _drop_cancelled(self) -> None:
        """Take the items already answered (a disconnect, a request's timeout) out of the queue, keeping the order."""
        waiting = [self.queue.get_nowait() for _ in range(self.queue.qsize())]
        for item in waiting:
            if not item.future.done():
                self.queue.put_nowait(item)

    async def swap(self, served: ServedModel) -> ServedModel | None:
        """Serve `served` from the next batch on; returns the previous model once its last batch has finished."""
        previous, self.served = self.served, served
        self.consecutive_failures = 0
        self._has_engine.set()
        previous_batches = [task for task, model in self._running.items()
                            if model is not served and model not in self._hung]
        if previous_batches:  # batches taken by the previous engine finish on it (asyncio.wait never cancels them)
            await asyncio.wait(previous_batches)
        return previous

    async def _gather(self) -> list[Item]:
        """The next batch; held in _gathered from its first image on (convnext_queue_depth counts it)."""
        batch = self._gathered = [await self.queue.get()]  # blocks while idle: no polling
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
            except TimeoutError:
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
                # Counted once, by the request that answers 504 deadline (not here once per image as well).
                item.future.set_exception(DeadlineError("the request deadline passed while queued"))
                continue
            live.append(item)
        return live

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._free_slot()  # a batch gathered now fills from everything queued while the slots were busy
            batch = await self._gather()
            # While the engine is being reloaded the batch waits for the new one, and for a slot on it (a swap during
            # the gather may have brought an engine with fewer slots); checked again after every wait.
            while self.served is None or self._blocking():
                await self._has_engine.wait()
                await self._free_slot()
            self._gathered = []
            batch = self._live(batch)
            if not batch:
                continue
            served = self.served  # one model per batch: read once, here
            task = loop.create_task(self._run(batch, served), name="batch")
            self._running[task] = served
            task.add_done_callback(self._batch_finished)

    def _blocking(self) -> list[asyncio.Task]:
        """The batches in flight that the next one must wait for: a previous engine's, or all of them once the
        engine's slots are taken. Batches on an engine abandoned at a timeout wait for their own timeout only."""
        served = self.served
        running = {task: model for task, model in self._running.items()
                   if model not in self._hung and not task.done()}
        previous = [task for task, model in running.items() if model is not served]
        if previous:
            return previous
        slots = min(served.engine.max_concurrent_batches, served.thread.workers) if served is not None else 1
        return list(running) if len(running) >= slots else []

    async def _free_slot(self) -> None:
        while blocking := self._blocking():
            await asyncio.wait(blocking, return_when=asyncio.FIRST_COMPLETED)

    def _batch_finished(self, task: asyncio.Task) -> None:
        self._running.pop(task)  # a hung model stays in _hung: its engine may still be inside the abandoned call

    def _take_buffer(self, image_shape: tuple[int, ...]) -> np.ndarray:
        while self._buffers:
            buffer = self._buffers.pop()
            if buffer.shape[1:] == image_shape:
                return buffer
        return np.empty((self.max_batch_size, *image_shape), dtype=np.float32)

    async def _run(self, batch: list[Item], served: ServedModel) -> None:
        started = time.monotonic()
        for item in batch:
            item.timings["queue_ms"] = (started - item.enqueued_at) * 1000
            item.served_by = served
            self._left_queue(item, started)
        buffer = self._take_buffer(batch[0].tensor.shape)
        bound = asyncio.timeout(self.engine_timeout_s)  # cheaper than wait_for on the event loop
        try:
            call = served.thread.submit(fill_and_run, served.engine, buffer, [item.tensor for item in batch])
            async with bound:
                logits = await asyncio.wrap_future(call)
            if logits.shape[0] != len(batch):
                raise RuntimeError(f"engine returned {logits.shape[0]} rows for a batch of {len(batch)}")
        except TimeoutError as err:
            if not bound.expired():  # the engine's own TimeoutError (socket.timeout is one): a failed batch
                self._engine_call_ended(batch, started, "failed")
                self._failed(batch, buffer, served, err)
                return
            self._engine_call_ended(batch, started, "timeout")
            # The hung call may still read its buffer: it is not reused.
            detail = (f"the engine did not finish a batch of {len(batch)} within {self.engine_timeout_s * 1000:.0f} "
                      f"ms (engine_timeout_ms); it is being reloaded, retry shortly")
            self._hung.add(served)
            self._fail(batch, EngineTimeoutError(detail))
            self._detach(served, "engine_timeout", detail)
            return
        except Exception as err:  # any engine failure fails this batch only; the loop keeps serving
            self._engine_call_ended(batch, started, "failed")
            self._failed(batch, buffer, served, err)
            return
        elapsed = self._engine_call_ended(batch, started, "ok")
        self._buffers.append(buffer)
        if served is self.served:
            self.consecutive_failures = 0
        finite = np.isfinite(logits).all(axis=1)
        for item, row, row_is_finite in zip(batch, logits, finite, strict=True):
            item.timings["inference_ms"] = elapsed * 1000
            item.timings["batch_size"] = len(batch)
            if item.future.done():
                continue
            if row_is_finite:
                item.future.set_result(row)
            else:  # that image only (fp16 overflow on one input, say): the others in its batch are answered
                item.future.set_exception(BatchFailedError("inference failed: the engine returned values that are "
                                                           "not finite numbers (NaN or inf) for this image"))

    def _engine_call_ended(self, batch: list[Item], started: float, outcome: str) -> float:
        """convnext_inference_seconds{outcome} and convnext_batch_size for every engine call, however it ended (a
        failing or hung engine shows in them too); the seconds since `started`."""
        elapsed = time.monotonic() - started
        self.metrics.inference.labels(outcome).observe(elapsed)
        self.metrics.batch_size.observe(len(batch))
        return elapsed

    def _failed(self, batch: list[Item], buffer: np.ndarray, served: ServedModel, err: Exception) -> None:
        """The engine raised on this batch: it fails, and enough failures in a row detach the engine."""
        self._buffers.append(buffer)  # the call has finished with it
        # The engine's own words (paths, node names, driver messages) go to the operator's log, not to clients;
        # the incident id ties the two together.
        incident = secrets.token_hex(4)
        logger.error("inference failed on a batch of %d, incident %s: %s: %s", len(batch), incident,
                     type(err).__name__, err, exc_info=err)
        self._fail(batch, BatchFailedError(f"inference failed on this image's batch (incident {incident}: the "
                                           "service log has the engine's error)"))
        if served is not self.served:
            return  # a swapped-out engine's last batch: its failures say nothing of the engine now serving
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.max_consecutive_failures:
            self._detach(served, "consecutive_failures", f"{self.consecutive_failures} batches failed in a row, "
                         f"the last with {type(err).__name__} (incident {incident})")

    @staticmethod
    def _fail(batch: list[Item], error: Exception) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    def abandoned(self, served: ServedModel) -> bool:
        """True once a batch on `served` hit engine_timeout_ms, and from then on (also after that batch's task has
        finished, e.g. before a swap returns): its engine may still be inside that call."""
        return served in self._hung

    def _detach(self, served: ServedModel, reason: str, detail: str) -> None:
        """Stop using a broken engine: later batches wait until swap() brings a new one."""
        if self.served is not served:
            return  # already replaced
        self.served = None
        self._has_engine.clear()
        if self.on_broken is not None:
            self.on_broken(served, reason, detail)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Stop taking new work, let queued and running batches finish, then stop the loop."""
        self.closing = True
        end = time.monotonic() + timeout_s
        while self.alive and ((self.served is not None and not self.queue.empty()) or self._running) \
                and time.monotonic() < end:
            await asyncio.sleep(0.01)  # shutdown only: a short wait for the last batches
        for task in [self.task, *self._running]:  # batches still running past the timeout are given up
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # the loop had already died; its error was visible through /readyz
                pass
