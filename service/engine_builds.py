"""What building an engine for the served model can end with, and the bound on it: the engine prepared (made, loaded,
warmed up, smoke-run) in its own thread, the refusals and errors a reload or a rebuild raises, how long a build may
take (the start's too) and the bound itself, and closing an engine whatever state its build left it in."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from runtime.engines.base import Engine
from runtime.engines.factory import EngineOptions, open_bound_s
from runtime.repository import ModelVersion

if TYPE_CHECKING:
    from service.settings import Settings

logger = logging.getLogger("convnext.service")
T = TypeVar("T")
EngineFactory = Callable[[ModelVersion, "Settings"], Engine]


class ReloadRefused(Exception):
    """A reload was not done; the served model is unchanged. Carries the HTTP status and error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class SmokeRunError(RuntimeError):
    """A freshly loaded engine gave wrong output on its smoke run."""


class BuildTimeoutError(TimeoutError):
    """A build (the start's, a reload's, a rebuild's) went past build_limit_s and was abandoned; its message is the
    service's own, so /readyz and /healthz may show it."""


def engine_options(settings: Settings) -> EngineOptions:
    """The engine options the settings ask for (what the service opens, and convnext serve checks before export)."""
    return EngineOptions(engine=settings.engine, provider=settings.provider, precision=settings.precision,
                         max_batch_size=settings.max_batch_size, threads=settings.intra_op_threads,
                         ort_spinning=settings.ort_spinning, ort_streams=settings.ort_streams,
                         openvino_performance_hint=settings.openvino_performance_hint,
                         repository=settings.repository)


def build_timeout_s(settings: Settings) -> float:
    """How long one engine build (the start's, a reload's, a rebuild's) may take before it fails: opening the engine
    (open_bound_s: with TensorRT, time for a build) and engine_timeout_ms per engine call (warmup_runs at batch 1 and
    at max batch, and the smoke run), as a served batch gets."""
    engine_calls = 2 * settings.warmup_runs + 1
    return open_bound_s(settings.engine, settings.provider) + engine_calls * settings.engine_timeout_ms / 1000


async def bounded_build(build: Awaitable[T], limit_s: float, what: str) -> T:
    """A build (the start's, a reload's, a rebuild's) within limit_s: past it the build is abandoned (its engine is
    closed if its load ever returns) and BuildTimeoutError raised, so the start ends in one line, the reload is refused
    or the rebuild attempt fails, and the lock they hold is free again."""
    try:
        async with asyncio.timeout(limit_s) as bound:
            return await build
    except TimeoutError:
        if not bound.expired():
            raise  # the build's own
        raise BuildTimeoutError(f"{what} did not finish within {limit_s:g} s (a wedged device?); it is "
                                "abandoned") from None


def close_engine(engine: Engine, what: str) -> None:
    """In the engine's thread: close it; a failure is logged (the engine is gone either way)."""
    try:
        engine.close()
    except Exception as err:
        logger.warning("closing the engine of %s failed: %s: %s", what, type(err).__name__, err)


def close_prepared(prepared: Future, what: str) -> None:
    """In the engine's thread, after the call that prepared the engine: close it, if that call made one."""
    if not prepared.cancelled() and prepared.exception() is None:  # a failed prepare closed its own engine
        close_engine(prepared.result(), what)


def prepared_engine(model: ModelVersion, settings: Settings, engine_factory: EngineFactory) -> Engine:
    """In the engine's thread: the engine made, loaded, warmed up and smoke-run (logits of the manifest's shape, all
    finite), or closed and the error raised."""
    engine = engine_factory(model, settings)
    try:
        engine.load()
        engine.warmup(settings.warmup_runs)
        spec = engine.describe()
        logits = engine.run(np.zeros((1, *spec.input_shape), dtype=np.float32))
        expected = (1, model.manifest.num_classes)
        if np.shape(logits) != expected:
            raise SmokeRunError(f"the smoke run gave logits of shape {np.shape(logits)}, expected {expected}")
        if not np.isfinite(logits).all():
            raise SmokeRunError("the smoke run gave non-finite logits (NaN or inf)")
    except BaseException:
        engine.close()
        raise
    return engine
