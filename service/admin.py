"""Admin routes: hot-swap the served model to another repository version without dropping a request."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.engine_builds import ReloadRefused
from service.errors import ApiError, error_responses, shown
from service.pipeline import read_body, service_state
from service.schemas import ReloadResponse
from service.security import ADMIN_PREFIX

router = APIRouter(prefix=ADMIN_PREFIX, tags=["admin"])
MAX_RELOAD_BODY_BYTES = 1024  # {"version": N} is a few bytes
RELOAD_ERRORS = error_responses(400, 404, 408, 409, 413, 415, 422, 503, descriptions={
    400: "The body is not UTF-8 JSON text (invalid_body)",
    404: "The version is not in the repository (version_not_found)",
    409: "A reload or an engine recovery is already running (reload_in_progress)",
    413: f"The body is over {MAX_RELOAD_BODY_BYTES} bytes (body_too_large)",
    415: "Content-Type is not application/json (unsupported_media_type)",
    422: "The body does not fit the schema (invalid_parameter), or the version failed to load, verify or warm up, "
         "or differs in input or preprocessing (version_refused); the served model is unchanged",
    503: "The model repository cannot be read now (repository_unavailable); the served model is unchanged; retry",
})


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1, description="the version to serve; null: the latest in the repository")

    @field_validator("version", mode="before")
    @classmethod
    def _a_json_number(cls, value):
        """A JSON integer (3, or 3.0 as JSON Schema counts it), not `true` nor "3", which pydantic would convert."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError("version must be an integer or null")
        return value


RELOAD_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": ReloadRequest.model_json_schema()}}}}


async def reload_request(request: Request) -> ReloadRequest:
    """The JSON body, at most MAX_RELOAD_BODY_BYTES. Only application/json: a browser sends that cross-site only
    after a CORS preflight, so a web page the operator opens cannot make it reload (a bodyless or form POST can). A
    page made same-origin by DNS rebinding needs no preflight: the admin key, or without one the Host and Origin
    check (service.security.AdminHostMiddleware), refuses it."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", f"content type {shown(content_type or 'none')}: send JSON with "
                       'Content-Type: application/json, {"version": N} or {} for the latest')
    body = await read_body(request, service_state(request), MAX_RELOAD_BODY_BYTES)
    try:
        return ReloadRequest.model_validate_json(body or b"{}")
    except ValidationError as err:
        first = err.errors(include_url=False, include_input=False)[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, "invalid_body", f"the body is not JSON text: {first['msg']}") from None
        where = ".".join(map(str, first["loc"])) or "body"
        raise ApiError(422, "invalid_parameter", f"{where}: {first['msg']}") from None


@router.post("/reload", summary="Load, verify and warm up a version of the served model, then swap it in",
             response_model=ReloadResponse, responses=RELOAD_ERRORS, openapi_extra=RELOAD_BODY)
async def reload(request: Request):
    """200 with the new and previous versions; 404 unknown version; 409 a reload is running; 422 version refused."""
    body = await reload_request(request)
    manager = request.app.state.service.models
    try:
        return await manager.reload(body.version)
    except ReloadRefused as err:
        retry = {"Retry-After": "1"} if err.status == 503 else None  # a transient repository error
        raise ApiError(err.status, err.code, err.message, headers=retry) from None
