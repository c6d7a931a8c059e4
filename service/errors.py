"""API errors and the one JSON error body the service answers with: {"error": {"code": ..., "message": ...}}."""
from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from starlette.types import Send


class ApiError(Exception):
    """An answer to the client: HTTP status, machine-readable code, message (and headers such as Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


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
