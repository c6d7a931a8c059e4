"""The OpenAPI document tells the truth: request bodies, every answer with the JSON error schema, 405s with Allow."""
from __future__ import annotations

import httpx
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

ERROR_REF = "#/components/schemas/ErrorResponse"
V2_ERROR_REF = "#/components/schemas/V2ErrorResponse"  # the Open Inference Protocol's body on /v2 paths


def json_schema(answer: dict) -> dict:
    return answer["content"]["application/json"]["schema"]


def test_classify_documents_its_bodies_its_answers_and_the_served_models_top_k(service_url):
    schema = httpx.get(f"{service_url}/openapi.json").json()
    classify = schema["paths"]["/classify"]["post"]
    assert set(classify["requestBody"]["content"]) == {"image/*", "application/octet-stream", "multipart/form-data"}
    assert set(classify["responses"]) == {"200", "400", "408", "413", "415", "422", "500", "503", "504"}
    assert json_schema(classify["responses"]["200"]) == {"$ref": "#/components/schemas/ClassifyResponse"}
    for status, answer in classify["responses"].items():
        if status != "200":
            assert json_schema(answer) == {"$ref": ERROR_REF}, status
    assert "Retry-After" in classify["responses"]["503"]["headers"]
    (top_k,) = classify["parameters"]
    assert top_k["schema"]["minimum"] == 1 and top_k["schema"]["maximum"] == 10  # the served model's classes
    # A reload's body is read under the same body timeout as an upload: 408 body_timeout is documented there too.
    assert "408" in schema["paths"]["/admin/reload"]["post"]["responses"]


def test_every_operation_documents_503_and_no_fastapi_validation_body(service_url):
    schema = httpx.get(f"{service_url}/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "503" in operation["responses"], (method, path)
            error_ref = V2_ERROR_REF if path.startswith("/v2") else ERROR_REF
            for status, answer in operation["responses"].items():
                ref = json_schema(answer).get("$ref", "") if "application/json" in answer.get("content", {}) else ""
                if status == "422" or ref.endswith("ErrorResponse"):  # the error body of the path's protocol
                    assert ref == error_ref, (method, path, status)
    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    assert httpx.get(f"{service_url}/metrics").headers["content-type"].startswith("text/plain")


def test_401_is_documented_only_where_a_key_is_needed(model_repository):
    schema = create_app(Settings(repository=str(model_repository), api_key="k")).openapi()
    assert json_schema(schema["paths"]["/classify"]["post"]["responses"]["401"]) == {"$ref": ERROR_REF}
    assert "401" not in schema["paths"]["/healthz"]["get"]["responses"]
    assert json_schema(schema["paths"]["/v2/models/{name}/infer"]["post"]["responses"]["401"]) == {
        "$ref": V2_ERROR_REF}
    without_key = create_app(Settings(repository=str(model_repository))).openapi()["paths"]
    assert all("401" not in operation["responses"] for operations in without_key.values()
               for operation in operations.values())


def test_405_names_the_allowed_methods(service_url):
    for method, path, allowed in [("TRACE", "/classify", "POST"), ("DELETE", "/healthz", "GET"),
                                  ("PUT", "/admin/reload", "POST"), ("PATCH", "/metrics", "GET")]:
        response = httpx.request(method, f"{service_url}{path}")
        assert response.status_code == 405, (method, path)
        assert response.headers["allow"] == allowed
        assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_bug_still_answers_the_json_error_body(model_repository):
    app = create_app(Settings(repository=str(model_repository)))

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug")

    response = TestClient(app, raise_server_exceptions=False).get("/bug")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    # Starlette's outermost layer answers it, outside every middleware: nosniff still comes with it.
    assert response.headers.get_list("x-content-type-options") == ["nosniff"]


def test_reload_takes_a_json_integer_not_a_boolean_nor_a_string(service_url):
    for version in (True, "1"):
        response = httpx.post(f"{service_url}/admin/reload", json={"version": version})
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_parameter", version
    not_utf8 = httpx.post(f"{service_url}/admin/reload", content=b"\x80abc",
                          headers={"content-type": "application/json"})
    assert not_utf8.status_code == 400 and not_utf8.json()["error"]["code"] == "invalid_body"
    not_json = httpx.post(f"{service_url}/admin/reload", content=b"{bad", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_body"  # as README says
    assert httpx.post(f"{service_url}/admin/reload", json={"version": 1.0}, timeout=60).json()["model"] == {
        "name": "atto", "version": 1}


def test_a_model_with_fewer_than_5_classes_answers_the_default_top_k_with_every_class(tmp_path, launch, real_photos):
    from export.onnx import export_onnx_version

    export_onnx_version(tmp_path, "three", "convnext_atto", num_classes=3, input_size=32)
    with launch(tmp_path) as url:
        top_k = httpx.get(f"{url}/openapi.json").json()["paths"]["/classify"]["post"]["parameters"][0]["schema"]
        assert (top_k["maximum"], top_k["default"]) == (3, 3)
        photo = real_photos[0].read_bytes()
        answer = httpx.post(f"{url}/classify", content=photo, headers={"content-type": "image/jpeg"}, timeout=60)
        assert answer.status_code == 200 and len(answer.json()["results"][0]["top_k"]) == 3
        explicit = httpx.post(f"{url}/classify?top_k=5", content=photo, headers={"content-type": "image/jpeg"})
        assert explicit.status_code == 422


def test_the_schema_route_is_counted_under_its_own_path_not_as_unmatched(service_url):
    """/openapi.json is a plain Starlette route (FastAPI's own), which sets no scope["route"]: it was counted under
    route="unmatched", the label of requests refused before routing."""
    def count() -> float:
        lines = httpx.get(f"{service_url}/metrics").text.splitlines()
        sample = 'convnext_requests_total{method="GET",route="/openapi.json",status="200"} '
        return sum(float(line.split()[-1]) for line in lines if line.startswith(sample))

    before = count()
    assert httpx.get(f"{service_url}/openapi.json").status_code == 200
    assert count() == before + 1
