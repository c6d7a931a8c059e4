"""Service routes: /classify, health, readiness, the model list and Prometheus metrics."""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtime.preprocess import ImageError, preprocess
from runtime.repository import ModelRepository
from service.admission import AdmissionRefused
from service.batcher import BatchFailedError, DeadlineError, EngineTimeoutError, QueueFullError
from service.errors import ApiError, error_response
from service.model_card import describe

router = APIRouter()
RAW_TYPES = ("image/", "application/octet-stream")


def _state(request: Request):
    return request.app.state.service


async def read_body_limited(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "body_too_large", f"the body is {declared} bytes, over the limit of {max_bytes}")
    chunks, size = [], 0
    timeout_s = _state(request).settings.body_timeout_s
    stream = request.stream()
    while True:  # each chunk within body_timeout_s: a client that stalls mid-body does not hold a slot forever
        try:
            chunk = await asyncio.wait_for(anext(stream), timeout_s)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise ApiError(408, "body_timeout", f"no part of the request body arrived for {timeout_s:g} s; "
                           "send the whole body at once", headers={"Connection": "close"}) from None
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body_too_large", f"the body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette reads the cached body when parsing the form below
    return body


async def collect_images(request: Request) -> list[tuple[str, bytes]]:
    settings = _state(request).settings
    content_type = request.headers.get("content-type", "").lower()
    body = await read_body_limited(request, settings.max_body_bytes)
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=settings.max_files_per_request + 1, max_part_size=settings.max_body_bytes)
        files = [(v.filename or key, await v.read()) for key, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise ApiError(400, "no_files", "the multipart form has no file fields; send images as files")
        if len(files) > settings.max_files_per_request:
            raise ApiError(413, "too_many_files", f"{len(files)} files, over the limit of "
                           f"{settings.max_files_per_request} per request")
        return files
    if not content_type.startswith(RAW_TYPES):
        raise ApiError(415, "unsupported_media_type", f"content type {content_type or 'none'!r} is not accepted; "
                       "send image/* bytes or multipart/form-data files")
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; send the image bytes")
    return [("body", body)]


async def preprocess_all(request: Request, images: list[tuple[str, bytes]]) -> list[np.ndarray]:
    """Decode + transform in the bounded thread pool; the first bad image fails the request before enqueueing."""
    state = _state(request)
    loop = asyncio.get_running_loop()
    spec = state.version.manifest.preprocess

    async def one(name: str, data: bytes) -> np.ndarray:
        async with state.preprocess_slots:
            started = time.perf_counter()
            try:
                tensor = await loop.run_in_executor(state.preprocess_pool, preprocess, data, spec,
                                                    state.settings.max_pixels, state.settings.decode_mode)
            except ImageError as err:
                status = 413 if err.code == "too_many_pixels" else 400
                raise ApiError(status, err.code, f"{name}: {err.message}") from None
            state.metrics.preprocess.observe(time.perf_counter() - started)
            return tensor

    return list(await asyncio.gather(*(one(name, data) for name, data in images)))


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def infer(request: Request, tensors: list[np.ndarray]):
    """Enqueue, wait for every image (or the deadline, or the client leaving); returns the items in order."""
    state = _state(request)
    timeout_s = state.settings.request_timeout_ms / 1000
    try:
        items = state.batcher.submit(tensors, time.monotonic() + timeout_s)
    except QueueFullError as err:
        raise ApiError(503, "queue_full", str(err), headers={"Retry-After": "1"}) from None
    futures = [item.future for item in items]
    gathered = asyncio.gather(*futures)
    disconnect = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({gathered, disconnect}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if gathered not in done:
            reason = "client_disconnected" if disconnect in done else "deadline"
            raise ApiError(504 if reason == "deadline" else 499, reason,
                           f"the request did not finish within {state.settings.request_timeout_ms:.0f} ms")
        gathered.result()
    except (TimeoutError, DeadlineError) as err:
        raise ApiError(504, "deadline", str(err)) from None
    except EngineTimeoutError as err:
        raise ApiError(504, "engine_timeout", str(err), headers={"Retry-After": "1"}) from None
    except BatchFailedError as err:
        raise ApiError(500, "inference_failed", str(err)) from None
    finally:
        disconnect.cancel()
        for future in futures:  # a cancelled item is dropped by the batcher before it runs
            future.cancel()
        gathered.cancel()
        gathered.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: not logged
    return items


@contextmanager
def admitted(request: Request, images: int):
    """Count the request's images in before decoding; at capacity it is refused at once (503 + Retry-After)."""
    try:
        with _state(request).admission.admit(images):
            yield
    except AdmissionRefused as err:
        raise ApiError(503, "queue_full", str(err), headers={"Retry-After": "1"}) from None


def top_k_of(logits: np.ndarray, labels: tuple[str, ...], k: int) -> list[dict]:
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    probabilities = shifted / shifted.sum()
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"label": labels[i], "index": int(i), "probability": float(probabilities[i])} for i in order]


