"""pyproject's extras: a host installs exactly one ONNX Runtime (onnxruntime or onnxruntime-gpu), never both.

Both packages write the same onnxruntime/ folder; installed together, the last one wins and the CUDA provider usually
disappears. Checked with pip as well (pip install --dry-run --report, 2026-11): `.[serve,train,export,dev]` resolves
to 140 packages with neither, `.[serve,gpu,export,dev]` to onnxruntime-gpu only, the GPU image's `serve gpu` set to
onnxruntime-gpu only (no package pulls the CPU onnxruntime in); the test below proves it again over what is installed.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib

import pytest
from compose_yaml import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
ONNXRUNTIMES = {"onnxruntime", "onnxruntime-gpu"}
_spec = importlib.util.spec_from_file_location("deploy_requirements", ROOT / "deploy" / "requirements.py")
image_requirements = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(image_requirements)


def names(extras: list[str]) -> set[str]:
    return {image_requirements.requirement_name(r) for r in image_requirements.requirements(extras, [])}


def install_sets() -> dict[str, list[str]]:
    """Every extras list this repository installs: the Makefile, each Dockerfile stage, the GPU check script."""
    sets = {"Makefile": re.search(r"^EXTRAS \?= (\S+)", (ROOT / "Makefile").read_text(), re.M).group(1).split(",")}
    for i, match in enumerate(re.finditer(r"deploy/requirements\.py ((?:\w+ )+)>", (ROOT / "Dockerfile").read_text())):
        sets[f"Dockerfile #{i + 1}"] = match.group(1).split()
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    sets["gpu_check.sh"] = re.search(r'pip install -e "\$\{ROOT\}\[([\w,]+)\]"', script).group(1).split(",")
    return sets


def test_serve_and_export_pin_no_onnxruntime_cpu_and_gpu_one_each():
    for extra in ("serve", "export", "train", "dev", "bench"):
        assert not names([extra]) & ONNXRUNTIMES, extra
    assert names(["cpu"]) & ONNXRUNTIMES == {"onnxruntime"}
    assert names(["gpu"]) & ONNXRUNTIMES == {"onnxruntime-gpu"}
    assert "onnxruntime-gpu[cuda,cudnn]==1.31.1" in EXTRAS["gpu"]  # CUDA runtime + cuDNN as pip wheels
    assert {"tensorrt-cu13==11.4.0.106", "cuda-python==13.4.4"} <= set(EXTRAS["gpu"])


@pytest.mark.parametrize("where,extras", install_sets().items())
def test_every_install_in_this_repository_gets_exactly_one_onnxruntime(where, extras):
    assert len(names(extras) & ONNXRUNTIMES) == 1, (where, extras)


def test_the_test_install_is_cpu_and_the_gpu_check_is_gpu():
    sets = install_sets()
    assert sets["Makefile"] == ["serve", "cpu", "train", "export", "dev", "bench"]
    assert sets["gpu_check.sh"] == ["serve", "gpu", "export", "train", "dev", "bench"]  # train: the train-amp step


def test_asking_for_both_onnxruntimes_is_refused():
    with pytest.raises(SystemExit, match="install both onnxruntime and onnxruntime-gpu"):
        image_requirements.requirements(["serve", "cpu", "gpu"], [])


def dependency_tree(requirements: list[str]) -> tuple[dict[str, str], list[str]]:
    """{package: the package that requires it} over the installed distributions' Requires-Dist (markers evaluated
    here, extras followed), and the required packages that are not installed."""
    required_by: dict[str, str] = {}
    missing, seen = [], set()
    queue = [(Requirement(r), "pyproject.toml") for r in requirements]
    while queue:
        requirement, parent = queue.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        required_by.setdefault(name, parent)
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
            continue
        for text in distribution.requires or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in {"", *requirement.extras}):
                queue.append((child, name))
    return required_by, missing


def test_no_installed_dependency_of_serve_train_export_dev_pulls_in_an_onnxruntime():
    roots = [r for extra in ("serve", "train", "export", "dev", "bench") for r in EXTRAS[extra]]
    required_by, missing = dependency_tree(roots)
    assert not missing, f"install the test extras first (make install): {missing}"
    assert len(required_by) > 100  # the walk really followed the tree (torch, timm, litserve, tritonclient, ...)
    assert {"onnx", "onnxscript", "onnxconverter-common", "litserve", "tritonclient"} <= set(required_by)
    assert not {name: by for name, by in required_by.items() if name in ONNXRUNTIMES}


def locked(lock: str) -> dict[str, tuple[str, list[str]]]:
    """{package: (version, its sha256 hashes)} of a lock file written by `make lock` (uv pip compile)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    for entry in re.split(r"\n(?=\S)", (ROOT / lock).read_text()):
        if entry.startswith("#") or not entry.strip():
            continue
        name, version = entry.split()[0].split("==")
        pins[canonicalize_name(name)] = (version, re.findall(r"--hash=sha256:([0-9a-f]{64})", entry))
    return pins


@pytest.mark.parametrize("lock,extras", [("locks/dev.txt", install_sets()["Makefile"]),
                                         ("locks/service-cpu.txt", ["serve", "cpu"])])
def test_each_lock_pins_every_package_with_hashes_at_pyprojects_versions(lock, extras):
    pins = locked(lock)
    assert all(hashes for _, hashes in pins.values()), [name for name, (_, h) in pins.items() if not h]
    for text in image_requirements.requirements(extras, []):
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{lock} lacks {name}: run `make lock` after editing pyproject.toml"
        assert requirement.specifier.contains(pins[name][0]), (lock, text, pins[name][0])
    assert "onnxruntime-gpu" not in pins


def test_the_locked_torch_is_the_local_wheel_and_the_installs_use_the_locks():
    version, hashes = locked("locks/dev.txt")["torch"]
    assert version == "2.14.1" and len(hashes) == 1  # only the local wheel has it (its hash, not PyPI's)
    assert "torch" not in locked("locks/service-cpu.txt")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK \?= locks/dev\.txt$", makefile, re.M)
    assert "pip install -q --require-hashes -r $(LOCK)" in makefile and "pip install -q --no-deps -e ." in makefile
    assert "--require-hashes -r locks/service-cpu.txt" in (ROOT / "Dockerfile").read_text()


def test_the_gpu_onnxruntime_probe_is_hash_pinned_at_the_cpu_packages_version():
    """`make test` installs onnxruntime-gpu beside the venv for tests/service/test_ort_providers.py: from its own
    lock with hashes, as everything else it installs, and at the version of the locked CPU package."""
    pins = locked("locks/ort-gpu-probe.txt")
    assert set(pins) == {"onnxruntime-gpu"} and pins["onnxruntime-gpu"][1]
    assert pins["onnxruntime-gpu"][0] == locked("locks/dev.txt")["onnxruntime"][0]
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps --require-hashes --target $(ORT_GPU_PROBE) -r locks/ort-gpu-probe.txt" in makefile
