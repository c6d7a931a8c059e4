"""The Dockerfile: hadolint-clean, pinned bases, and the three targets (GPU service, CPU service, train/export)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess

import pytest

from compose_yaml import ROOT

DOCKERFILE = ROOT / "Dockerfile"
# deploy/requirements.py: what the images pip-install (a script, not a package, so it is loaded by path).
_spec = importlib.util.spec_from_file_location("deploy_requirements", ROOT / "deploy" / "requirements.py")
image_requirements = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_requirements)


def stages() -> dict[str, list[str]]:
    """Instructions per build stage (continuation lines joined), keyed by the stage name."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = match.group(2) or match.group(1)
            result[current] = [line]
        elif current is not None:
            result[current].append(line)
    return result


def build_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_live_and_flags_an_unpinned_base(tmp_path):
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install fastapi\n")
    result = subprocess.run([hadolint, str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_base_images_are_pinned():
    args = build_args()
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d{2}\.\d{2}-py3", args["TENSORRT_IMAGE"])
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"[0-9a-f]{64}", args["TINI_SHA256"])


@pytest.mark.parametrize("target,base", [("service", "${TENSORRT_IMAGE}"), ("service-cpu", "${PYTHON_IMAGE}"),
                                         ("train", "${PYTHON_IMAGE}")])
def test_each_target_runs_non_root_under_tini(target, base):
    body = stages()[target]
    assert body[0].split()[1] == base
    users = [line.split()[1] for line in body if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any("tini" in line for line in body if line.startswith("ENTRYPOINT"))
    assert 'VOLUME ["/models"]' in body


@pytest.mark.parametrize("target", ["service", "service-cpu"])
def test_service_targets_check_healthz_and_expose_8000(target):
    body = stages()[target]
    assert any(line.startswith("HEALTHCHECK") and "healthcheck.py" in line for line in body)
    assert "/healthz" in (ROOT / "deploy" / "healthcheck.py").read_text()
    assert "EXPOSE 8000" in body


def test_gpu_image_installs_onnxruntime_gpu_and_no_torch_nor_cpu_onnxruntime():
    assert "deploy/requirements.py serve gpu --without onnxruntime" in " ".join(stages()["gpu-deps"])
    names = [image_requirements.requirement_name(r) for r in image_requirements.requirements(["serve", "gpu"], ["onnxruntime"])]
    assert "onnxruntime-gpu" in names and "tensorrt-cu13" in names
    assert "onnxruntime" not in names
    assert not {"torch", "torchvision", "timm"} & set(names)


def test_cpu_image_installs_the_serve_extra_without_torch():
    assert "deploy/requirements.py serve >" in " ".join(stages()["cpu-deps"])
    names = [image_requirements.requirement_name(r) for r in image_requirements.requirements(["serve"], [])]
    assert "onnxruntime" in names and "fastapi" in names
    assert not {"torch", "onnxruntime-gpu"} & set(names)


def test_train_image_has_torch_for_torchrun_and_export():
    assert "deploy/requirements.py train export" in " ".join(stages()["train"])
    names = {image_requirements.requirement_name(r) for r in image_requirements.requirements(["train", "export"], [])}
    assert {"torch", "torchvision", "onnx", "onnxruntime"} <= names


def test_unknown_extra_is_refused_with_the_known_ones():
    with pytest.raises(SystemExit, match="unknown extras"):
        image_requirements.requirements(["serv"], [])
