"""FastAPI app wiring: settings -> engine options, routers, exception handlers, the lifespan that owns the engine."""
from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from convnext_common import one_line, prog_name, project_version
from runtime.engines.base import Engine
from runtime.engines.factory import check_engine_options, open_engine
from runtime.metadata_limits import png_text_limited
from runtime.repository import Manifest, ModelRepository, ModelVersion, RepositoryError
from service import PROG
from service.admin import router as admin_router
from service.admission import Admission, AdmissionGate
from service.body_budget import BodyBudget, BodyBudgetMiddleware
from service.engine_builds import EngineFactory, engine_options
from service.errors import ApiError, error_response, speaks_v2
from service.grpc_server import GrpcService, start_grpc_server
from service.metrics import SERVER_ANSWER_SCOPE_KEY, RequestMetricsMiddleware, ServiceMetrics
from service.model_manager import ModelManager
from service.openapi import APP_RESPONSES, install_openapi
from service.pages import pages_router
from service.repository_reader import load_model_version
from service.request_ids import REQUEST_ID_SCOPE_KEY, new_request_id
from service.routes import router
from service.security import NOSNIFF_HEADERS, install_edge
from service.settings import Settings
from service.state import ServiceState
from service.v2 import router as v2_router

HTTP_ERROR_CODES = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
# What a start can expectedly fail with (a model, engine, provider, TensorRT build or port problem): logged as one line
# by uvicorn. Anything else is a bug, and keeps its traceback.
STARTUP_ERRORS = (RuntimeError, OSError, RepositoryError)
logger = logging.getLogger("convnext.service")  # beside uvicorn's lines on stderr (server.log_config)


def default_engine(version: ModelVersion, settings: Settings) -> Engine:
    """The engine the settings ask for (runtime/engines/factory.py)."""
    return open_engine(version, engine_options(settings))


def check_servable(settings: Settings) -> ModelVersion:
    """What the lifespan's start would fail on first, checked before the server starts (`python -m service`): the
    version to serve, and an engine the settings can open for it (runtime.engines.factory.check_engine_options)."""
    version = load_model_version(ModelRepository(settings.repository), settings.model, settings.version)
    check_engine_options(version, engine_options(settings))
    return version


class StartupErrorInOneLine:
    """Pure ASGI, for the lifespan only: a start that fails with one of STARTUP_ERRORS is reported to uvicorn as
    `convnext serve: error: <message>` instead of Starlette's formatted traceback (what the CLI promises)."""

    def __init__(self, app: ASGIApp, error_of: Callable[[], str | None]):
        self.app, self.error_of = app, error_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: Message) -> None:
            error = self.error_of()
            if message["type"] == "lifespan.startup.failed" and error is not None:
                message = {**message, "message": f"{prog_name(PROG)}: error: {error}"}
            await send(message)

        await self.app(scope, receive, send_one_line)


def begin_drain(app: FastAPI) -> None:
    """The process is stopping and uvicorn has just stopped taking HTTP requests (service.server.Server): the gRPC
    server stops taking calls at the same moment, so the two protocols drain side by side, not one after the other.
    The lifespan's shutdown then waits for the gRPC calls in flight and drains the batcher."""
    grpc_service: GrpcService | None = getattr(app.state, "grpc", None)
    if grpc_service is not None:
        grpc_service.begin_stop()


