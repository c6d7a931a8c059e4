"""docker-compose.yml (GPU host) and docker-compose.cpu.yml (CPU override) against the Compose Specification schema."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import check_jsonschema
import jsonschema
import pytest
from compose_yaml import ROOT, container_environment, interpolate, load_compose, merge_compose, seconds, strip_tags
from entrypoint_settings import load_entrypoint, settings_from

from service.server import graceful_shutdown_s
from service.settings import Settings

COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
# The compose-spec JSON schema (Apache-2.0) that check-jsonschema vendors from github.com/compose-spec/compose-spec.
SCHEMA_PATH = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def errors_of(validator, document) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.fixture(scope="module")
def gpu() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def cpu(gpu) -> dict:
    return merge_compose(gpu, load_compose(COMPOSE_CPU))


def test_compose_files_follow_the_compose_specification(validator, gpu, cpu):
    assert errors_of(validator, gpu) == []
    assert errors_of(validator, strip_tags(load_compose(COMPOSE_CPU))) == []
    assert errors_of(validator, cpu) == []


def test_the_schema_rejects_a_misspelled_service_key(validator, gpu):
    broken = copy.deepcopy(gpu)
    broken["services"]["service"]["helthcheck"] = broken["services"]["service"].pop("healthcheck")
    assert any("helthcheck" in e for e in errors_of(validator, broken))


def test_prepare_runs_once_in_the_train_image_and_the_service_waits_for_it(gpu):
    prepare, service = gpu["services"]["prepare"], gpu["services"]["service"]
    assert prepare["build"]["target"] == "train"
    assert prepare["command"][-1] == "prepare"
    assert prepare["restart"] == "no"
    assert service["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    shared = {v.split(":")[0] for v in prepare["volumes"]} & {v.split(":")[0] for v in service["volumes"]}
    assert "models" in shared and "models" in gpu["volumes"]


def test_gpu_service_reserves_one_nvidia_gpu_and_serves_on_8000(gpu):
    service = gpu["services"]["service"]
    assert service["build"]["target"] == "service"
    assert service["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert any(str(p).endswith(":8000") for p in service["ports"])
    assert service["environment"]["CONVNEXT_ENGINE"].endswith("tensorrt}")


def test_every_long_running_service_restarts_and_has_a_health_check(gpu):
    for name in ("service", "prometheus", "grafana"):
        assert gpu["services"][name]["restart"] == "unless-stopped", name
        assert gpu["services"][name]["healthcheck"]["test"], name
    assert "/app/deploy/healthcheck.py" in gpu["services"]["service"]["healthcheck"]["test"]


def test_stop_grace_period_outlasts_the_service_drain(gpu):
    # uvicorn's graceful shutdown (service/server.py graceful_shutdown_s), then the batcher drain (request timeout).
    settings = Settings()
    worst_case_drain_s = graceful_shutdown_s(settings) + settings.request_timeout_ms / 1000
    default = interpolate(gpu, {})["services"]["service"]["stop_grace_period"]
    assert seconds(default) > worst_case_drain_s
    # A longer request timeout needs a longer grace period: the variable sets it, as the file's comment says.
    longer = Settings(request_timeout_ms=60_000)
    needed_s = graceful_shutdown_s(longer) + longer.request_timeout_ms / 1000
    assert needed_s == 2 * 60 + 10 > seconds(default)
    raised = interpolate(gpu, {"CONVNEXT_STOP_GRACE_PERIOD": "140s"})["services"]["service"]["stop_grace_period"]
    assert seconds(raised) > needed_s


def test_cpu_override_serves_the_cpu_image_without_a_gpu_reservation(cpu):
    service = cpu["services"]["service"]
    assert service["build"]["target"] == "service-cpu"
    assert "deploy" not in service
    # The faster fp32 CPU engine, measured at start, unless the shell or .env names one (README "CPU-only host").
    assert service["environment"]["CONVNEXT_ENGINE"] == "${CONVNEXT_ENGINE:-auto}"
    assert service["environment"]["CONVNEXT_PROVIDER"] == "cpu"
    # The service's own CPU defaults, not the GPU file's batch 32 (merged maps would keep it): README "Settings".
    settings = Settings.model_fields
    assert service["environment"]["CONVNEXT_MAX_BATCH_SIZE"] == \
        f"${{CONVNEXT_MAX_BATCH_SIZE:-{settings['max_batch_size'].default}}}"
    assert service["environment"]["CONVNEXT_MAX_QUEUE_DELAY_MS"] == \
        f"${{CONVNEXT_MAX_QUEUE_DELAY_MS:-{settings['max_queue_delay_ms'].default:g}}}"
    assert service["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert service["healthcheck"]["test"] == load_compose(COMPOSE)["services"]["service"]["healthcheck"]["test"]


def test_grafana_and_prometheus_mount_the_files_this_repository_ships(gpu):
    for name in ("prometheus", "grafana"):
        for volume in gpu["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_gpu_service_holds_on_a_failed_host_check_instead_of_restarting_in_a_loop(gpu):
    # deploy/host_check.py keeps the process up (not ready) on a wrong host, so `unless-stopped` never loops.
    service = gpu["services"]["service"]
    assert service["environment"]["CONVNEXT_HOST_CHECK"] == "${CONVNEXT_HOST_CHECK:-hold}"
    assert service["restart"] == "unless-stopped"
    assert "docker compose run --rm --no-deps service doctor" in COMPOSE.read_text()


def test_every_service_setting_reaches_the_container_when_set_in_the_shell_or_env(gpu):
    """A setting compose does not name never reaches the container: CONVNEXT_API_KEY in .env would leave the service
    open while its user believes it is protected. The ones without a value pass through when set, unset otherwise."""
    environment = gpu["services"]["service"]["environment"]
    assert {f"CONVNEXT_{name.upper()}" for name in Settings.model_fields} <= set(environment)
    assert environment["CONVNEXT_API_KEY"] is None and environment["CONVNEXT_API_KEY_FILE"] is None


def test_prepare_gets_every_variable_the_entrypoint_reads(gpu):
    entrypoint = (ROOT / "deploy" / "entrypoint.py").read_text()
    read = set(re.findall(r"variable\(\"(CONVNEXT_[A-Z_]+)\"\)", entrypoint)) - {"CONVNEXT_HOST_CHECK"}  # service's
    read.add("CONVNEXT_VERSION")  # read through the service's Settings: the pinned version prepare's line names
    assert read <= set(gpu["services"]["prepare"]["environment"])


@pytest.mark.parametrize(("shell", "name"), [
    ({}, "convnext_tiny"),
    ({"CONVNEXT_PRETRAINED": "convnext_base_22k_224"}, "convnext_base"),  # README: "needs only its name"
    ({"CONVNEXT_CHECKPOINT": "/checkpoints/my_small.pth", "CONVNEXT_ARCHITECTURE": "convnext_small"}, "convnext_small"),
    ({"CONVNEXT_CHECKPOINT": "/checkpoints/my_small.pth"}, "my_small"),
    ({"CONVNEXT_MODEL": "mine", "CONVNEXT_PRETRAINED": "convnext_base_22k_224"}, "mine"),
    ({"CONVNEXT_MODEL": "", "CONVNEXT_PRETRAINED": ""}, "convnext_tiny"),  # empty in .env: unset
])
def test_prepare_and_the_service_name_the_model_from_what_the_shell_or_env_sets(gpu, monkeypatch, shell, name):
    """Compose gave both containers CONVNEXT_MODEL=convnext_tiny, so a new CONVNEXT_PRETRAINED alone kept the old
    model (already prepared) or served new weights as convnext_tiny: the entrypoint's own naming never ran."""
    entrypoint = load_entrypoint()
    for service in ("prepare", "service"):
        settings = settings_from(entrypoint, monkeypatch, container_environment(gpu, service, shell))
        assert settings.model_name == name, service


