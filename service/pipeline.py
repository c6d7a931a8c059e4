"""The request path every protocol shares: body -> admission -> preprocess -> batcher -> results.

`/classify` (routes.py), the Open Inference Protocol over HTTP (v2.py) and over gRPC are thin adapters over these
functions: each turns its own request into images or tensors, calls `classify` or `infer`, and turns the items (or the
ApiError raised here) into its own answer. Limits, admission, deadlines and the batcher are therefore the same for all.
"""
from __future__ import annotations

import asyncio
import functools
import threading
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import numpy as np
from prometheus_client import Histogram
from starlette.requests import ClientDisconnect, Request
from starlette.types import Scope

from runtime.preprocess import RGB_CHANNELS, ImageError, preprocess
from runtime.repository import ModelVersion, Preprocess
from service.admission import AdmissionRefused
from service.batcher import BatchFailedError, DeadlineError, EngineTimeoutError, Item, QueueFullError, ServedModel
from service.body_budget import count_copy
from service.decode_budget import DecodeWaitTimeout
from service.errors import ApiError, clipped, shown
from service.metrics import CLASSIFIED_SCOPE_KEY
from service.settings import Settings
from service.state import ServiceState

ZLIB_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # Content-Encoding -> zlib's window bits (gzip / zlib header)
T = TypeVar("T")
ClientGone = Callable[[], Awaitable[object]]  # completes when the client has left (HTTP disconnect, gRPC cancel)


def service_state(request: Request) -> ServiceState:
    return request.app.state.service


async def read_body(request: Request, state: ServiceState, max_bytes: int | None = None) -> bytes:
    """The HTTP body within max_bytes (default max_body_bytes), each chunk within body_timeout_s and the whole
    within body_deadline_s (413 / 408 otherwise)."""
    max_bytes = state.settings.max_body_bytes if max_bytes is None else max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "body_too_large", f"the body is {declared} bytes, over the limit of {max_bytes}")
    chunks, size = [], 0
    timeout_s, deadline_s = state.settings.body_timeout_s, state.settings.body_deadline_s
    stream = request.stream()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:  # each chunk in time: a client that stalls or trickles mid-body does not hold a slot forever
        try:
            # asyncio.timeout, not wait_for: no task per chunk (wait_for wraps the coroutine in one on Python 3.11)
            async with asyncio.timeout_at(min(loop.time() + timeout_s, deadline)):
                chunk = await anext(stream)
        except StopAsyncIteration:
            break
        except ClientDisconnect:  # it hung up mid-upload: its 499, not a 500 with a traceback in the log
            raise ApiError(499, "client_disconnected", "the client disconnected while sending its body") from None
        except TimeoutError:
            waited = f"no part of the request body arrived for {timeout_s:g} s" if loop.time() < deadline else \
                f"the request body did not arrive within {deadline_s:g} s"
            raise ApiError(408, "body_timeout", f"{waited}; send the whole body at once",
                           headers={"Connection": "close"}) from None
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body_too_large", f"the body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):  # tritonclient's request_compression_algorithm: gzip or deflate
        decoded = await asyncio.to_thread(decoded_body, body, encoding, max_bytes)
        count_copy(request.scope, len(decoded) - len(body))  # the wire bytes are counted: what decompressing added
        body = decoded
    return body


def decoded_body(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """The body with its Content-Encoding (gzip, deflate) undone, never more than max_bytes decompressed (a small
    compressed body can expand a thousandfold); 415 for another encoding, 400 for data that does not decompress."""
    wbits = ZLIB_WBITS.get(encoding)
    if wbits is None:
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {shown(encoding)} is not accepted; send the "
                       f"body as it is or as {' or '.join(ZLIB_WBITS)}")
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, max_bytes + 1)
    except zlib.error as err:
        raise ApiError(400, "invalid_body", f"the body is not {encoding} data ({err})") from None
    if len(data) > max_bytes:
        raise ApiError(413, "body_too_large", f"the body decompresses to over the limit of {max_bytes} bytes")
    if not decompressor.eof or decompressor.unused_data:
        raise ApiError(400, "invalid_body", f"the body is not one complete {encoding} stream")
    return data


def http_client_gone(request: Request) -> ClientGone:
    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait_for_disconnect


def require_ready(state: ServiceState) -> ModelVersion:
    """The served version, or 503 not_ready while there is none or its engine cannot run."""
    version = state.version
    if not state.is_ready or version is None:
        raise ApiError(503, "not_ready", f"not ready: {state.not_ready_reason} (see /readyz)",
                       headers={"Retry-After": "1"})
    return version


