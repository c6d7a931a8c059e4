"""Admin routes: hot-swap the served model to another repository version without dropping a request."""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.errors import ApiError, error_responses
from service.model_manager import ReloadRefused
from service.schemas import ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"])
RELOAD_ERRORS = error_responses(400, 404, 409, 422, descriptions={
    400: "The body is not UTF-8 JSON text (invalid_body)",
    404: "The version is not in the repository (version_not_found)",
    409: "A reload or an engine recovery is already running (reload_in_progress)",
    422: "The body does not fit the schema (invalid_parameter), or the version failed to load, verify or warm up, "
         "or differs in input or preprocessing (version_refused); the served model is unchanged",
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


@router.post("/reload", summary="Load, verify and warm up a version of the served model, then swap it in",
             response_model=ReloadResponse, responses=RELOAD_ERRORS)
async def reload(request: Request, body: ReloadRequest | None = None):
    """200 with the new and previous versions; 404 unknown version; 409 a reload is running; 422 version refused."""
    manager = request.app.state.service.models
    try:
        return await manager.reload(body.version if body is not None else None)
    except ReloadRefused as err:
        raise ApiError(err.status, err.code, err.message) from None
