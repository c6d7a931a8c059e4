"""Service routes: /classify, health, readiness, the model list and Prometheus metrics."""
from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.repository import ModelRepository, RepositoryError
from service import pipeline
from service.body_budget import count_copy
from service.errors import ApiError, ErrorResponse, error_response, error_responses, shown
from service.model_card import describe
from service.pipeline import (
    http_client_gone,
    labels_of,
    read_body,
    require_ready,
    served_by,
    service_state,
    top_k_of,
)
from service.repository_reader import RepositoryStuck
from service.schemas import CLASSIFY_BODY, ClassifyResponse, Health, ModelsResponse, NotReady, Ready
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger(__name__)
router = APIRouter()
RAW_TYPES = ("image/", "application/octet-stream")
DEFAULT_TOP_K = 5
CLASSIFY_ERRORS = error_responses(400, 408, 413, 415, 422, 500, 503, 504, descriptions={
    400: "Not an image (not_an_image, corrupt_image, unsupported_format, empty_body), or a multipart form without "
         "files (no_files) or that does not parse (invalid_body)",
})


async def read_form_files(request: Request, settings: Settings) -> list[tuple[str, bytes]]:
    """The file fields of a multipart form, in order; more than max_files_per_request is 413 however many."""
    max_files = settings.max_files_per_request
    try:
        form = await request.form(max_files=max_files + 1, max_part_size=settings.max_body_bytes)
    except StarletteHTTPException as err:
        # Starlette stops parsing past max_files + 1 with a 400 that says so only in its message.
        if str(err.detail).startswith("Too many files"):
            raise ApiError(413, "too_many_files", f"over the limit of {max_files} files per request") from None
        raise
    files = [(v.filename or key, await v.read()) for key, v in form.multi_items() if isinstance(v, UploadFile)]
    count_copy(request.scope, sum(len(data) for _, data in files))  # beside the raw body until the answer
    return files


async def collect_images(request: Request, state: ServiceState) -> list[tuple[str, bytes]]:
    """The request's images: the raw body (image/* or octet-stream), or each file of a multipart form."""
    settings = state.settings
    content_type = request.headers.get("content-type", "").lower()
    body = await read_body(request, state)
    if content_type.startswith("multipart/form-data"):
        request._body = body  # the body read: Starlette parses the form from its cached body
        files = await read_form_files(request, settings)
        if not files:
            raise ApiError(400, "no_files", "the multipart form has no file fields; send images as files")
        if len(files) > settings.max_files_per_request:
            raise ApiError(413, "too_many_files", f"{len(files)} files, over the limit of "
                           f"{settings.max_files_per_request} per request")
        return files
    if not content_type.startswith(RAW_TYPES):
        raise ApiError(415, "unsupported_media_type", f"content type {shown(content_type or 'none')} is not accepted; "
                       "send image/* bytes or multipart/form-data files")
    if not body:
        raise ApiError(400, "empty_body", "the request body is empty; send the image bytes")
    return [("body", body)]


@router.post("/classify", summary="Classify one image (raw body) or several (multipart files)",
             response_model=ClassifyResponse, responses=CLASSIFY_ERRORS, openapi_extra=CLASSIFY_BODY)
async def classify(request: Request, top_k: int = Query(DEFAULT_TOP_K, json_schema_extra={"minimum": 1}, description=(
        "how many classes to return, at most the served model's class count (its schema maximum); "
        "default 5, or every class of a model with fewer"))):
    # minimum 1 in the schema but checked here, with the maximum: one wording for both ends of the range.
    started = time.perf_counter()
    state = service_state(request)
    manifest = require_ready(state).manifest
    if "top_k" not in request.query_params:
        top_k = min(top_k, manifest.num_classes)
    if not 1 <= top_k <= manifest.num_classes:
        raise ApiError(422, "invalid_parameter", f"top_k must be between 1 and {manifest.num_classes}")
    images = await collect_images(request, state)
    items = await pipeline.classify(state, images, http_client_gone(request), pipeline.request_deadline(state))
    pipeline.count_classified(state, items, request.scope)
    total_ms = (time.perf_counter() - started) * 1000
    ran = [served_by(item) for item in items]  # the engines that ran them: a version swapped in may be newer
    results = [
        {
            "filename": name,
            "model": {"name": model.name, "version": model.version},
            "top_k": top_k_of(item.future.result(), labels_of(item), top_k),
            "timings": {"preprocess_ms": round(item.timings["preprocess_ms"], 3),
                        "queue_ms": round(item.timings["queue_ms"], 3),
                        "inference_ms": round(item.timings["inference_ms"], 3), "total_ms": round(total_ms, 3)},
            "batch_size": item.timings["batch_size"],
        }
        for (name, _), item, model in zip(images, items, ran, strict=True)
    ]
    # Built here, not validated again by FastAPI against response_model (the schema it documents): that pass cost
    # ~0.1 ms of event-loop time per request; tests check these answers against the OpenAPI schema.
    return JSONResponse({"model": results[0]["model"], "results": results})


