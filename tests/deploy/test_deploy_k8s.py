"""deploy/k8s: every manifest validates strictly against the Kubernetes 1.37 and 1.25 OpenAPI schemas, and the pieces
fit."""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from compose_yaml import ROOT, load_compose, seconds
from entrypoint_settings import load_entrypoint, settings_from

from convnext_files import sidecar_path
from deploy.host_check import DOCTOR_TIMEOUT_S
from model.checkpoints import read_checkpoint
from service.engine_builds import build_timeout_s
from service.server import graceful_shutdown_s
from service.settings import Settings
from tests.service.conftest import free_port

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
OLDEST_KUBERNETES_VERSION = "1.25.0"


def documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str | None = None) -> dict:
    return next(doc for _, doc in documents() if doc["kind"] == kind and name in (None, doc["metadata"]["name"]))


@pytest.mark.parametrize("filename,document", documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_strictly(filename, document):
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("filename,document", documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_strictly_on_the_oldest_kubernetes_checked_too(filename, document):
    """No field newer than Kubernetes 1.25 (the oldest schemas kubernetes-validate has): the preStop `sleep` action
    came in 1.29, alpha and off there (KEP-3960), on by default from 1.30; older API servers refuse or drop it."""
    kubernetes_validate.validate(document, OLDEST_KUBERNETES_VERSION, strict=True)


def test_the_prestop_sleep_runs_in_the_images_base():
    """preStop execs `sleep` in the service container: the service images are built on the Debian slim Python image,
    whose coreutils has it (no distroless or scratch base without a shell's tools)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
    assert re.fullmatch(r"python:[\d.]+-slim-(bookworm|trixie)", base)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS service$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS service-cpu$", dockerfile, re.M)


def test_strict_validation_rejects_an_unknown_field():
    broken = copy.deepcopy(find("PodDisruptionBudget"))
    broken["spec"]["minAvailabel"] = broken["spec"].pop("minAvailable")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_serving_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert all((K8S / name).is_file() for name in listed)
    assert {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "pvc.yaml"} <= set(listed)


def test_deployment_takes_a_gpu_probes_readyz_healthz_and_drains_before_it_is_killed():
    pod = find("Deployment")["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "service")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # a probe answered behind a busy event loop (a large JSON body parses for ~0.25 s) must not time out at 1 s
    assert all(container[probe].get("timeoutSeconds", 1) >= 3
               for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    pre_stop_command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop_command[0] == "sleep"
    pre_stop_s = int(pre_stop_command[1])
    settings = Settings()  # uvicorn's graceful shutdown (service/server.py), then the batcher drain
    worst_case_drain_s = graceful_shutdown_s(settings) + settings.request_timeout_ms / 1000
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + worst_case_drain_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"  # no re-owning of each file per start
    assert pod["automountServiceAccountToken"] is False  # no API token in a pod that never calls the API
    prepare = pod["initContainers"][0]
    assert prepare["command"][-1] == "prepare"
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    env = {e["name"]: e.get("value") for e in container["env"]}  # threads sized to the CPU request, not the node
    assert env["CONVNEXT_PREPROCESS_WORKERS"] == env["CONVNEXT_INTRA_OP_THREADS"] == container["resources"][
        "requests"]["cpu"]
    for each in (container, prepare):  # Pod Security "restricted": no privilege escalation, no capabilities
        assert each["securityContext"]["allowPrivilegeEscalation"] is False
        assert each["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {m["name"] for m in prepare["volumeMounts"]} == {m["name"] for m in container["volumeMounts"]}


def test_rollouts_fit_a_cluster_whose_gpus_are_all_taken_and_leave_the_hpas_count():
    deployment = find("Deployment")["spec"]
    assert "replicas" not in deployment  # the HPA's: an apply would reset it
    assert find("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    assert deployment["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}  # no pod waiting for a GPU
    assert find("PodDisruptionBudget")["spec"]["minAvailable"] >= 1


def test_every_gpu_start_allowance_outlasts_the_host_check_then_the_services_own_bound_on_its_first_build(monkeypatch):
    """The service binds only after the entrypoint's host check (the doctor) and its first engine build, bounded as a
    rebuild's (build_timeout_s of the deployment's settings: the opening, a TensorRT build included, and the engine
    calls of warm-up and smoke run): k8s's startup probe, and the GPU image's and compose's health check start period
    (300 s, shorter than one engine build, before), allow both."""
    container = next(c for c in find("Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == "service")
    env = {item["name"]: item["value"] for item in container["env"] if "value" in item}
    service = settings_from(load_entrypoint(), monkeypatch, env).service
    bound_s = DOCTOR_TIMEOUT_S + build_timeout_s(service)
    assert bound_s == 600 + 1970  # the numbers the comments and README give
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= bound_s
    # A rollout is not declared failed while a new pod may still be within that allowance.
    assert find("Deployment")["spec"]["progressDeadlineSeconds"] > probe["periodSeconds"] * probe["failureThreshold"]
    compose = load_compose(ROOT / "docker-compose.yml")["services"]["service"]["healthcheck"]
    assert seconds(compose["start_period"]) >= bound_s
    gpu_stage = ROOT.joinpath("Dockerfile").read_text().split(" AS service\n", 1)[1].split("\nFROM ", 1)[0]
    (start_period,) = re.findall(r"^HEALTHCHECK .*--start-period=(\S+)", gpu_stage, re.M)
    assert seconds(start_period) >= bound_s


MODEL_SOURCE = "convnext-model-source"
MODEL_SOURCE_VARIABLES = {"CONVNEXT_MODEL", "CONVNEXT_ARCHITECTURE", "CONVNEXT_PRETRAINED", "CONVNEXT_CHECKPOINT",
                          "CONVNEXT_VERSION"}  # compose's x-model-source block


def model_source() -> dict[str, str]:
    """kustomization.yaml's generated ConfigMap that names (and may pin) the model, as KEY=VALUE literals."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (generator,) = [g for g in kustomization["configMapGenerator"] if g["name"] == MODEL_SOURCE]
    return dict(literal.split("=", 1) for literal in generator["literals"])


def container_env(container: dict, source: dict[str, str]) -> dict[str, str]:
    """A container's variables as Kubernetes sets them: its envFrom ConfigMaps first, its own env over them."""
    env: dict[str, str] = {}
    for reference in container.get("envFrom", []):
        assert reference["configMapRef"]["name"] == MODEL_SOURCE  # the one ConfigMap the pod reads
        env.update(source)
    return env | {item["name"]: item["value"] for item in container["env"] if "value" in item}  # not Secrets


def test_the_model_source_is_one_configmap_both_containers_read():
    """One place names the model: the init container and the service container read the generated ConfigMap, and
    neither sets a model-source variable of its own over it (README said "change both"; CONVNEXT_VERSION, the pin,
    was in neither container)."""
    pod = find("Deployment")["spec"]["template"]["spec"]
    assert set(model_source()) <= MODEL_SOURCE_VARIABLES
    for container in (*pod["initContainers"], *pod["containers"]):
        assert container["envFrom"] == [{"configMapRef": {"name": MODEL_SOURCE}}], container["name"]
        assert not {item["name"] for item in container["env"]} & MODEL_SOURCE_VARIABLES, container["name"]


def test_the_api_keys_come_from_an_optional_secret_to_the_service_container_alone():
    """With the Secret convnext-api-keys, its keys reach the service (the variables Settings reads); without it the
    pod still starts and the API is open, as compose without the variables. The init container gets neither."""
    spec = find("Deployment")["spec"]["template"]["spec"]
    service, init = spec["containers"][0], spec["initContainers"][0]
    secrets = {item["name"]: item["valueFrom"]["secretKeyRef"] for item in service["env"] if "valueFrom" in item}
    assert secrets == {
        "CONVNEXT_API_KEY": {"name": "convnext-api-keys", "key": "api-key", "optional": True},
        "CONVNEXT_ADMIN_API_KEY": {"name": "convnext-api-keys", "key": "admin-api-key", "optional": True}}
    assert {"api_key", "admin_api_key"} <= set(Settings.model_fields)  # CONVNEXT_ + the field's name
    assert not [item for item in init.get("env", []) if "API_KEY" in item["name"]]


def test_the_init_container_and_the_service_name_the_model_alike(monkeypatch):
    """The service container's entrypoint serves the model the init container prepared: the same name from the same
    variables (a fixed CONVNEXT_MODEL in both hid a changed CONVNEXT_PRETRAINED), and a version pinned in the
    ConfigMap is the one both take (prepare's line names it, the service serves it)."""
    pod = find("Deployment")["spec"]["template"]["spec"]
    entrypoint = load_entrypoint()
    shipped, renamed, pinned = set(), set(), set()
    for container in (*pod["initContainers"], *pod["containers"]):
        env = container_env(container, model_source())
        shipped.add(settings_from(entrypoint, monkeypatch, env).model_name)
        # README: another official checkpoint "needs only its name"
        another = container_env(container, model_source() | {"CONVNEXT_PRETRAINED": "convnext_base_22k_224"})
        renamed.add(settings_from(entrypoint, monkeypatch, another).model_name)
        pin = container_env(container, model_source() | {"CONVNEXT_VERSION": "2"})
        pinned.add(settings_from(entrypoint, monkeypatch, pin).service.version)
    assert shipped == {"convnext_tiny"} and renamed == {"convnext_base"} and pinned == {2}


def test_the_training_job_meets_pod_security_restricted_too():
    pod = find("Job")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"  # no re-owning of each file per start
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    data = next(volume for volume in pod["volumes"] if volume["name"] == "data")
    assert data["persistentVolumeClaim"]["readOnly"] is True  # the dataset is never re-owned for fsGroup


def test_service_pdb_and_hpa_point_at_the_deployment():
    deployment = find("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = find("Service", "convnext-serve")["spec"]["selector"]
    assert selector.items() <= labels.items()
    assert find("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = find("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_hpa_metric_is_served_by_an_adapter_rule_over_an_exported_gauge(metrics_scrape):
    metric = find("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(find("ConfigMap", "prometheus-adapter-convnext")["data"]["config.yaml"])["rules"]
    rule = next(r for r in rules if r["name"]["as"] == metric)
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
    assert re.search(rule["name"]["matches"], series)
    assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
    assert f"# TYPE {series} gauge" in metrics_scrape


def test_training_job_runs_one_torchrun_per_node_ranked_by_completion_index():
    job = find("Job", "convnext-train")
    headless = find("Service", "convnext-train")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"]
    assert headless["spec"]["clusterIP"] == "None"
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == headless["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    command = " ".join(container["command"] + container["args"])
    assert int(env["NNODES"]) == job["spec"]["completions"]
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{headless['metadata']['name']}"
    assert '--node-rank="$JOB_COMPLETION_INDEX"' in command
    assert "torchrun" in command and "-m training" in command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(env["NPROC_PER_NODE"])


def test_training_job_flags_are_ones_the_training_cli_accepts():
    from training.__main__ import get_args_parser

    container = find("Job", "convnext-train")["spec"]["template"]["spec"]["containers"][0]
    run_dir = next(e["value"] for e in container["env"] if e["name"] == "RUN_DIR")
    training_args = [run_dir if arg == "$RUN_DIR" else arg  # "$@": the --resume the command adds when it resumes
                     for arg in shlex.split(container["args"][0].split("-m training", 1)[1]) if arg != "$@"]
    parsed = get_args_parser().parse_args(training_args)
    assert (parsed.preset, parsed.data_dir, parsed.batch_size, parsed.accum_steps) == ("in1k", "/data/imagenet", 128, 2)
    assert parsed.output == "/runs/in1k"


def _run_training_job_command(run_dir, epochs: int) -> subprocess.CompletedProcess:
    """The Job container's command as Kubernetes runs it (/bin/sh -c, real torchrun, one node of one process), with
    flags appended that turn its ImageNet run into a tiny demo run (the last of a repeated flag wins)."""
    container = find("Job", "convnext-train")["spec"]["template"]["spec"]["containers"][0]
    demo = (f" --preset demo --data-dir '' --batch-size 8 --accum-steps 1 --epochs {epochs} --max-steps-per-epoch 1"
            " --disable-eval --workers 0 --quiet")
    env = {**os.environ, "NNODES": "1", "NPROC_PER_NODE": "1", "JOB_COMPLETION_INDEX": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RUN_DIR": str(run_dir),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*container["command"], container["args"][0] + demo], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _epochs_trained(stderr: str) -> list[int]:
    """The epochs of the epoch records a run printed (one JSON line each)."""
    return [json.loads(line)["epoch"] for line in stderr.splitlines() if line.startswith('{"epoch": ')]


@pytest.mark.timeout(600)
def test_the_training_job_applied_again_after_a_failure_resumes_instead_of_starting_over(tmp_path):
    """backoffLimit 0: a failed Job is deleted and applied again, same command, same run folder. It must continue
    from the folder's checkpoint_last.pth, not train from epoch 0 over the run's checkpoints; after a kill during the
    first epoch's save (its best checkpoint written, checkpoint_last.pth not yet), from the best one: training refuses
    to start over there, so every re-apply failed."""
    first = _run_training_job_command(tmp_path / "in1k", epochs=1)  # the run the failure ended after epoch 0
    assert first.returncode == 0 and _epochs_trained(first.stderr) == [0], first.stderr[-3000:]
    best_only = tmp_path / "best-only"  # the same epoch-0 state, saved as the first epoch saves it first
    best_only.mkdir()
    shutil.copyfile(tmp_path / "in1k" / "checkpoint_last.pth", best_only / "checkpoint_best.pth")
    sidecar = sidecar_path(tmp_path / "in1k" / "checkpoint_last.pth").read_text()
    sidecar_path(best_only / "checkpoint_best.pth").write_text(sidecar.replace("checkpoint_last", "checkpoint_best"))
    again = _run_training_job_command(tmp_path / "in1k", epochs=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _epochs_trained(again.stderr) == [1]  # resumed: epoch 0 is not trained again
    assert read_checkpoint(tmp_path / "in1k" / "checkpoint_last.pth")["epoch"] == 1
    from_best = _run_training_job_command(best_only, epochs=2)
    assert from_best.returncode == 0, from_best.stderr[-3000:]
    assert _epochs_trained(from_best.stderr) == [1]
    assert read_checkpoint(best_only / "checkpoint_last.pth")["epoch"] == 1