def queue_full(message: str) -> ApiError:
    return ApiError(503, "queue_full", message, headers={"Retry-After": "1"})


def refuse_when_full(state: ServiceState) -> None:
    """503 queue_full while not one more image fits: before work that comes ahead of counting the request's images in
    (a v2 request's conversion, after which alone its image count is known), so a full service spends none on it."""
    if state.admission.full:
        raise queue_full(state.admission.refusal())


@contextmanager
def admitted(state: ServiceState, images: int) -> Iterator[None]:
    """Count the request's images in before decoding; at capacity it is refused at once (503 + Retry-After); more
    images than the capacity itself never fit, so that is a 413, not a 503 a client would retry forever."""
    capacity = state.admission.capacity
    if images > capacity:
        raise ApiError(413, "too_many_images", f"{images} images in one request, over the service's capacity of "
                       f"{capacity} (queue_size + max_batch_size); send at most {capacity} per request")
    try:
        with state.admission.admit(images):
            yield
    except AdmissionRefused as err:
        raise queue_full(str(err)) from None


def timed_preprocess(data: bytes, spec: Preprocess, settings: Settings,
                     reserve: Callable[[int], AbstractContextManager[float]],
                     observed: Histogram | None = None) -> tuple[np.ndarray, float]:
    """In a decode-pool thread: the tensor and the seconds this image's decode + transform took there, observed in
    `observed` (convnext_preprocess_seconds) here, so a decode whose request stopped waiting for it (its deadline, its
    client gone) is counted too. `reserve` (the decode budget's) gives the seconds it waited for memory: that wait is
    left out, as it is other images' decoding, not this one's (the budget reports it:
    convnext_decode_memory_wait_seconds)."""
    waits: list[float] = []

    @contextmanager
    def reserve_noting_its_wait(nbytes: int) -> Iterator[None]:
        with reserve(nbytes) as waited_s:
            waits.append(waited_s)
            yield

    started = time.perf_counter()
    tensor = preprocess(data, spec, settings.max_pixels, settings.decode_mode, settings.fast_decode_headroom,
                        reserve_noting_its_wait)
    seconds = time.perf_counter() - started - sum(waits)
    if observed is not None:
        observed.observe(seconds)
    return tensor, seconds


async def preprocess_images(state: ServiceState, images: list[tuple[str, bytes]],
                            deadline: float) -> list[tuple[np.ndarray, float]]:
    """Decode + transform in the bounded thread pool, each image's peak memory reserved from the decode budget until
    `deadline`: (tensor, seconds) per image; the first bad image fails the request before enqueueing."""
    loop = asyncio.get_running_loop()
    spec = state.version.manifest.preprocess  # type: ignore[union-attr]  # callers check require_ready first

    async def one(name: str, data: bytes) -> tuple[np.ndarray, float]:
        async with state.preprocess_slots:
            abandoned = threading.Event()  # set if this request stops waiting: its thread stops waiting for memory
            reserve = functools.partial(state.decode_budget.reserved, deadline=deadline, abandoned=abandoned)
            try:
                tensor, seconds = await loop.run_in_executor(state.preprocess_pool, timed_preprocess, data, spec,
                                                             state.settings, reserve, state.metrics.preprocess)
            except ImageError as err:
                status = 413 if err.code == "too_many_pixels" else 400
                raise ApiError(status, err.code, f"{clipped(name)}: {err.message}") from None
            except DecodeWaitTimeout:
                raise deadline_passed(state) from None
            except asyncio.CancelledError:
                abandoned.set()
                state.decode_budget.wake()
                raise
            return tensor, seconds

    if len(images) == 1:  # the common case: no task for a gather of one
        return [await one(*images[0])]
    decodes = [asyncio.ensure_future(one(name, data)) for name, data in images]
    try:
        return list(await asyncio.gather(*decodes))
    finally:  # the first bad image answers the request: the images still waiting for a decode are not decoded
        for decode in decodes:
            decode.cancel()


@contextmanager
def watching(client_gone: ClientGone | None) -> Iterator[asyncio.Future[Any] | None]:
    """A task that completes when the client leaves, for the whole request. Started before decoding, its first step
    runs while the decode pool works, and its cancellation after the answer, both off a lone request's latency."""
    gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
    try:
        yield gone
    finally:
        if gone is not None:
            gone.cancel()


