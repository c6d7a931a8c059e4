"""Admin routes: hot-swap the served model to another repository version without dropping a request."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from service.errors import ApiError
from service.model_manager import ReloadRefused

router = APIRouter(prefix="/admin", tags=["admin"])


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1, description="the version to serve; null: the latest in the repository")


@router.post("/reload", summary="Load, verify and warm up a version of the served model, then swap it in")
async def reload(request: Request, body: ReloadRequest | None = None):
    """200 with the new and previous versions; 404 unknown version; 409 a reload is running; 422 version refused."""
    manager = request.app.state.service.models
    try:
        return await manager.reload(body.version if body is not None else None)
    except ReloadRefused as err:
        raise ApiError(err.status, err.code, err.message) from None