@router.get("/healthz", summary="The process is up and can still recover its engine (liveness)",
            response_model=Health, responses=error_responses(503, descriptions={
                503: "The engine cannot be rebuilt in this process (engine_unrecoverable): restart it (answered "
                     "beyond the connection limit too)"}))
async def healthz(request: Request):
    reason = service_state(request).not_live_reason
    if reason is None:
        return {"status": "ok"}
    return error_response(503, "engine_unrecoverable", reason)


@router.get("/readyz", summary="The model is loaded, warmed up, and the batcher is running",
            response_model=Ready, responses={503: {
                "model": NotReady | ErrorResponse,
                "description": "Not ready, with the reason (answered beyond the connection limit too)"}})
async def readyz(request: Request):
    state = service_state(request)
    if state.is_ready:
        return {"status": "ready"}
    return JSONResponse({"status": "not_ready", "reason": state.not_ready_reason}, status_code=503)


@router.get("/models", summary="Models and versions in the repository, from their manifests",
            response_model=ModelsResponse, responses=error_responses(503, descriptions={
                503: "The model repository cannot be read now (repository_unavailable: an I/O error, or a volume "
                     "that does not answer); retry"}))
async def models(request: Request):
    state = service_state(request)
    # Every manifest read is file I/O (maybe on a network volume): off the event loop, which serves the requests,
    # bounded, and a few at once (a hung volume holds that many threads, not one per request).
    try:
        listing = await state.repository_reader.read(repository_listing, state)
    except RepositoryStuck as err:
        raise ApiError(503, "repository_unavailable", f"cannot read the model repository ({err}); retry later",
                       headers={"Retry-After": "1"}) from None
    except (RepositoryError, OSError) as err:  # its words name paths: the log has them, the client its type
        logger.warning("/models cannot read the model repository: %s", err)
        raise ApiError(503, "repository_unavailable", f"cannot read the model repository ({type(err).__name__}, "
                       "logged); retry later", headers={"Retry-After": "1"}) from None
    engine = state.engine.describe().__dict__ if state.engine is not None else None
    return {"models": listing, "engine": engine}


def repository_listing(state: ServiceState) -> list[dict]:
    """Every version in the repository with the fields /models shows; a broken one is left out (and logged)."""
    repository = ModelRepository(state.settings.repository)
    listing, listed = [], set()
    for name in repository.models():
        for version in repository.versions(name):
            listed.add((name, version))
            try:
                manifest = state.manifest_cache.manifest(repository, name, version)  # parsed once while unchanged
            except (RepositoryError, OSError) as err:  # a broken or unreadable version is the operator's to fix
                logger.warning("/models leaves out %s/%s: %s", name, version, err)
                continue
            listing.append({
                "name": name, "version": version, "architecture": manifest.architecture,
                "num_classes": manifest.num_classes, "input": manifest.input.model_dump(),
                "artifacts": [{"format": a.format, "precision": a.precision} for a in manifest.artifacts],
                "description": describe(manifest),
                "serving": state.version is not None and (name, version) == (state.version.manifest.name,
                                                                             state.version.manifest.version),
            })
    state.manifest_cache.keep_only(repository, listed)
    return listing


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={200: {
    "description": "The Prometheus text exposition format",
    "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request):
    return Response(await request.app.state.metrics.rendered(), media_type=CONTENT_TYPE_LATEST)
