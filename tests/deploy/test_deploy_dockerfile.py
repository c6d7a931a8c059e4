"""The Dockerfile: hadolint-clean, pinned bases, and the three targets (GPU service, CPU service, train/export)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

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


def test_base_images_are_pinned_and_the_gpu_image_needs_no_nvidia_base():
    args = build_args()
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"])
    # CUDA, cuDNN and TensorRT come as pip wheels: no NGC base (its PIP_CONSTRAINT, entrypoint and missing venv).
    assert "nvcr.io" not in "".join(line for line in DOCKERFILE.read_text().splitlines()
                                    if line.startswith(("FROM", "ARG")))


# tini v0.19.0's release binaries (github.com/krallin/tini/releases/tag/v0.19.0, its .sha256sum files), as pinned
# independently by e.g. the Neo4j and Kroxylicious images and bazel-buildfarm.
TINI_V0_19_0_SHA256 = {
    "amd64": "93dcc18adc78c65a028a84799ecf8ad40c936fdfc5f2a57b1acda5a8117fa82c",
    "arm64": "07952557df20bfd2a95f9bef198b445e006171969499a1d361bd9e6f8e5e0e81",
}


def test_tini_is_fetched_and_checked_for_amd64_and_arm64():
    args, body = build_args(), stages()["tini"]
    assert args["TINI_VERSION"] == "v0.19.0"
    for arch, sha256 in TINI_V0_19_0_SHA256.items():
        assert args[f"TINI_SHA256_{arch.upper()}"] == sha256
        add = next(line for line in body if line.startswith("ADD ") and f"/tini-{arch} " in line)
        assert f"--checksum=sha256:${{TINI_SHA256_{arch.upper()}}}" in add
        assert add.split()[-2].endswith(f"/releases/download/${{TINI_VERSION}}/tini-{arch}")
    assert "ARG TARGETARCH" in body


@pytest.mark.parametrize("arch", ["amd64", "arm64", "riscv64", ""])
def test_the_tini_stage_keeps_the_target_platforms_binary_and_refuses_others(tmp_path, arch):
    """The stage's RUN, run by sh with BuildKit's TARGETARCH, on stand-ins of the two checked downloads."""
    run = next(line for line in stages()["tini"] if line.startswith("RUN "))
    for each in TINI_V0_19_0_SHA256:
        (tmp_path / f"tini-{each}").write_text(each)
    script = run.removeprefix("RUN ").replace("/tini", f"{tmp_path}/tini")
    result = subprocess.run(["sh", "-c", script], env={"TARGETARCH": arch, "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30)
    if arch in TINI_V0_19_0_SHA256:
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "tini").read_text() == arch
    else:
        assert result.returncode == 1 and not (tmp_path / "tini").exists()
        assert f"no tini checksum for TARGETARCH={arch or 'unset'}" in result.stderr


def run_platform_guard(stage: str, install_marker: str, arch: str) -> subprocess.CompletedProcess:
    """The `if ... fi` that opens `stage`'s install RUN (the one naming install_marker), run by sh with TARGETARCH."""
    assert "ARG TARGETARCH" in stages()[stage]
    install = next(line for line in stages()[stage] if line.startswith("RUN ") and install_marker in line)
    guard = re.match(r"RUN (if .*?\bfi\b)\s+&&", install).group(1)
    return subprocess.run(["sh", "-c", guard], env={"TARGETARCH": arch, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_cpu_image_refuses_other_platforms_while_its_lock_is_x86_64_only(arch):
    """locks/service-cpu.txt holds the x86-64 wheels' hashes (`make lock`): on arm64 pip would refuse numpy's wheel
    as if tampered with, so the stage stops first and says why; re-locking for arm64 too retires this check."""
    lock_platforms = re.findall(r"--python-platform\s+(\S+)", (ROOT / "Makefile").read_text())
    assert lock_platforms == ["x86_64-manylinux_2_28"]
    result = run_platform_guard("cpu-deps", "service-cpu.txt", arch)
    if arch == "amd64":
        assert result.returncode == 0 and not result.stderr
    else:
        assert result.returncode == 1 and "locked for x86-64 (amd64) only" in result.stderr


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_the_gpu_image_refuses_other_platforms_where_pypi_has_no_onnxruntime_gpu(arch):
    """onnxruntime-gpu's wheels on PyPI are x86-64 only (its Linux aarch64 CUDA builds are on Microsoft's own feed):
    an arm64 build stops before its first download and says why, not at pip's "no matching distribution"."""
    result = run_platform_guard("gpu-deps", "check_nvidia_index.py", arch)
    if arch == "amd64":
        assert result.returncode == 0 and not result.stderr
    else:
        assert result.returncode == 1 and "onnxruntime-gpu, which PyPI has for x86-64 (amd64) only" in result.stderr
        assert "--platform linux/amd64" in result.stderr


@pytest.mark.parametrize("target,base", [("service", "${PYTHON_IMAGE}"), ("service-cpu", "${PYTHON_IMAGE}"),
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
    assert "deploy/requirements.py serve gpu >" in " ".join(stages()["gpu-deps"])
    names = [image_requirements.requirement_name(r) for r in image_requirements.requirements(["serve", "gpu"], [])]
    assert "onnxruntime-gpu" in names and "tensorrt-cu13" in names and "cuda-python" in names
    assert "onnxruntime" not in names
    assert not {"torch", "torchvision", "timm"} & set(names)


def test_cpu_image_installs_the_serve_extra_without_torch():
    assert "deploy/requirements.py serve cpu >" in " ".join(stages()["cpu-deps"])
    # From its lock, hashes required; then pyproject's pins, with no index, must already be met (a stale lock fails).
    install = " ".join(stages()["cpu-deps"])
    assert "COPY locks/service-cpu.txt locks/service-cpu.txt" in install
    assert "pip install --no-cache-dir --require-hashes -r locks/service-cpu.txt" in install
    assert "pip install --no-cache-dir --no-index -r /tmp/requirements.txt" in install
    names = [image_requirements.requirement_name(r) for r in image_requirements.requirements(["serve", "cpu"], [])]
    assert "onnxruntime" in names and "fastapi" in names
    assert not {"torch", "onnxruntime-gpu"} & set(names)


def test_train_image_has_torch_for_torchrun_and_export():
    assert "deploy/requirements.py train export cpu" in " ".join(stages()["train"])
    names = {image_requirements.requirement_name(r)
             for r in image_requirements.requirements(["train", "export", "cpu"], [])}
    assert {"torch", "torchvision", "onnx", "onnxruntime"} <= names


def test_unknown_extra_is_refused_with_the_known_ones():
    with pytest.raises(SystemExit, match="unknown extras"):
        image_requirements.requirements(["serv"], [])


def test_gpu_image_takes_cuda_cudnn_from_onnxruntime_gpus_extras_pinned_to_cuda_13_0():
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert "onnxruntime-gpu[cuda,cudnn]==1.31.1" in gpu
    install = " ".join(stages()["gpu-deps"])
    assert "-c deploy/gpu-constraints.txt" in install and "COPY deploy/requirements.py deploy/check_nvidia_index.py " \
        "deploy/gpu-constraints.txt deploy/" in install
    pins = dict(line.split("==") for line in (ROOT / "deploy" / "gpu-constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    # What onnxruntime-gpu 1.31.1's [cuda,cudnn] extras pull (its METADATA, checked with pip), each pinned exactly.
    assert set(pins) == {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cuda-nvrtc", "nvidia-cufft", "nvidia-curand",
                         "nvidia-nvjitlink", "nvidia-cudnn-cu13"}
    assert pins["nvidia-cuda-runtime"].startswith("13.0.") and pins["nvidia-cudnn-cu13"].startswith("9.")
    # No hash lock here (the NVIDIA index cannot be reached where locks are made), and the Dockerfile says so.
    dependencies = next(step for step in install.split("&&") if "-c deploy/gpu-constraints.txt" in step)
    assert "--require-hashes" not in dependencies and "not hash-locked" in DOCKERFILE.read_text().lower()


def test_gpu_image_pins_what_it_shares_with_the_cpu_image_at_the_cpu_locks_versions(monkeypatch):
    """Only pyproject's direct pins held the GPU image: NumPy, Starlette, AnyIO, pydantic-core, ... came at whatever
    version PyPI had that day. Its constraints are the CPU lock's pins (`make lock` derives them), CPU runtimes left
    out; checked with pip too (pip install --dry-run, 2026-11: the serve set with onnxruntime-gpu and cuda-python
    resolves at exactly these versions; TensorRT's wheels come from NVIDIA's index, unreachable here)."""
    from deploy.lock_constraints import constraints, lock_pins

    install = " ".join(stages()["gpu-deps"])
    assert "COPY locks/service-gpu-constraints.txt locks/service-gpu-constraints.txt" in install
    dependencies = next(step for step in install.split("&&") if "-r /tmp/requirements.txt" in step)
    assert "-c deploy/gpu-constraints.txt -c locks/service-gpu-constraints.txt" in dependencies
    makefile = (ROOT / "Makefile").read_text()
    left_out = re.search(r"^GPU_IMAGE_UNCONSTRAINED = (.+)$", makefile, re.M).group(1).split()
    assert "deploy/lock_constraints.py locks/service-cpu.txt $(GPU_IMAGE_UNCONSTRAINED:%=--without %)" in makefile
    monkeypatch.chdir(ROOT)  # `make lock` runs at the root: the file names the lock by its relative path
    committed = Path("locks/service-gpu-constraints.txt").read_text()
    assert committed == constraints(Path("locks/service-cpu.txt"), left_out), "run `make lock`"
    pinned = {name.lower() for name, _ in lock_pins(committed)}
    assert {"numpy", "starlette", "anyio", "pydantic-core", "h11", "uvloop"} <= pinned
    assert not {"onnxruntime", "openvino"} & pinned
    shared = {image_requirements.requirement_name(r) for r in image_requirements.requirements(["serve"], [])}
    assert shared <= pinned


def test_gpu_image_checks_nvidias_index_before_installing_tensorrt_and_uses_it():
    install = stages()["gpu-deps"]
    run = next(line for line in install if line.startswith("RUN ") and "requirements.py serve gpu" in line)
    first_command = re.sub(r"^RUN if .*?\bfi\b\s+&&", "", run).split("&&")[0]  # after the platform check, the first
    assert first_command.strip() == 'python deploy/check_nvidia_index.py --index-url "${NVIDIA_PYPI_URL}"'
    assert '--extra-index-url "${NVIDIA_PYPI_URL}"' in run
    assert build_args()["NVIDIA_PYPI_URL"] == "https://pypi.nvidia.com"
    assert "pypi.nvidia.com" in "".join(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#"))


def _env(target: str) -> dict[str, str]:
    env_line = next(line for line in stages()[target] if line.startswith("ENV "))
    return dict(re.findall(r'(\w+)=("[^"]*"|\S+)', env_line[4:]))


def test_gpu_image_needs_only_the_driver_through_the_container_toolkit_and_states_its_minimum():
    env = _env("service")
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert env["NVIDIA_REQUIRE_CUDA"] == '"cuda>=13.0"'  # the toolkit refuses drivers older than CUDA 13 (< 580)
    assert env["CONVNEXT_HOST_CHECK"] == "hold"
    assert any("driver >= 580" in line for line in stages()["service"] if line.startswith("LABEL"))


def test_gpu_image_puts_the_cuda_wheels_where_onnxruntime_looks_on_the_loader_path():
    python = re.match(r"python:(\d+\.\d+)", build_args()["PYTHON_IMAGE"]).group(1)
    site = f"/opt/venv/lib/python{python}/site-packages"
    # onnxruntime-gpu 1.31.1 (CUDA 13) expects nvidia/cu13/lib (cudart, cuBLAS, cuFFT, cuRAND) and nvidia/cudnn/lib.
    assert _env("service")["LD_LIBRARY_PATH"].split(":") == [f"{site}/nvidia/cu13/lib", f"{site}/nvidia/cudnn/lib"]


@pytest.mark.parametrize("target", ["service", "service-cpu", "train"])
def test_every_image_ships_the_host_check_the_entrypoint_imports(target):
    copies = " ".join(line for line in stages()[target] if line.startswith("COPY") and "entrypoint.py" in line)
    assert "deploy/host_check.py" in copies


def locked_hashes(requirements: str, name: str) -> tuple[str, set[str]]:
    """The version and sha256 hashes a hash-pinned requirements file gives `name`."""
    match = re.search(rf"^{re.escape(name)}==(\S+)((?:\s*\\\n\s+--hash=sha256:\w+)+)", requirements, re.M)
    assert match, f"{name} is not hash-pinned"
    return match.group(1), set(re.findall(r"sha256:(\w+)", match.group(2)))


def test_the_build_backend_is_one_exact_hash_checked_setuptools():
    """pip's isolated build fetches the newest setuptools its requirement allows: pinned exactly in [build-system], and
    the images install that version by hash and build without isolation (pip then checks it meets [build-system])."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert len(requires) == 1 and re.fullmatch(r"setuptools==[\d.]+", requires[0]), requires
    version = requires[0].split("==")[1]
    image_pin = locked_hashes((ROOT / "deploy" / "build-requirements.txt").read_text(), "setuptools")
    assert image_pin == locked_hashes((ROOT / "locks" / "dev.txt").read_text(), "setuptools")
    assert image_pin[0] == version


@pytest.mark.parametrize("target", ["gpu-deps", "cpu-deps", "train"])
def test_every_stage_builds_the_project_with_the_hash_checked_backend(target):
    body = stages()[target]
    installs = [line for line in body if line.startswith("RUN ") and re.search(r"pip install .* \.$", line)]
    assert installs, f"{target} installs no project"
    for line in installs:
        assert "--no-build-isolation --check-build-dependencies" in line, line
    backend = next(i for i, line in enumerate(body)
                   if "--require-hashes -r deploy/build-requirements.txt" in line)
    assert backend < body.index(installs[0])
    assert any(line.startswith("COPY ") and "deploy/build-requirements.txt" in line for line in body[:backend])


@pytest.mark.parametrize("target", ["gpu-deps", "cpu-deps", "train"])
def test_every_stage_that_installs_the_project_copies_every_module_it_lists(target):
    """pyproject's py-modules (convnext_common, ...) and packages are in the image: setuptools only warns about a
    listed module that is missing and builds a wheel without it, and every entry point then fails to import."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {source.rstrip("/") for line in stages()[target] if line.startswith("COPY") and "--from" not in line
              for source in line.split()[1:-1] if not source.startswith("--")}
    assert {f"{module}.py" for module in project["py-modules"]} <= copied
    assert {package.split(".")[0] for package in project["packages"]} <= copied