@router.post("/classify", summary="Classify one image (raw body) or several (multipart files)")
async def classify(request: Request, top_k: int = Query(5, ge=1, description="how many classes to return")):
    started = time.perf_counter()
    state = _state(request)
    if not state.is_ready:
        raise ApiError(503, "not_ready", f"not ready: {state.not_ready_reason} (see /readyz)",
                       headers={"Retry-After": "1"})
    manifest = state.version.manifest
    if top_k > manifest.num_classes:
        raise ApiError(422, "invalid_parameter", f"top_k must be between 1 and {manifest.num_classes}")
    images = await collect_images(request)
    with admitted(request, len(images)):
        tensors = await preprocess_all(request, images)
        items = await infer(request, tensors)
    total_ms = (time.perf_counter() - started) * 1000
    results = [
        {
            "filename": name,
            "top_k": top_k_of(item.future.result(), item.served_by.model.manifest.labels, top_k),
            "timings": {"queue_ms": round(item.timings["queue_ms"], 3),
                        "inference_ms": round(item.timings["inference_ms"], 3), "total_ms": round(total_ms, 3)},
            "batch_size": item.timings["batch_size"],
        }
        for (name, _), item in zip(images, items, strict=True)
    ]
    ran = items[0].served_by  # the engine that ran the batch: the version swapped in may be newer than `manifest`
    return {"model": {"name": ran.name, "version": ran.version}, "results": results}


@router.get("/healthz", summary="The process is up and can still recover its engine (liveness)")
async def healthz(request: Request):
    reason = _state(request).not_live_reason
    if reason is None:
        return {"status": "ok"}
    return error_response(503, "engine_unrecoverable", reason)


@router.get("/readyz", summary="The model is loaded, warmed up, and the batcher is running")
async def readyz(request: Request):
    state = _state(request)
    if state.is_ready:
        return {"status": "ready"}
    return JSONResponse({"status": "not_ready", "reason": state.not_ready_reason}, status_code=503)


@router.get("/models", summary="Models and versions in the repository, from their manifests")
async def models(request: Request):
    state = _state(request)
    repository = ModelRepository(state.settings.repository)
    listing = []
    for name in repository.models():
        for version in repository.versions(name):
            manifest = repository.load(name, version, verify_files=False).manifest
            listing.append({
                "name": name, "version": version, "architecture": manifest.architecture,
                "num_classes": manifest.num_classes, "input": manifest.input.model_dump(),
                "artifacts": [{"format": a.format, "precision": a.precision} for a in manifest.artifacts],
                "description": describe(manifest),
                "serving": state.version is not None and (name, version) == (state.version.manifest.name,
                                                                             state.version.manifest.version),
            })
    engine = state.engine.describe().__dict__ if state.engine is not None else None
    return {"models": listing, "engine": engine}


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
