"""The JSON bodies of the service routes as pydantic models: their schemas in /openapi.json, checked on the way out."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from runtime.repository import InputSpec, Precision
from service.model_card import ModelCard

IMAGE_BYTES = {"type": "string", "format": "binary"}
# The body is read by hand (raw bytes or a multipart form, limits checked while reading), so it is declared here.
CLASSIFY_BODY = {"requestBody": {"required": True, "description": (
    "One image as the raw body (an image/* type, or application/octet-stream), or several as the file fields of a "
    "multipart form (any field name; one result per file, in order). Formats: JPEG, PNG, WebP, BMP, GIF, TIFF."),
    "content": {
        "image/*": {"schema": IMAGE_BYTES},
        "application/octet-stream": {"schema": IMAGE_BYTES},
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["files"], "properties": {"files": {
                "type": "array", "minItems": 1, "items": IMAGE_BYTES,
                "description": "image files, at most max_files_per_request (413 beyond)"}}},
            "encoding": {"files": {"headers": {
                # A part without a filename is a text field, not a file (RFC 7578 4.2): every client sends one.
                "Content-Disposition": {"description": "each file part names its file", "schema": {"type": "string"},
                                        "example": 'form-data; name="files"; filename="photo.jpg"'}}}},
        },
    }}}


class ClassScore(BaseModel):
    label: str
    index: int
    probability: float


class Timings(BaseModel):
    preprocess_ms: float = Field(description="this image's decode + transform in the decode pool (not its wait for "
                                 "decode memory)")
    queue_ms: float = Field(description="from enqueueing to its batch starting")
    inference_ms: float = Field(description="its batch on the engine, hand-offs to and from the engine thread included")
    total_ms: float = Field(description="in the handler, from its start (before the body is read) to the answer")


class ModelRef(BaseModel):
    name: str
    version: int


class ClassifyResult(BaseModel):
    filename: str  # "body" for a raw body, else the file's name (or its form field)
    model: ModelRef = Field(description="the version whose engine ran this image (a request's images may span a "
                                        "hot-swap; the versions then take the same input and have the same classes)")
    top_k: list[ClassScore]
    timings: Timings
    batch_size: int  # images in the engine batch this one ran in


class ClassifyResponse(BaseModel):
    model: ModelRef = Field(description="the version whose engine ran the first image; each result names its own")
    results: list[ClassifyResult]


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready"]


class NotReady(BaseModel):
    status: Literal["not_ready"]
    reason: str


class ArtifactInfo(BaseModel):
    format: str
    precision: Precision


class ModelListing(BaseModel):
    name: str
    version: int
    architecture: str
    num_classes: int
    input: InputSpec
    artifacts: list[ArtifactInfo]
    description: ModelCard
    serving: bool


class EngineInfo(BaseModel):
    name: str
    input_name: str
    input_shape: list[int]  # (C, H, W) of one image
    max_batch_size: int
    precision: str
    provider: str
    max_concurrent_batches: int = 1  # batches the engine runs at once (OpenVINO THROUGHPUT: several)
    auto_images_per_s: dict[str, float] | None = None  # engine "auto" only: each candidate's measured images/s


class ModelsResponse(BaseModel):
    models: list[ModelListing]
    engine: EngineInfo | None  # null until the engine is loaded


class ReloadResponse(BaseModel):
    model: ModelRef  # now served
    previous: ModelRef | None  # served before the swap
