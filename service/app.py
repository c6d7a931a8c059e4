"""FastAPI app: routes, JSON errors, and the lifespan that owns the engine, the batcher and the thread pool."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from export.repository import ModelRepository, ModelVersion
from service.batcher import Batcher
from service.engines.base import Engine
from service.metrics import ServiceMetrics
from service.settings import Settings

STATIC_INDEX = Path(__file__).parent / "static" / "index.html"
EngineFactory = Callable[[ModelVersion, Settings], Engine]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def default_engine(version: ModelVersion, settings: Settings) -> Engine:
    manifest = version.manifest
    shape = (manifest.input.channels, manifest.input.height, manifest.input.width)
    if settings.engine == "tensorrt":
        from export.tensorrt import BatchProfile, select_or_build_engine
        from service.engines.tensorrt import TensorRTEngine

        # A compatible engine from the version, or one built for this GPU on first start (minutes, then cached).
        profile = BatchProfile(1, settings.max_batch_size, settings.max_batch_size)
        artifact, version = select_or_build_engine(version, settings.precision, profile,
                                                   repository_root=settings.repository)
        return TensorRTEngine(version.artifact_path(artifact), shape, precision=settings.precision,
                              max_batch_size=settings.max_batch_size, input_name=manifest.input.name,
                              output_name=manifest.output_name)
    from service.engines.onnxruntime import OnnxRuntimeEngine

    artifact = manifest.find("onnx", settings.precision)
    if artifact is None:
        have = sorted({a.precision for a in manifest.artifacts if a.format == "onnx"})
        raise RuntimeError(f"{manifest.name}/{manifest.version} has no {settings.precision} ONNX artifact "
                           f"(has {have}); pass --precision one of those")
    return OnnxRuntimeEngine(version.artifact_path(artifact), shape, input_name=manifest.input.name,
                             provider=settings.provider, precision=settings.precision,
                             max_batch_size=settings.max_batch_size, intra_op_threads=settings.intra_op_threads,
                             spinning=settings.ort_spinning, dynamic_block_base=settings.ort_dynamic_block_base)


def load_model_version(settings: Settings) -> ModelVersion:
    repository = ModelRepository(settings.repository)
    models = repository.models()
    if not models:
        raise RuntimeError(f"the model repository {settings.repository!r} has no models; export one with "
                           "`convnext export onnx ...` or run `make demo-model`")
    name = settings.model or models[0]
    return repository.load(name, settings.version)


class ServiceState:
    def __init__(self, settings: Settings, metrics: ServiceMetrics):
        self.settings, self.metrics = settings, metrics
        self.ready = False
        self.version: ModelVersion | None = None
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.preprocess_pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="preprocess")
        # Bounds images being decoded at once, so a flood waits here instead of piling up in the pool.
        self.preprocess_slots = asyncio.Semaphore(settings.preprocess_workers * 2)

    @property
    def is_ready(self) -> bool:
        return self.ready and self.batcher is not None and self.batcher.alive


def create_app(settings: Settings | None = None, engine_factory: EngineFactory = default_engine) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = ServiceState(settings, metrics)
        app.state.service = state
        state.version = load_model_version(settings)
        manifest = state.version.manifest
        state.engine = await asyncio.to_thread(engine_factory, state.version, settings)
        await asyncio.to_thread(state.engine.load)
        await asyncio.to_thread(state.engine.warmup, settings.warmup_runs)
        spec = state.engine.describe()
        metrics.model_info.labels(manifest.name, str(manifest.version), spec.name, spec.precision).set(1)
        state.batcher = Batcher(state.engine, manifest.name, min(settings.max_batch_size, spec.max_batch_size),
                                settings.max_queue_delay_ms, settings.queue_size, metrics)
        state.batcher.start()
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            await state.batcher.drain(settings.request_timeout_ms / 1000)
            state.preprocess_pool.shutdown(wait=False, cancel_futures=True)
            state.engine.close()

    app = FastAPI(title="ConvNeXt image classification", version="0.1.0", lifespan=lifespan)
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        metrics.rejected.labels(err.code).inc()
        return error_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        metrics.rejected.labels("bad_request").inc()
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return error_response(422, "invalid_parameter", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(err.status_code, code, str(err.detail))

    @app.middleware("http")
    async def _count(request: Request, call_next):
        started = time.perf_counter()
        metrics.inflight.inc()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.inflight.dec()
            route = request.scope.get("route")
            path = route.path if route is not None else "unmatched"
            metrics.requests.labels(path, request.method, str(status)).inc()
            metrics.request_duration.labels(path).observe(time.perf_counter() - started)

    from service.routes import router
    from service.v2 import router as v2_router

    app.include_router(router)
    app.include_router(v2_router)

    @app.get("/", include_in_schema=False)
    async def index():
        if STATIC_INDEX.is_file():
            return FileResponse(STATIC_INDEX)
        return JSONResponse({"service": "convnext", "docs": "/docs", "classify": "POST /classify"})

    return app