def service_lifespan(settings: Settings, metrics: ServiceMetrics, body_budget: BodyBudget,
                     engine_factory: EngineFactory):
    """The app's lifespan: load the model and start the batcher (and the gRPC server) before the first request; on
    shutdown, drain both protocols and the batcher, then stop the decode pools."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with png_text_limited():  # Pillow's limit for this service's life, its own again after
            state = ServiceState(settings, metrics, body_budget)
            app.state.service = state
            state.models = ModelManager(settings, metrics, engine_factory)
            grpc_service: GrpcService | None = None
            try:
                await state.models.start()
                if settings.grpc_port:
                    grpc_service = app.state.grpc = await start_grpc_server(state)
            except STARTUP_ERRORS as err:
                app.state.startup_error = one_line(err)
                await state.models.stop(0)  # whatever the failed start had built
                state.preprocess_pool.shutdown(wait=False)
                state.conversion_pool.shutdown(wait=False)
                raise
            try:
                yield
            finally:
                if grpc_service is not None:  # its stop began with the HTTP server's (begin_drain); its calls finish
                    await grpc_service.begin_stop()
                    app.state.grpc = None
                await state.models.stop(settings.request_timeout_ms / 1000)
                state.preprocess_pool.shutdown(wait=False, cancel_futures=True)
                state.conversion_pool.shutdown(wait=False, cancel_futures=True)

    return lifespan


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Every error as the service's JSON body (the v2 protocol's on /v2 paths), refusals counted by code."""
    def count_refusal(request: Request, code: str) -> None:
        # A request the server answered itself (service/server.py: a body that does not parse) was counted then, with
        # the code it was answered; the app's answer to the closed connection (its 499) reaches nobody.
        if SERVER_ANSWER_SCOPE_KEY not in request.scope:
            metrics.rejected.labels(code).inc()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        count_refusal(request, err.code)
        return error_response(err.status, err.code, err.message, err.headers, speaks_v2(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        # A JSON body that does not parse is a bad body (400), like a multipart one; anything else a bad field (422).
        status, code = (400, "invalid_body") if any(e["type"] == "json_invalid" for e in err.errors()) else \
            (422, "invalid_parameter")
        count_refusal(request, code)
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        return error_response(status, code, details, v2=speaks_v2(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        # err.headers: a 405 carries Allow, the methods of the route at that path (RFC 9110).
        code = HTTP_ERROR_CODES.get(err.status_code, "http_error")
        if err.status_code not in (404, 405):  # an unknown path or method is not counted (unbounded by clients)
            count_refusal(request, code)  # e.g. 400 invalid_body: a multipart body that does not parse
        return error_response(err.status_code, code, str(err.detail), err.headers, speaks_v2(request.scope))

    @app.exception_handler(Exception)
    async def _unexpected_error(request: Request, err: Exception):
        # A bug, not the client's doing: still the JSON error body; Starlette re-raises the error after this answer,
        # and uvicorn logs its traceback. Starlette's outermost layer sends it, outside every middleware: nosniff and
        # the request's id (left in the scope by RequestMetricsMiddleware) are set here, and the id is logged with the
        # error's type, so the client's id finds the traceback that follows.
        request_id = request.scope.get(REQUEST_ID_SCOPE_KEY) or new_request_id()
        logger.error("request %s failed with %s: a bug (the traceback follows)", request_id, type(err).__name__)
        count_refusal(request, "internal_error")
        return error_response(500, "internal_error", f"the server failed on this request ({type(err).__name__}); "
                              "it is logged", {**NOSNIFF_HEADERS, "X-Request-ID": request_id}, speaks_v2(request.scope))


def create_app(settings: Settings | None = None, engine_factory: EngineFactory = default_engine) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics()
    body_budget = BodyBudget(settings.max_buffered_body_bytes)  # HTTP bodies and gRPC messages together

    # docs_url/redoc_url None: service/pages.py serves /docs on vendored Swagger UI files (no CDN), and no ReDoc.
    app = FastAPI(title="ConvNeXt image classification", version=project_version(),
                  lifespan=service_lifespan(settings, metrics, body_budget, engine_factory),
                  responses=APP_RESPONSES, docs_url=None, redoc_url=None)
    app.state.metrics = metrics

    def current_admission() -> Admission | None:
        state = getattr(app.state, "service", None)  # set when the lifespan starts
        return state.admission if state is not None else None

    def served_manifest() -> Manifest | None:
        state = getattr(app.state, "service", None)
        return state.version.manifest if state is not None and state.version is not None else None

    # Middleware added first runs innermost: the gate runs after auth (no key, no hint of the load).
    app.add_middleware(BodyBudgetMiddleware, budget=body_budget, metrics=metrics)
    app.add_middleware(AdmissionGate, admission_of=current_admission, metrics=metrics)
    install_edge(app, settings, metrics)  # API-key auth and CORS when the settings ask for them
    install_error_handlers(app, metrics)

    # Added last, so outermost: 401s and CORS answers are counted too. Pure ASGI: Starlette's @app.middleware("http")
    # cost ~0.35 ms of CPU per request, paid by every request and every 503 under overload.
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, access_log=settings.access_log,
                       plain_routes=frozenset({app.openapi_url} if app.openapi_url else ()))
    app.state.startup_error = None
    app.add_middleware(StartupErrorInOneLine, error_of=lambda: app.state.startup_error)

    app.include_router(router)
    app.include_router(v2_router)
    app.include_router(admin_router)
    app.include_router(pages_router())
    install_openapi(app, settings, served_manifest)
    return app
