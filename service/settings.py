"""Service settings: one immutable object, from CONVNEXT_* environment variables, overridden by CLI flags."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVNEXT_", frozen=True, extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    repository: str = "models"
    model: str | None = None  # default: the first model in the repository
    version: int | None = Field(None, ge=1)  # default: the latest version
    engine: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    # On CPU a batch of 8 already saturates the cores; larger batches only add latency.
    max_batch_size: int = Field(8, ge=1)
    max_queue_delay_ms: float = Field(5.0, ge=0)
    queue_size: int = Field(256, ge=1)
    intra_op_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    # ONNX Runtime CPU thread pool: spinning keeps a lone request's latency low (off: +6 ms at batch 1 for
    # ConvNeXt-T here); small dynamic work blocks keep a thread preempted by image decoding from stalling the rest.
    ort_spinning: bool = True
    ort_dynamic_block_base: int = Field(4, ge=0)  # 0: ONNX Runtime's static split
    request_timeout_ms: float = Field(30_000.0, gt=0)
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(40_000_000, ge=1)
    max_files_per_request: int = Field(32, ge=1)
    preprocess_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    warmup_runs: int = Field(2, ge=0)
