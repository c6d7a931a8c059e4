"""scripts/gpu_check.sh, the one command for a GPU host: valid shell, lists its steps and their time limits, fails fast
without a GPU, skips bf16 (only) on a GPU without it, ends a step past its limit or the whole check on a signal with
the report written, and runs without installing anything on a host whose Python has the packages (or some of them).

The GPU host is a stand-in: an nvidia-smi that reports one GPU and a `python` that records its arguments."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from compose_yaml import ROOT

from bench.roadmap_engines import BF16_MIN_COMPUTE_CAPABILITY, GROUPS, bf16_problem, gpu_engines_for
from model.roadmap_steps import steps_of

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["nvidia-smi", "venv", "doctor", "export", "tensorrt-fp32", "tensorrt-fp16", "tensorrt-bf16", "ort-cuda",
         "train-amp", "pytest-gpu", "bench", "roadmap"]


def test_the_script_parses_and_shellcheck_finds_nothing():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    shellcheck = shutil.which("shellcheck") or str(ROOT / ".venv" / "bin" / "shellcheck")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_lists_every_step_and_touches_nothing(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "GPU_VENV": str(tmp_path / "venv")})
    assert result.returncode == 0, result.stderr
    limits = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()[1:]}
    assert list(limits) == STEPS and all(line.split()[2] == "s" for line in result.stdout.splitlines()[1:])
    assert limits["nvidia-smi"] == 60 and limits["roadmap"] == 2 * 900  # 15 min for each of the 2 roadmap steps
    assert "session.get_providers()[0] checked" in result.stdout
    assert "python -m bench roadmap --engines gpu --steps kernel7 gelu: " in result.stdout
    assert "(OUT_DIR/roadmap/)" in result.stdout
    assert not out.exists() and not (tmp_path / "venv").exists()


def test_the_full_roadmap_and_other_limits_are_asked_for_and_a_bad_limit_is_refused(tmp_path):
    env = {**os.environ, "GPU_VENV": str(tmp_path / "venv"), "GPU_CHECK_LIMIT_TENSORRT_FP16": "1234"}
    dry = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--full-roadmap", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=60, env=env)
    limits = {line.split()[0]: int(line.split()[1]) for line in dry.stdout.splitlines()[1:]}
    assert limits["roadmap"] == 17 * 900 and limits["tensorrt-fp16"] == 1234 and limits["tensorrt-fp32"] == 900
    assert "--engines gpu: TensorRT fp16/bf16 + ORT CUDA fp32 of 17 Table 10 step(s)" in dry.stdout  # no --steps
    bad = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=60, env={**env, "GPU_CHECK_LIMIT_ROADMAP": "1h"})
    assert bad.returncode == 2 and "GPU_CHECK_LIMIT_ROADMAP=1h is not a number of seconds" in bad.stderr


def test_the_roadmap_step_times_the_gpu_engines_briefly_into_the_check_output():
    step = SCRIPT.read_text().split("step_roadmap() {", 1)[1].split("\n}\n", 1)[0]
    assert '-m bench roadmap --engines $ROADMAP_ENGINES "${steps[@]}" --batch-sizes 1 32 --seconds 2' in step
    assert '--out "$OUT/roadmap"' in step and "steps=(--steps $ROADMAP_STEPS)" in step


def no_gpu_path(tmp_path) -> str:
    """A PATH with the tools the script uses and no nvidia-smi, whatever this machine has."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "date", "mkdir", "tee", "tail", "head", "uname", "git", "sed", "cat", "basename", "dirname",
                 "mv", "timeout"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def test_without_a_gpu_it_fails_fast_and_clearly_and_still_writes_a_report(tmp_path):
    out = tmp_path / "report"
    env = {"PATH": no_gpu_path(tmp_path), "HOME": str(tmp_path), "GPU_VENV": str(tmp_path / "venv")}
    result = subprocess.run([shutil.which("bash"), str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 2
    assert "no NVIDIA driver here (nvidia-smi not found)" in result.stderr and "driver >= 580" in result.stderr
    assert not (tmp_path / "venv").exists()  # failed before downloading gigabytes
    report = (out / "report.md").read_text()
    assert "| preflight | FAIL |" in report and "1 step(s) FAILED" in report
    assert "| venv | NOT RUN (the host failed the preflight) |" in report
    assert (out / "logs" / "00-preflight.log").read_text().startswith("no NVIDIA driver here")


def test_with_a_gpu_but_no_usable_python_venv_it_fails_fast_naming_the_package(tmp_path):
    path = no_gpu_path(tmp_path)
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI stand-in'\n")  # a GPU host's tool
    (tmp_path / "bin" / "nvidia-smi").chmod(0o755)
    out = tmp_path / "report"
    env = {"PATH": path, "HOME": str(tmp_path), "GPU_VENV": str(tmp_path / "venv"), "PYTHON": "python3-missing"}
    result = subprocess.run([shutil.which("bash"), str(SCRIPT), str(out)], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 2
    assert "python3-missing cannot make the venv" in result.stderr and "apt-get install python3-venv" in result.stderr
    assert not (tmp_path / "venv").exists()


def fake_gpu_host(tmp_path, name: str, compute_capability: str, hang: str = "") -> tuple[dict, Path]:
    """This machine's tools, an nvidia-smi that reports one GPU, and a venv whose python records its arguments: pytest
    prints the bf16 skip a pre-Ampere GPU gives, a call starting with `hang` writes its pid to hung.pid and sleeps,
    everything else fails at once (no downloads, no GPU work)."""
    bin_dir, venv_bin = tmp_path / "fake-bin", tmp_path / "venv" / "bin"
    bin_dir.mkdir()
    venv_bin.mkdir(parents=True)
    calls = tmp_path / "python-calls.txt"
    (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho '{name}, {compute_capability}'\n")
    (venv_bin / "python").write_text(
        f"#!/bin/sh\necho \"$*\" >> '{calls}'\n"
        'case "$*" in "-m pytest"*)\n'
        f"  echo 'SKIPPED [1] tests/gpu/test_tensorrt_export.py:44: {bf16_problem('7.5', 'Tesla T4')}'\n"
        "  echo '2 passed, 1 skipped'; exit 0 ;;\nesac\n"
        + (f'case "$*" in "{hang}"*) echo $$ > \'{tmp_path}/hung.pid\'; exec sleep 60 ;; esac\n' if hang else "")
        + "exit 1\n")
    for tool in (bin_dir / "nvidia-smi", venv_bin / "python"):
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "GPU_VENV": str(tmp_path / "venv")}
    return env, calls


def ended(pid: int) -> bool:
    """The process is gone, or dead and not yet reaped (a zombie: this sandbox's init reaps slowly)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_on_a_turing_gpu_the_bf16_steps_are_skipped_with_the_reason_and_the_rest_still_runs(tmp_path):
    env, calls = fake_gpu_host(tmp_path, "Tesla T4", "7.5")
    out = tmp_path / "report"
    dry = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, timeout=60,
                         env=env)
    assert re.search(r"tensorrt-bf16 +900 s  skipped: bf16 needs a GPU of compute capability >= 8.0", dry.stdout)
    assert "--engines tensorrt-fp16 onnxruntime-cuda-fp32 --steps kernel7 gelu: TensorRT fp16 + ORT CUDA fp32" \
           in dry.stdout
    result = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1  # the fake venv's python fails the other steps
    report = (out / "report.md").read_text()
    assert "| tensorrt-bf16 | SKIP (bf16 needs a GPU of compute capability >= 8.0 (Ampere or newer); Tesla T4 is " \
           "7.5) |" in report
    assert "| pytest-gpu | PASS |" in report  # the bf16 test's skip is the one this GPU is allowed
    assert "1 skipped: bf16 needs" in report and "step(s) FAILED" in report
    roadmap = [line for line in calls.read_text().splitlines() if line.startswith("-m bench roadmap")]
    assert roadmap == ["-m bench roadmap --engines tensorrt-fp16 onnxruntime-cuda-fp32 --steps kernel7 gelu "
                       f"--batch-sizes 1 32 --seconds 2 --out {out}/roadmap"]
    assert not any("--precision bf16" in line or "--amp bf16" in line for line in calls.read_text().splitlines())


def test_on_an_ampere_or_newer_gpu_every_step_runs_and_any_skipped_gpu_test_fails_the_check(tmp_path):
    env, calls = fake_gpu_host(tmp_path, "NVIDIA H200", "9.0")
    out = tmp_path / "report"
    subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120, env=env)
    report = (out / "report.md").read_text()
    assert "| tensorrt-bf16 | FAIL" in report and "| pytest-gpu | FAIL" in report and "| SKIP" not in report
    assert any(line.startswith("-m bench roadmap --engines gpu ") for line in calls.read_text().splitlines())
    assert any("--precision bf16" in line for line in calls.read_text().splitlines())
    # train-amp refuses to go on when torch sees no GPU (here: the stand-in python fails that check)
    assert "| train-amp | FAIL" in report and not any("-m training" in line for line in calls.read_text().splitlines())


def test_the_scripts_bf16_rule_is_the_benchs():
    text = SCRIPT.read_text()
    assert f"BF16_MIN_MAJOR={BF16_MIN_COMPUTE_CAPABILITY[0]}\n" in text and BF16_MIN_COMPUTE_CAPABILITY[1] == 0
    assert f'PRE_AMPERE_GPU_ENGINES="{" ".join(gpu_engines_for("7.5"))}"' in text
    mark = text.split('BF16_SKIP_MARK="', 1)[1].split('"', 1)[0]
    assert mark in bf16_problem("7.5", "Tesla T4") and gpu_engines_for("8.0") == GROUPS["gpu"]


def test_the_default_roadmap_steps_measure_gelus_cost_and_the_full_sweep_is_table_10():
    text = SCRIPT.read_text()
    steps = {step.key: step for step in steps_of("r50")}
    assert f"ROADMAP_ALL_STEPS={len(steps)}\n" in text
    default = text.split('ROADMAP_DEFAULT_STEPS="', 1)[1].split('"', 1)[0].split()
    assert default == ["kernel7", "gelu"] and steps["gelu"].parent == "kernel7"  # the ledger's delta needs the parent


def wait_for(path: Path, check: subprocess.Popen, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert check.poll() is None, check.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_check_stopped_mid_step_ends_that_step_and_writes_the_report_with_what_never_ran(tmp_path, stop):
    env, _ = fake_gpu_host(tmp_path, "NVIDIA H200", "9.0", hang="-m service doctor")
    out = tmp_path / "report"
    check = subprocess.Popen(["bash", str(SCRIPT), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    wait_for(tmp_path / "hung.pid", check)  # the doctor step is running (a lease ending, Ctrl-C, `timeout`)
    check.send_signal(stop)
    _, stderr = check.communicate(timeout=60)
    assert check.returncode == 128 + stop and f"stopped by {stop.name}; report: {out}/report.md" in stderr
    report = (out / "report.md").read_text()
    assert "| nvidia-smi | PASS |" in report and "| venv | FAIL (exit 1) |" in report  # the steps done before
    assert re.search(rf"\| doctor \| STOPPED \(by {stop.name} after \d+ s\) \| \d+ \| logs/03-doctor.log \|", report)
    assert f"| export | NOT RUN (the check was stopped by {stop.name}) |  |  |" in report
    assert f"| roadmap | NOT RUN (the check was stopped by {stop.name}) |" in report
    assert f"- result: the check was stopped by {stop.name}; 2 step(s) FAILED; 9 not run" in report
    assert ended(int((tmp_path / "hung.pid").read_text()))  # the step's process went with it


def test_a_report_is_on_disk_while_a_step_runs_saying_which(tmp_path):
    env, _ = fake_gpu_host(tmp_path, "NVIDIA H200", "9.0", hang="-m export onnx")
    out = tmp_path / "report"
    check = subprocess.Popen(["bash", str(SCRIPT), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        wait_for(tmp_path / "hung.pid", check)
        report = (out / "report.md").read_text()  # what a check killed outright (SIGKILL) leaves
    finally:
        check.kill()  # no trap runs: the report stays as the check left it
        check.communicate(timeout=60)
        os.kill(int((tmp_path / "hung.pid").read_text()), signal.SIGKILL)
    assert "- result: in progress: 3 of 12 steps done" in report
    assert "if it still says so, the check was killed" in report
    assert "| doctor | FAIL (exit 1) |" in report and "| export | RUNNING (for " in report
    assert "| tensorrt-fp32 | PENDING |" in report


def test_a_step_past_its_limit_is_a_timeout_and_the_steps_after_it_still_run(tmp_path):
    env, calls = fake_gpu_host(tmp_path, "NVIDIA H200", "9.0", hang="-m service doctor")
    out = tmp_path / "report"
    result = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120,
                            env={**env, "GPU_CHECK_LIMIT_DOCTOR": "1"})
    assert result.returncode == 1 and "!! doctor timed out after" in result.stdout
    report = (out / "report.md").read_text()
    assert "| doctor | TIMEOUT (after its limit of 1 s; GPU_CHECK_LIMIT_DOCTOR=SECONDS sets another) |" in report
    assert ended(int((tmp_path / "hung.pid").read_text()))
    assert any(line.startswith("-m bench roadmap") for line in calls.read_text().splitlines())  # the last step ran


def test_the_budget_caps_a_steps_limit_and_the_steps_after_it_are_not_run(tmp_path):
    env, calls = fake_gpu_host(tmp_path, "NVIDIA H200", "9.0", hang="-m service doctor")
    out = tmp_path / "report"
    result = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120,
                            env={**env, "GPU_CHECK_BUDGET_S": "2"})
    assert result.returncode == 1
    report = (out / "report.md").read_text()
    assert re.search(r"\| doctor \| TIMEOUT \(after the [12] s left of GPU_CHECK_BUDGET_S=2\) \|", report)
    assert "| export | NOT RUN (the check's budget, GPU_CHECK_BUDGET_S=2 s, was spent) | 0 |" in report
    assert "| roadmap | NOT RUN (the check's budget" in report
    assert not any(line.startswith("-m export") for line in calls.read_text().splitlines())


def offline_python(tmp_path, calls: Path, training: str = "", no_compiler: str = "") -> Path:
    """An offline host's Python with CUDA torch (and the cuda-bindings it requires), timm, scikit-learn, pydantic and
    pytest but no ONNX toolchain,
    TensorRT or onnxruntime-gpu: a stand-in whose packages are empty modules and whose steps record their arguments
    (scripts/gpu_check_needs.py runs for real in a Python without site-packages, seeing only those). `training`: a
    script that `-m training`'s arguments are run with instead; `no_compiler`: what training's check for a C compiler
    says (none: it finds one)."""
    site = tmp_path / "site"
    for module in ("numpy", "PIL", "pydantic", "pydantic_settings", "torch", "torchvision", "timm", "sklearn",
                   "pytest", "cuda", "cuda/bindings"):
        (site / module).mkdir(parents=True)
        (site / module / "__init__.py").write_text("")
    (site / "torch" / "__init__.py").write_text("class cuda:\n    is_available = staticmethod(lambda: True)\n")
    python = tmp_path / "offline" / "python3"
    python.parent.mkdir()
    python.write_text(
        "#!/bin/sh\n"
        f'case "$1" in */gpu_check_needs.py) PYTHONPATH="{site}" exec "{sys.executable}" -S "$@" ;; esac\n'
        f"echo \"$* (PYTHONPATH=$PYTHONPATH)\" >> '{calls}'\n"
        + (f'case "$1 $2" in "-m training") shift 2; exec "{sys.executable}" "{training}" "$@" ;; esac\n'
           if training else "")
        + (f'case "$2" in *compile_toolchain_problem*) echo "{no_compiler}" ;; esac\n' if no_compiler else "")
        + 'case "$*" in "-m pytest"*) echo "2 passed" ;; esac\n')
    python.chmod(0o755)
    return python


def test_without_installing_it_runs_what_the_python_has_and_names_what_it_lacks(tmp_path):
    """--python: a host's Python without the ONNX toolchain, TensorRT or onnxruntime-gpu (offline_python)."""
    env, calls = fake_gpu_host(tmp_path, "NVIDIA H200", "9.0")
    python = offline_python(tmp_path, calls)
    out = tmp_path / "report"
    result = subprocess.run(["bash", str(SCRIPT), "--python", str(python), str(out)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "venv" / "bin" / "pip").exists() and "-m pip" not in calls.read_text()  # nothing installed
    report = (out / "report.md").read_text()
    assert f"| venv | SKIP (no install: --python {python}) |" in report
    assert "| export | NOT RUN (needs onnx, onnxscript, onnxconverter-common, ml_dtypes, onnxruntime: not in " \
           f"{python}) |" in report
    assert "| tensorrt-fp16 | NOT RUN (needs tensorrt-cu13, ml_dtypes, onnxruntime: not in" in report
    assert "| ort-cuda | NOT RUN (needs onnxruntime-gpu (CUDAExecutionProvider): not in" in report
    assert "| bench | NOT RUN (needs onnxruntime-gpu (CUDAExecutionProvider), prometheus-client, threadpoolctl: not " \
           "in" in report
    assert "| roadmap | NOT RUN (needs onnx, onnxscript" in report
    assert "| doctor | PASS |" in report and "| train-amp | PASS |" in report  # what this Python has still runs
    assert "| pytest-gpu | PASS (3 of 4 test files not run: their packages are missing (see the log)) |" in report
    assert "- result: no step failed; 1 skipped: no install" in report and "; 7 not run" in report
    ran = calls.read_text()
    assert "\n-m service doctor --require gpu (" in ran  # no TensorRT here is no failure of the doctor
    for amp in ("fp16", "bf16"):
        assert f"-m training --preset demo --epochs 1 --max-steps-per-epoch 20 --amp {amp} --output {out}/train-{amp}" \
               f" --overwrite-checkpoints --quiet (PYTHONPATH={ROOT}" in ran  # the checkout imports without an install
    assert "\n-m pytest -m gpu -q -rs -p no:cacheprovider tests/gpu/test_training_rng_gpu.py (" in ran
    assert "not run: tests/gpu/test_tensorrt_export.py (needs onnx," in (out / "logs" / "10-pytest-gpu.log").read_text()


def test_train_amp_on_a_host_without_a_c_compiler_runs_its_last_runs_without_compile(tmp_path):
    """Training refuses --compile on a GPU host without a C compiler (Triton builds its launcher with one): the
    compiled run failed the whole step, the fp16 and bf16 runs that passed included. It runs without --compile now,
    and says so."""
    env, calls = fake_gpu_host(tmp_path, "NVIDIA H200", "9.0")
    python = offline_python(tmp_path, calls, no_compiler="--compile on a GPU needs a C compiler at run time")
    out = tmp_path / "report"
    subprocess.run(["bash", str(SCRIPT), "--python", str(python), str(out)], capture_output=True, text=True,
                   timeout=120, env=env)
    report = (out / "report.md").read_text()
    assert "| train-amp | PASS (the last two runs without --compile: no C compiler) |" in report
    log = (out / "logs" / "09-train-amp.log").read_text()
    assert "== --compile: skipped, --compile on a GPU needs a C compiler at run time" in log
    runs = [line for line in calls.read_text().splitlines() if line.startswith("-m training")]
    assert len(runs) == 4 and "--channels-last --ema-decay 0.99" in runs[2] and "--resume" in runs[3]
    assert not any("--compile" in run for run in runs)


# The GPU's training run, stood in for: the real command line, resolved and checked by training itself (an --output
# holding an earlier run's checkpoint_last.pth is refused unless a flag says what to do), then a checkpoint written.
TRAINING_STAND_IN = """
import sys
from pathlib import Path

from training.__main__ import get_args_parser
from training.config import resolve
from training.run import refuse_an_earlier_runs_output

args = vars(get_args_parser().parse_args(sys.argv[1:]))
config = resolve(args.pop("preset"), {name: value for name, value in args.items() if value is not None})
try:
    refuse_an_earlier_runs_output(config)
except ValueError as error:
    sys.exit(f"python -m training: error: {error}")
Path(config.output).mkdir(parents=True, exist_ok=True)
(Path(config.output) / "checkpoint_last.pth").write_bytes(b"a checkpoint")
"""


def test_a_second_check_into_the_same_folder_trains_afresh(tmp_path):
    """`bash scripts/gpu_check.sh gpu-check` run again: train-amp's output holds the first run's checkpoints, which
    training refuses to start over without --overwrite-checkpoints; the step failed on every rerun."""
    env, calls = fake_gpu_host(tmp_path, "NVIDIA H200", "9.0")
    training = tmp_path / "training_stand_in.py"
    training.write_text(TRAINING_STAND_IN)
    python = offline_python(tmp_path, calls, training=str(training))
    out = tmp_path / "report"
    for run in ("first", "second"):
        subprocess.run(["bash", str(SCRIPT), "--python", str(python), str(out)], capture_output=True, text=True,
                       timeout=120, env=env)
        report = (out / "report.md").read_text()
        assert "| train-amp | PASS |" in report, (run, (out / "logs" / "09-train-amp.log").read_text())
    assert all((out / f"train-{amp}" / "checkpoint_last.pth").is_file() for amp in ("fp16", "bf16"))
