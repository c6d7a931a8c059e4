"""The app's OpenAPI document: what holds for every route, the API key when one is set, the served model's bounds.

Routes declare their own bodies and answers (service/schemas.py, `error_responses`); this adds what the app's outer
layers answer on any route, which no route can see: 503 at the connection limit (service/server.py), 401 from the
API key edge or, without a key, 403 from the Host check on /admin (service/security.py), 422 from the validation
handler in the service's error body; and on /v2 paths every error answer in the Open Inference Protocol's body
(V2ErrorResponse).
"""
from __future__ import annotations

import copy
from collections.abc import Callable

from fastapi import FastAPI

from runtime.repository import Manifest
from service.errors import ErrorResponse, V2ErrorResponse, error_responses, is_under, is_v2_path
from service.security import ADMIN_PREFIX, required_key
from service.settings import Settings

# Every route but the probes (service.server.PROBE_PATHS): beyond max_connections the server answers 503 before
# routing (routes may say more about their 503).
APP_RESPONSES = error_responses(503, descriptions={503: "The server is at its connection limit "
                                                        "(too_many_connections); retry after Retry-After"})
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
V2_ERROR_REF = {"$ref": "#/components/schemas/V2ErrorResponse"}
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
TOP_K = ("/classify", "post", "top_k")  # 1 .. the served model's class count
# The two ways to send a key, once per key: with admin_api_key set, /admin takes its own pair, so the docs' Authorize
# dialog holds both keys and each call sends only its own (a call carrying both would be refused: service.api_keys).
API_KEY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "the API key (CONVNEXT_API_KEY)"},
    "api_key": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                "description": "the API key (CONVNEXT_API_KEY)"},
}
ADMIN_KEY_SCHEMES = {
    "admin_bearer": {"type": "http", "scheme": "bearer", "description": "the admin key (CONVNEXT_ADMIN_API_KEY), "
                                                                         "for /admin"},
    "admin_api_key": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                      "description": "the admin key (CONVNEXT_ADMIN_API_KEY), for /admin"},
}


def install_openapi(app: FastAPI, settings: Settings, served_manifest: Callable[[], Manifest | None]) -> None:
    """Replace `app.openapi` with the completed document, built once per served model version."""
    build_base = app.openapi  # FastAPI's own, cached in app.openapi_schema
    documents: dict[tuple[str, int] | None, dict] = {}

    def openapi() -> dict:
        manifest = served_manifest()
        key = (manifest.name, manifest.version) if manifest is not None else None
        if key not in documents:
            documents.clear()  # one served version at a time
            schema = copy.deepcopy(build_base())
            errors_in_service_body(schema)
            if manifest is not None:
                bound_top_k(schema, manifest.num_classes)
            if settings.api_key is not None or settings.admin_api_key is not None:
                declare_api_key(schema, settings)
            else:
                declare_admin_host_check(schema)
            v2_errors_in_protocol_body(schema)
            documents[key] = schema
        return documents[key]

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def operations(schema: dict):
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            yield path, method, operation


def errors_in_service_body(schema: dict) -> None:
    """FastAPI documents its own 422 body; the app's validation handler answers the service's error body instead."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorResponse" not in components:
        body = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components["ErrorResponse"] = body
    for _, _, operation in operations(schema):
        answer = operation.get("responses", {}).get("422")
        content = (answer or {}).get("content", {}).get("application/json", {})
        if content.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
            content["schema"] = dict(ERROR_REF)
    for name in FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)


def v2_errors_in_protocol_body(schema: dict) -> None:
    """Every error answer documented on a /v2 path (the routes' own, 401, 422, the connection limit's 503) has the
    protocol's body, as service.errors.error_body writes it there."""
    schema.setdefault("components", {}).setdefault("schemas", {})["V2ErrorResponse"] = \
        V2ErrorResponse.model_json_schema()
    for path, _, operation in operations(schema):
        if not is_v2_path(path):
            continue
        for answer in operation.get("responses", {}).values():
            content = answer.get("content", {}).get("application/json", {})
            if content.get("schema") == ERROR_REF:
                content["schema"] = dict(V2_ERROR_REF)


def bound_top_k(schema: dict, num_classes: int) -> None:
    """top_k's maximum is the served model's class count (422 beyond it), known once the model is loaded."""
    path, method, name = TOP_K
    operation = schema.get("paths", {}).get(path, {}).get(method, {})
    for parameter in operation.get("parameters", []):
        if parameter["name"] == name:
            parameter["schema"]["maximum"] = num_classes
            parameter["schema"]["default"] = min(parameter["schema"].get("default", num_classes), num_classes)


def declare_api_key(schema: dict, settings: Settings) -> None:
    """The two ways to send each key (the docs' Authorize button), and 401 on every path that needs one
    (service.security.required_key: the api key, or the admin key on /admin)."""
    schemes: dict[str, dict] = {}
    unauthorized = error_responses(401)[401]
    for path, _, operation in operations(schema):
        if required_key(settings, path) is None:
            continue
        own_key = settings.admin_api_key is not None and is_under(path, ADMIN_PREFIX)
        ways = ADMIN_KEY_SCHEMES if own_key else API_KEY_SCHEMES
        schemes.update(ways)
        operation["security"] = [{name: []} for name in ways]
        operation["responses"]["401"] = {"description": unauthorized["description"],
                                         "headers": unauthorized["headers"],
                                         "content": {"application/json": {"schema": dict(ERROR_REF)}}}
    schema.setdefault("components", {})["securitySchemes"] = schemes


def declare_admin_host_check(schema: dict) -> None:
    """403 on /admin while it needs no key: a Host, or an Origin, naming neither an IP address, localhost nor an
    allowed host (service.security.AdminHostMiddleware)."""
    for path, _, operation in operations(schema):
        if is_under(path, ADMIN_PREFIX):
            operation["responses"]["403"] = {
                "description": "The request's Host, or its Origin, is a name neither localhost nor in allowed_hosts "
                               "(host_not_allowed; only while /admin needs no key: DNS rebinding)",
                "content": {"application/json": {"schema": dict(ERROR_REF)}}}
