"""API errors and the one JSON error body the service answers with: {"error": {"code": ..., "message": ...}}."""
from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import Send

STATUS_MEANINGS = {
    400: "bad request", 401: "API key missing or wrong", 404: "unknown model or path", 408: "the body stalled",
    413: "over a limit", 415: "unsupported media type", 422: "invalid parameter", 500: "the engine failed",
    503: "not ready or at capacity (Retry-After)", 504: "deadline or engine timeout",
}


class ApiError(Exception):
    """An answer to the client: HTTP status, machine-readable code, message (and headers such as Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """The one error body, as OpenAPI shows it."""

    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` for a route: each of these statuses with the JSON error body."""
    return {status: {"model": ErrorBody, "description": STATUS_MEANINGS[status]} for status in statuses}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    """The error as a FastAPI response (routes and exception handlers)."""
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


async def send_error(send: Send, status: int, code: str, message: str,
                     headers: list[tuple[bytes, bytes]] = ()) -> None:
    """The error written straight to ASGI `send` (the pure-ASGI edge: admission gate, API key, connection limit)."""
    body = json.dumps(error_body(code, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
