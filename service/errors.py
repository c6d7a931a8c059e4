"""API errors and the one JSON error body the service answers with: {"error": {"code": ..., "message": ...}}.

Also the body's schema and the `responses=` entries routes declare, so /openapi.json documents every error answer.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import Send


class ApiError(Exception):
    """An answer to the client: HTTP status, machine-readable code, message (and headers such as Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The error as a FastAPI response (routes and exception handlers)."""
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


async def send_error(send: Send, status: int, code: str, message: str,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """The error written straight to ASGI `send` (the pure-ASGI edge: admission gate, API key, connection limit)."""
    body = json.dumps(error_body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. not_an_image, queue_full, unauthorized")
    message: str = Field(description="what went wrong and what to do about it, for a person")


class ErrorResponse(BaseModel):
    """The body of every error answer, whatever the route or the layer that refused the request."""

    error: ErrorDetail


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
    413: "Too large (body_too_large, too_many_files, too_many_pixels)",
    415: "Unsupported content type (unsupported_media_type)",
    422: "A parameter or body field is invalid (invalid_parameter)",
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