def published(port: str) -> tuple[str | None, str, str]:
    """(host IP or None for every interface, host port, container port) of a short-syntax `ports:` entry."""
    parts = port.rsplit(":", 2)
    return (None, *parts) if len(parts) == 2 else (parts[0], parts[1], parts[2])


@pytest.mark.parametrize("compose", ["gpu", "cpu"])
def test_monitoring_ports_are_this_hosts_only_and_the_service_ports_are_public(compose, request):
    """Prometheus has no login and Grafana shows anonymous viewers the dashboard: by default both listen on
    127.0.0.1 only, while the service's HTTP and gRPC ports stay on every interface."""
    document = request.getfixturevalue(compose)
    services = interpolate(document, {"GRAFANA_ADMIN_PASSWORD": "s3cret"})["services"]
    assert [published(p) for p in services["prometheus"]["ports"]] == [("127.0.0.1", "9090", "9090")]
    assert [published(p) for p in services["grafana"]["ports"]] == [("127.0.0.1", "3000", "3000")]
    assert [published(p) for p in services["service"]["ports"]] == [(None, "8000", "8000"), (None, "8001", "8001")]
    opened = interpolate(document, {"GRAFANA_ADMIN_PASSWORD": "s3cret", "MONITORING_BIND": "0.0.0.0"})["services"]
    assert published(opened["grafana"]["ports"][0])[0] == "0.0.0.0"