async def until_gone(work: Awaitable[T], gone: asyncio.Future[Any] | None, doing: str) -> T:
    """`work`'s result; if the client leaves first, `work` is cancelled (its decodes stop waiting for memory or a
    slot: preprocess_images; a conversion waiting for its slot is never started) and 499 raised, saying it left while
    `doing`."""
    if gone is None:
        return await work
    task = asyncio.ensure_future(work)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, if nobody else does
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the request's deadline (asyncio.timeout), or the server cancelling the handler
        task.cancel()
        raise
    if task.done():
        return task.result()
    task.cancel()
    raise ApiError(499, "client_disconnected", f"the client disconnected while {doing}")


async def within_deadline(state: ServiceState, work: Awaitable[T], gone: asyncio.Future[Any] | None, deadline: float,
                          doing: str) -> T:
    """until_gone(work), cancelled past `deadline` with 504 deadline (a wait for a decode slot or a conversion thread
    included)."""
    try:
        async with asyncio.timeout(deadline - time.monotonic()):
            return await until_gone(work, gone, doing)
    except TimeoutError:
        raise deadline_passed(state) from None


async def converted(state: ServiceState, convert: Callable[..., T], *args: Any, client_gone: ClientGone | None,
                    deadline: float) -> T:
    """`convert(*args)` (a large v2 request's parse and conversion) in the conversion pool, once there is room for an
    image (503 at once otherwise), within the request's deadline (504) and while its client waits (499); a conversion
    already running when either ends finishes in its thread, unused."""
    refuse_when_full(state)
    with watching(client_gone) as gone:
        return await within_deadline(state, converted_in_a_slot(state, convert, *args), gone, deadline,
                                     "its request was being converted")


async def converted_in_a_slot(state: ServiceState, convert: Callable[..., T], *args: Any) -> T:
    """`convert(*args)` in the conversion pool, handed to it once a conversion slot is held, so it never waits in the
    pool's queue (a job cancelled there stayed queued with its arguments, the request's body, until a thread took
    it); the slot is given back when the job ends in its thread (or is cancelled before it starts), not when this
    wait is cancelled: a conversion that runs on keeps its place."""
    await state.conversion_slots.acquire()
    loop = asyncio.get_running_loop()
    try:
        job = state.conversion_pool.submit(convert, *args)
    except BaseException:  # the pool shut down: the slot was never used
        state.conversion_slots.release()
        raise
    job.add_done_callback(lambda _: give_back_from_thread(loop, state.conversion_slots))
    return await asyncio.wrap_future(job)


def give_back_from_thread(loop: asyncio.AbstractEventLoop, slots: asyncio.Semaphore) -> None:
    """Release `slots` on its loop from any thread; once the loop is closed nobody waits for it."""
    try:
        loop.call_soon_threadsafe(slots.release)
    except RuntimeError:  # the event loop is closed (the service stopped while the job ran)
        pass


def request_deadline(state: ServiceState) -> float:
    """The time.monotonic() by which a request whose body has arrived must be answered: request_timeout_ms from
    now, waits for a decode slot and decoding included."""
    return time.monotonic() + state.settings.request_timeout_ms / 1000


def deadline_passed(state: ServiceState) -> ApiError:
    return ApiError(504, "deadline", f"the request did not finish within {state.settings.request_timeout_ms:.0f} ms")


async def run_batched(state: ServiceState, tensors: list[np.ndarray], gone: asyncio.Future[Any] | None,
                      deadline: float) -> list[Item]:
    """Enqueue, wait for every image (or the deadline, or `gone`: the client leaving); returns the items in order."""
    timeout_s = max(0.0, deadline - time.monotonic())
    if timeout_s == 0:
        raise deadline_passed(state)
    if gone is not None and gone.done():  # it left while its images decoded: nothing is enqueued
        raise ApiError(499, "client_disconnected", "the client disconnected before its images were queued")
    try:
        items = state.batcher.submit(tensors, deadline)  # type: ignore[union-attr]  # callers check require_ready
    except QueueFullError as err:
        raise queue_full(str(err)) from None
    futures = [item.future for item in items]
    # One image (the common case): its own future, no gathering future around it.
    gathered: asyncio.Future[Any] = futures[0] if len(futures) == 1 else asyncio.gather(*futures)
    waiting: set[asyncio.Future[Any]] = {gathered} if gone is None else {gathered, gone}
    try:
        done, _ = await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if gathered not in done:
            if gone is not None and gone in done:
                raise ApiError(499, "client_disconnected", "the client disconnected before its answer")
            raise deadline_passed(state)
        gathered.result()
    except (DeadlineError, TimeoutError) as err:
        raise ApiError(504, "deadline", str(err)) from None
    except EngineTimeoutError as err:
        raise ApiError(504, "engine_timeout", str(err), headers={"Retry-After": "1"}) from None
    except BatchFailedError as err:
        raise ApiError(500, "inference_failed", str(err)) from None
    finally:
        for future in futures:  # a cancelled item is dropped by the batcher before it runs
            future.cancel()
        if gathered is not futures[0]:
            gathered.cancel()
            gathered.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: not logged
    return items


