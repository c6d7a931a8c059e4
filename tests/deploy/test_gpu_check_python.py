"""The Python of scripts/gpu_check.sh, run here as the script runs it: the ort-cuda step's parity (on the CPU provider,
and refused on an ONNX Runtime whose CUDA provider does not load), the bench step's file lookup, and what each step
needs in the no-install mode."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from compose_yaml import ROOT

ONNX_STEPS = ROOT / "scripts" / "gpu_check_onnx.py"
NEEDS = ROOT / "scripts" / "gpu_check_needs.py"


def script_module(path: Path):
    """A module of scripts/ (not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


gpu_check_needs = script_module(NEEDS)
ORT_GPU = ROOT / ".venv" / "ort-gpu-probe"  # make test installs it (tests/service/test_ort_providers.py)


def run_script(*args: str, pythonpath: str = str(ROOT)) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": pythonpath})


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """convnext_atto at 32 px with its fp32 and fp16 ONNX."""
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("gpu-check-models")
    export_onnx_version(root, "tiny", "convnext_atto", num_classes=4, input_size=32, precisions=("fp32", "fp16"),
                        verify_images=[])
    return root


@pytest.fixture(scope="module")
def broken_fp16(repository, tmp_path_factory) -> Path:
    """A copy of `repository` whose fp16 file has the classifier's weights negated (its manifest describing that
    file): a variant that is not the model."""
    import onnx
    from onnx import numpy_helper

    from runtime.repository import describe_file

    root = tmp_path_factory.mktemp("gpu-check-broken")
    version = Path(shutil.copytree(repository / "tiny", root / "tiny")) / "1"
    model = onnx.load(version / "model.fp16.onnx")
    (head,) = [i for i in model.graph.initializer if i.name == "head.weight"]
    head.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(head), head.name))
    onnx.save(model, version / "model.fp16.onnx")
    manifest = json.loads((version / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        if artifact["file"] == "model.fp16.onnx":
            changed = describe_file(version, artifact["file"], format="onnx", precision="fp16")
            artifact.update(sha256=changed.sha256, size_bytes=changed.size_bytes)
    (version / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def test_the_ort_step_holds_fp32_and_fp16_to_the_export_thresholds_on_the_provider_it_names(repository):
    done = run_script(str(ONNX_STEPS), "parity", str(repository), "tiny", "--provider", "cpu")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["CPUExecutionProvider fp32", "CPUExecutionProvider fp16"]
    # 4 seeded random inputs + the 6 real photos, as the export verifies.
    assert all("on 10 inputs vs onnxruntime CPU fp32, the session on CPUExecutionProvider" in line for line in lines)
    assert float(re.search(r"max\|diff\| ([\d.e-]+)", lines[1]).group(1)) > 0  # the fp16 file ran, not fp32 again


def test_a_variant_that_is_not_the_model_fails_the_step_and_the_other_is_still_reported(broken_fp16):
    results = script_module(ONNX_STEPS).provider_parity(broken_fp16, "tiny", "cpu")
    assert [r.precision for r in results] == ["fp32", "fp16"]
    assert results[0].parity is not None and results[0].parity.max_abs_diff == 0
    assert results[1].parity is None and "(fp16) does not match onnxruntime CPU fp32 on 10 inputs" in results[1].problem
    done = run_script(str(ONNX_STEPS), "parity", str(broken_fp16), "tiny", "--provider", "cpu")
    assert done.returncode == 1 and "CPUExecutionProvider fp16: ONNX Runtime CPUExecutionProvider (fp16) does not " \
                                      "match" in done.stdout


def test_on_an_onnxruntime_whose_cuda_provider_does_not_load_the_step_fails_instead_of_running_on_the_cpu(repository):
    if not (ORT_GPU / "onnxruntime").is_dir():
        pytest.fail(f"the GPU build of ONNX Runtime is not in {ORT_GPU}: make {ORT_GPU.relative_to(ROOT)}/.installed")
    done = run_script(str(ONNX_STEPS), "parity", str(repository), "tiny", pythonpath=f"{ORT_GPU}{os.pathsep}{ROOT}")
    assert done.returncode == 1 and done.stdout == ""
    assert "asked ONNX Runtime for CUDAExecutionProvider but it loaded ['CPUExecutionProvider']" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_bench_step_finds_the_newest_versions_file_and_names_a_missing_precision(repository):
    done = run_script(str(ONNX_STEPS), "path", str(repository), "tiny", "fp16")
    assert done.returncode == 0 and done.stdout == f"{repository / 'tiny' / '1' / 'model.fp16.onnx'}\n"
    done = run_script(str(ONNX_STEPS), "path", str(repository), "tiny", "bf16")
    assert done.returncode == 1 and "tiny/1 has no bf16 ONNX (it has ['fp32', 'fp16'])" in done.stderr


def test_every_gpu_test_file_and_every_python_step_of_the_script_has_its_needs_listed():
    assert sorted(gpu_check_needs.GPU_TEST_NEEDS) == sorted(
        str(path.relative_to(ROOT)) for path in (ROOT / "tests" / "gpu").glob("test_*.py"))
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    steps = re.findall(r'^  "([\w-]+)\|', script.split("STEPS=(", 1)[1].split("\n)\n", 1)[0], re.M)
    assert set(gpu_check_needs.STEP_NEEDS) == set(steps) - {"nvidia-smi", "venv"}
    tables = [*gpu_check_needs.STEP_NEEDS.values(), *gpu_check_needs.GPU_TEST_NEEDS.values()]
    assert {need for needs in tables for need in needs} <= set(gpu_check_needs.CHECKS)


def test_a_need_is_named_once_and_cuda_torch_not_where_torch_itself_is_missing():
    have = dict.fromkeys(gpu_check_needs.CHECKS, True) | {"numpy": False, "torch": False}
    needs = ("numpy", "torch", "torch with CUDA (torch.cuda.is_available())", "numpy", "timm")
    assert gpu_check_needs.missing(needs, have) == ["numpy", "torch"]
    have["torch"] = True
    have["torch with CUDA (torch.cuda.is_available())"] = False
    assert gpu_check_needs.missing(needs, have) == ["numpy", "torch with CUDA (torch.cuda.is_available())"]


def test_in_a_python_with_the_standard_library_only_every_step_names_what_it_lacks():
    done = subprocess.run([sys.executable, "-S", str(NEEDS)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    rows = {tuple(line.split("\t")[:2]): line.split("\t")[2] for line in done.stdout.splitlines()}
    assert rows[("step", "train-amp")] == "numpy, torch, pillow, torchvision, timm, scikit-learn"
    # --require gpu finds the driver and the GPU through cuda.bindings: without it the doctor is not run, not failed
    assert rows[("step", "doctor")] == "numpy, pillow, pydantic, pydantic-settings, cuda-python"
    assert rows[("step", "ort-cuda")] == "numpy, pillow, pydantic, onnxruntime-gpu (CUDAExecutionProvider)"
    assert rows[("step", "bench")] == ("numpy, pillow, pydantic, onnxruntime-gpu (CUDAExecutionProvider), "
                                       "prometheus-client, threadpoolctl")
    assert rows[("test", "tests/gpu/test_training_rng_gpu.py")] == "numpy, torch, torchvision"
    assert len(rows) == len(gpu_check_needs.STEP_NEEDS) + len(gpu_check_needs.GPU_TEST_NEEDS)


# Runs a command as `python` would (-m MODULE ARGS or PATH ARGS) and prints, last, the top-level third-party modules
# that project code imported while it ran (not what those packages import in turn).
IMPORT_TRACER = """
import atexit, builtins, runpy, sys
PROJECT = set(sys.argv[1].split(","))
imported = set()
builtin_import = builtins.__import__

def tracing_import(name, globals=None, locals=None, fromlist=(), level=0):
    importer = ((globals or {}).get("__name__") or "").split(".")[0]
    top = name.split(".")[0]
    if level == 0 and importer in PROJECT and top not in PROJECT and top not in sys.stdlib_module_names:
        imported.add(top)
    return builtin_import(name, globals, locals, fromlist, level)

builtins.__import__ = tracing_import
atexit.register(lambda: print("IMPORTED", *sorted(imported)))
command = sys.argv[2:]
if command[0] == "-m":
    sys.argv = command[1:]
    runpy.run_module(command[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = command
    runpy.run_path(command[0], run_name="__main__" if command[0].startswith("scripts/") else "gpu_test")
"""
PROJECT_NAMES = ("model", "training", "export", "runtime", "service", "bench", "deploy", "tests", "convnext_cli",
                 "convnext_common", "convnext_files", "convnext_serve", "__main__", "gpu_test")
# Each Python step of scripts/gpu_check.sh: the commands it runs, as `"$PY" <command> ...` in the script.
STEP_COMMANDS = {
    "doctor": [("-m", "service", "doctor")],
    "export": [("-m", "export", "onnx")],
    "tensorrt-fp32": [("-m", "export", "tensorrt")],
    "tensorrt-fp16": [("-m", "export", "tensorrt")],
    "tensorrt-bf16": [("-m", "export", "tensorrt")],
    "ort-cuda": [("scripts/gpu_check_onnx.py",)],
    "train-amp": [("-m", "training")],
    "bench": [("scripts/gpu_check_onnx.py",), ("-m", "bench", "engine")],
    "roadmap": [("-m", "bench", "roadmap")],
}


@functools.cache
def imported_by(command: tuple[str, ...]) -> frozenset[str]:
    """The top-level third-party modules `python <command>` imports in project code (its entry module and what that
    imports at module level, as `--help` runs it; a GPU test file as pytest collects it)."""
    done = subprocess.run([sys.executable, "-c", IMPORT_TRACER, ",".join(PROJECT_NAMES), *command], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return frozenset(done.stdout.splitlines()[-1].split()[1:])


def test_each_steps_needs_name_every_package_its_entry_module_imports():
    """`python -m bench` imports bench/cpu_engines.py, which imports threadpoolctl: the bench and roadmap steps did not
    name it, so on a --python without it both FAILED on a ModuleNotFoundError instead of being NOT RUN with the
    package named. Each step's commands, and each GPU test file, are imported here for real and what they import held
    to their lists."""
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    assert set(STEP_COMMANDS) == set(gpu_check_needs.STEP_NEEDS) - {"pytest-gpu"}
    package_of = {module.split(".")[0]: package for package, module in gpu_check_needs.PACKAGE_MODULES.items()}
    lacking = {}
    for step, commands in STEP_COMMANDS.items():
        for command in commands:
            in_script = f'"$PY" -m {" ".join(command[1:])} ' if command[0] == "-m" else f'"$PY" "$ROOT/{command[0]}" '
            assert in_script in script, (step, in_script)
            needs = set(gpu_check_needs.STEP_NEEDS[step])
            lacking[step, command] = {package_of.get(m, m) for m in imported_by((*command, "--help"))} - needs
    for path, needs in gpu_check_needs.GPU_TEST_NEEDS.items():  # pytest: the pytest-gpu step's own need
        lacking[path] = {package_of.get(m, m) for m in imported_by((path,))} - {*needs, "pytest"}
    assert not {where: packages for where, packages in lacking.items() if packages}