@pytest.mark.parametrize("compose", ["gpu", "cpu"])
def test_the_published_ports_are_their_own_variables_and_the_services_settings_reach_the_container(
        compose, request, monkeypatch):
    """CONVNEXT_GRPC_PORT fed only the host side of the mapping: =0 (README: no gRPC server) published a random host
    port with gRPC still on, and CONVNEXT_HOST never reached the container (IPv6-only networks need "::")."""
    document = request.getfixturevalue(compose)
    entrypoint = load_entrypoint()

    def started_with(shell: dict[str, str]) -> tuple[list, Settings]:
        ports = [published(p) for p in interpolate(document, shell)["services"]["service"]["ports"]]
        return ports, settings_from(entrypoint, monkeypatch, container_environment(document, "service", shell)).service

    ports, settings = started_with({})
    assert ports == [(None, "8000", str(settings.port)), (None, "8001", str(settings.grpc_port))]
    assert (settings.host, settings.port, settings.grpc_port) == ("0.0.0.0", 8000, 8001)
    prometheus = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert f'targets: ["service:{settings.port}"]' in prometheus  # the container's port, whatever is published

    ports, settings = started_with({"CONVNEXT_GRPC_PORT": "0"})
    assert settings.grpc_port == 0  # no gRPC server ...
    assert ports == [(None, "8000", "8000"), (None, "8001", "8001")]  # ... and no random public port

    ports, settings = started_with({"CONVNEXT_PUBLISH_PORT": "9000", "CONVNEXT_GRPC_PUBLISH_PORT": "9001",
                                    "CONVNEXT_HOST": "::"})
    assert ports == [(None, "9000", "8000"), (None, "9001", "8001")]
    assert (settings.host, settings.port, settings.grpc_port) == ("::", 8000, 8001)


def test_grafanas_admin_password_comes_from_the_environment_and_compose_up_needs_none(gpu):
    """`docker compose up` runs with nothing set: unset, Grafana keeps its own admin/admin (on a port of this host
    only, and it asks for a new one at the first login); set, the operator's."""
    environment = gpu["services"]["grafana"]["environment"]
    assert interpolate(gpu, {})["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "admin"
    grafana = interpolate(gpu, {"GRAFANA_ADMIN_PASSWORD": "s3cret"})["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"
    assert not any(key.startswith(("GF_SECURITY_ADMIN_USER", "GF_SECURITY_ADMIN_PASSWORD__FILE")) for key in grafana)
    # anonymous visitors may only view, nobody signs up, and the service's own settings never carry the password
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer" and grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "${GRAFANA_ANONYMOUS:-true}"
    assert interpolate(gpu, {"GRAFANA_ADMIN_PASSWORD": "x", "GRAFANA_ANONYMOUS": "false"})["services"]["grafana"][
        "environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GRAFANA_ADMIN_PASSWORD" not in str(gpu["services"]["service"]) + str(gpu["services"]["prepare"])


@pytest.mark.parametrize("text,env,expected", [
    ("${A:-x}", {}, "x"), ("${A:-x}", {"A": ""}, "x"), ("${A-x}", {"A": ""}, ""), ("${A}", {"A": "1"}, "1"),
    ("$A/$$B", {"A": "1"}, "1/$B"), ("${A:+on}", {"A": "1"}, "on"), ("${A:+on}", {}, ""), ("${A?e}", {"A": ""}, ""),
])
def test_the_interpolation_follows_compose(text, env, expected):
    assert interpolate(text, env) == expected