def count_classified(state: ServiceState, items: list[Item], scope: Scope | None = None) -> None:
    """convnext_images_total: a request's images, counted by its protocol once nothing is left to refuse it (an image
    whose request mate failed is answered 500 with it, one whose client left 499, a v2 request whose rows two versions
    ran 503: none of them was answered a classification). An HTTP request's (its `scope` given) are counted with its
    answer, by RequestMetricsMiddleware, when that is the app's 200: the server may have answered it meanwhile."""
    counts = Counter(item.served_by.name for item in items)  # type: ignore[union-attr]
    if scope is None:
        state.metrics.count_images(counts)
    else:
        scope[CLASSIFIED_SCOPE_KEY] = counts


async def classify(state: ServiceState, images: list[tuple[str, bytes]], client_gone: ClientGone | None,
                   deadline: float) -> list[Item]:
    """Encoded images (name, bytes) -> one batcher item each, preprocessed the serving way, by `deadline`
    (request_deadline, taken when the body had arrived)."""
    manifest = state.version.manifest  # type: ignore[union-attr]  # callers check require_ready first
    if manifest.input.channels != RGB_CHANNELS:  # its tensors are served (v2), its images could not be
        raise ApiError(422, "not_an_image_model", f"{manifest.name}/{manifest.version} takes {manifest.input.channels}"
                       f"-channel input, and images decode to RGB ({RGB_CHANNELS} channels): send its input as a "
                       f"tensor to /v2/models/{manifest.name}/infer")
    with watching(client_gone) as gone, admitted(state, len(images)):
        preprocessed = await within_deadline(state, preprocess_images(state, images, deadline), gone, deadline,
                                             "its images were being decoded")
        items = await run_batched(state, [tensor for tensor, _ in preprocessed], gone, deadline)
    for item, (_, seconds) in zip(items, preprocessed, strict=True):
        item.timings["preprocess_ms"] = seconds * 1000
    return items


async def infer(state: ServiceState, tensors: list[np.ndarray], client_gone: ClientGone | None,
                deadline: float) -> list[Item]:
    """Preprocessed tensors (C, H, W) -> one batcher item each, by `deadline` (request_deadline)."""
    with watching(client_gone) as gone, admitted(state, len(tensors)):
        return await run_batched(state, tensors, gone, deadline)


def labels_of(item: Item) -> tuple[str, ...]:
    """The class names of the version whose engine ran the item (a hot-swap may have happened since it arrived)."""
    # Every version the service serves comes from the repository (only bare-engine batcher tests have none).
    return served_by(item).model.manifest.labels  # type: ignore[union-attr]


def served_by(item: Item) -> ServedModel:
    """The model whose engine ran the item: the version swapped in may be newer than the one it arrived for."""
    if item.served_by is None:  # the batcher sets it before it completes the item's future
        raise RuntimeError("the item has not run yet")
    return item.served_by


def top_k_of(logits: np.ndarray, labels: tuple[str, ...], k: int) -> list[dict]:
    """The k most probable classes, ties in class order (a stable sort of all classes, without sorting them all).

    Few NumPy calls on purpose: after a batch the event loop runs on cold caches, ~20 us a call on a 2-core EPYC."""
    probabilities = logits.astype(np.float64)
    probabilities -= probabilities.max()
    np.exp(probabilities, out=probabilities)
    probabilities /= probabilities.sum()
    size = probabilities.size
    if k < size:  # the k largest, then every class tied with the k-th one too, in class order
        candidates = np.flatnonzero(probabilities >= probabilities[np.argpartition(probabilities, size - k)[size - k]])
    else:
        candidates = np.arange(size)
    order = candidates[np.argsort(-probabilities[candidates], kind="stable")[:k]]
    return [{"label": labels[i], "index": int(i), "probability": float(probabilities[i])} for i in order]
