"""API errors and the JSON error body the service answers with: {"error": {"code": ..., "message": ...}}, and on the
Open Inference Protocol's paths (/v2...) the protocol's own {"error": "<message>"}, with the code beside it.

Also the bodies' schemas and the `responses=` entries routes declare, so /openapi.json documents every error answer.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import Scope, Send

V2_PREFIX = "/v2"
MAX_ECHOED_CHARS = 200  # of anything a client sent that an error message repeats (a name, a file name)
# Of a whole message: the bound whatever a message repeats unclipped (a model or tensor name, a JSON path of
# client-chosen keys), so no answer and no gRPC trailer carries a client's megabytes back.
MAX_MESSAGE_CHARS = 1000


class ApiError(Exception):
    """An answer to the client: HTTP status, machine-readable code, message (and headers such as Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + f"... ({len(message)} characters)"
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def clipped(text: str) -> str:
    """Client-sent text for an error message, cut at MAX_ECHOED_CHARS: a message never carries a client's megabytes
    back (over gRPC it becomes the grpc-message trailer, which clients cap at a few KB)."""
    return text if len(text) <= MAX_ECHOED_CHARS else text[:MAX_ECHOED_CHARS] + f"... ({len(text)} characters)"


def shown(value: object) -> str:
    """repr(value), clipped."""
    return clipped(repr(value))


def routed_path(scope: Scope) -> str:
    """The request's path as the routes see it (behind a proxy, without its root_path)."""
    return scope.get("path", "").removeprefix(scope.get("root_path", ""))


def is_under(path: str, prefix: str) -> bool:
    """`path` is `prefix` or below it ("/v2", "/v2/models/x"; not "/v2x")."""
    return path == prefix or path.startswith(prefix + "/")


def is_v2_path(path: str) -> bool:
    """An Open Inference Protocol path (/v2 and below)."""
    return is_under(path, V2_PREFIX)


def speaks_v2(scope: Scope) -> bool:
    """The request is on an Open Inference Protocol path."""
    return is_v2_path(routed_path(scope))


def error_body(code: str, message: str, v2: bool = False) -> dict:
    """The service's error body; with `v2`, the protocol's: "error" must be the message string (KServe
    required_api.md; tritonclient raises it as its exception's message), the machine-readable code beside it."""
    if v2:
        return {"error": message, "code": code}
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None,
                   v2: bool = False) -> JSONResponse:
    """The error as a FastAPI response (routes and exception handlers)."""
    return JSONResponse(error_body(code, message, v2), status_code=status, headers=headers)


async def send_error(scope: Scope, send: Send, status: int, code: str, message: str,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """The error written straight to ASGI `send` (the pure-ASGI edge: admission gate, API key, connection limit)."""
    body = json.dumps(error_body(code, message, speaks_v2(scope))).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. not_an_image, queue_full, unauthorized")
    message: str = Field(description="what went wrong and what to do about it, for a person")


class ErrorResponse(BaseModel):
    """The body of every error answer outside /v2, whatever the route or the layer that refused the request."""

    error: ErrorDetail


class V2ErrorResponse(BaseModel):
    """The body of every error answer on /v2 paths: the Open Inference Protocol's inference_error_response."""

    error: str = Field(description="what went wrong and what to do about it, for a person")
    code: str = Field(description="machine-readable reason, as `error.code` elsewhere in this API")


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "required": True, "schema": {"type": "string"}}},
    503: RETRY_AFTER,
    504: RETRY_AFTER,  # engine_timeout: the engine is being rebuilt
}
ERROR_DESCRIPTIONS = {
    400: "Bad request (see error.code)",
    401: "No API key, or a wrong one (only when the service is configured with a key)",
    404: "Not found",
    408: "The request body stalled (body_timeout)",
    409: "Conflict",
    413: "Too large (body_too_large, too_many_files, too_many_pixels, too_many_images)",
    415: "Unsupported content type (unsupported_media_type)",
    422: "A parameter or body field is invalid (invalid_parameter), or images for a model whose input is not RGB "
         "(not_an_image_model)",
    500: "The engine failed the batch this request was in (inference_failed)",
    503: "Not ready (not_ready), at capacity (queue_full) or at the connection limit (too_many_connections); "
         "retry after Retry-After",
    504: "Not finished within request_timeout_ms (deadline), or the engine hung (engine_timeout)",
}


def error_responses(*statuses: int, descriptions: dict[int, str] | None = None) -> dict[int | str, dict]:
    """`responses=` entries: each status answers the JSON error body (with its headers, e.g. Retry-After on 503)."""
    descriptions = ERROR_DESCRIPTIONS | (descriptions or {})
    return {status: {"model": ErrorResponse, "description": descriptions[status],
                     **({"headers": ERROR_HEADERS[status]} if status in ERROR_HEADERS else {})}
            for status in statuses}
