"""Every CLI, driven as a process of its own: expected errors end in one `<prog>: error: ...` line and a non-zero
status, never a traceback; `--version` prints the installed project version.

The ~70 runs are forked from one process that imported torch once (tests/cli/forked_cli.py: each still runs its
module as `python -m` does, in a process of its own); the last test starts real interpreters, as a person would."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from model import create_model
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
CLIS = {  # how a person runs it -> the prog its errors start with
    "convnext": ([sys.executable, "-m", "convnext_cli"], "convnext"),
    "model": ([sys.executable, "-m", "model"], "python -m model"),
    "training": ([sys.executable, "-m", "training"], "python -m training"),
    "export": ([sys.executable, "-m", "export"], "python -m export"),
    "service": ([sys.executable, "-m", "service"], "python -m service"),
    "bench": ([sys.executable, "-m", "bench"], "python -m bench"),
}
# (cli, arguments, a phrase of the message); {tmp} is a folder with a corrupt checkpoint, an empty and a broken
# repository; {dead} a local URL where nothing listens (the network is down).
ERROR_CASES = [
    ("convnext", ["nosuch"], "unknown command 'nosuch'"),
    ("convnext", ["serve", "--pretrained", "convnext_nosuch"], "unknown pretrained checkpoint"),
    ("convnext", ["serve", "--pretrained", "convnext_tiny_1k_224_ema", "--mirror", "{dead}", "--cache-dir",
                  "{tmp}/cache", "--repository", "{tmp}/empty"],
     "serve a local checkpoint instead: convnext serve --checkpoint PATH"),
    ("convnext", ["serve", "--checkpoint", "{tmp}/missing.pth", "--repository", "{tmp}/empty"], "no checkpoint file"),
    ("convnext", ["serve", "--checkpoint", "{tmp}/missing.pth", "--model-version", "2"],
     "--model-version is not taken here"),
    ("convnext", ["serve", "--checkpoint", "{tmp}/corrupt.pth", "--model", "convnext_atto", "--repository",
                  "{tmp}/out"], "not a readable torch checkpoint"),
    ("convnext", ["serve", "--checkpoint", "{tmp}/ten_classes.pth", "--model", "convnext_atto", "--repository",
                  "{tmp}/out"], "(convnext serve takes no --num-classes: export it with python -m export onnx "
                                "--checkpoint PATH --model ARCHITECTURE --name NAME --num-classes ..., then python -m "
                                "service --model NAME)"),
    ("model", ["info", "convnext_nosuch"], "invalid choice: 'convnext_nosuch'"),
    ("model", ["info", "convnext_atto", "--num-classes", "-1"], "argument --num-classes: must be at least 1"),
    ("model", ["info", "convnext_xlarge", "--all", "--input-size", "384"],
     "--all prints every model at its own size and activation with 1000 classes: drop NAME and --input-size"),
    ("model", ["download", "convnext_tiny_1k_224_ema", "--mirror", "{dead}", "--cache-dir", "{tmp}/cache"],
     "Connection refused); check the network, or pass --mirror"),
    ("training", ["--preset", "imagenet5k"], "invalid choice: 'imagenet5k'"),
    ("training", ["--preset", "demo", "--amp", "fp8"], "--amp"),
    ("training", ["--preset", "demo", "--interpolation", "bilinearx"], "--interpolation must be one of bicubic"),
    ("training", ["--preset", "demo", "--layer-scale-init=-1e-6"], "--layer-scale-init must be a finite number >= 0"),
    # A negative value in exponent notation after a space: a value, not an unknown option (Python 3.11's argparse).
    ("training", ["--preset", "demo", "--layer-scale-init", "-1e-6"], "--layer-scale-init must be a finite number"),
    ("training", ["--preset", "demo", "--head-init-scale", "nan"], "--head-init-scale must be a finite number > 0"),
    ("training", ["--preset", "demo", "--resume", "{tmp}/corrupt.pth", "--output", "{tmp}/run"],
     "truncated or not a torch.save file"),
    ("export", ["onnx", "--name", "x", "--repository", "{tmp}/out"], "no model name"),
    ("export", ["onnx", "--model", "convnext_atto", "--checkpoint", "{tmp}/missing.pth", "--name", "x",
                "--repository", "{tmp}/out"], "no checkpoint file"),
    ("export", ["onnx", "--model", "convnext_atto", "--checkpoint", "{tmp}/corrupt.pth", "--name", "x",
                "--repository", "{tmp}/out"], "not a readable torch checkpoint"),
    ("export", ["onnx", "--model", "convnext_atto", "--checkpoint", "{tmp}/legacy_cut.pth", "--name", "x",
                "--repository", "{tmp}/out"], "is damaged or truncated (IndexError: index out of range)"),
    ("export", ["list", "--repository", "{tmp}/broken"], "cannot be read: digits/1 (listed above with the reason)"),
    ("export", ["tensorrt", "--name", "nosuch", "--repository", "{tmp}/empty"], "no versions of model 'nosuch'"),
    ("export", ["onnx", "--precisions", "fp32,fp16"], "the following arguments are required: --name"),
    ("service", ["--port", "99999"], "invalid settings: port"),
    ("service", ["--request-timeout-ms", "inf"], "invalid settings: request_timeout_ms: Input should be a finite"),
    ("service", ["--max-body-bytes", "2147483648"], "invalid settings: max_body_bytes: Input should be less than"),
    ("service", ["--model-version", "latest"], "argument --model-version: invalid int value"),
    ("service", ["--repository", "{tmp}/empty"], "has no models"),
    ("service", ["--repository", "{tmp}/broken"], "is not a valid manifest"),
    ("bench", ["engine", "{tmp}/missing.onnx"], "no such file"),
    ("bench", ["load", "{dead}", "--requests", "3"], "none of the 3 requests to http://127.0.0.1:"),
    ("bench", ["load", "{dead}", "--requests", "3", "--rate", "100"],
     "succeeded, the first with ConnectionRefusedError"),
    ("bench", ["cpu", "engines", "--repository", "{tmp}/empty", "--model", "nosuch"], "no versions of model 'nosuch'"),
    ("bench", ["nosuch"], "invalid choice: 'nosuch'"),
]


# Argument errors an export once met only after building the model: now refused first, with status 2.
EXPORT_ARGUMENT_ERRORS = [
    (["--model", "convnext_nope", "--name", "x"],
     "--model: unknown model 'convnext_nope'; choose one of: convnext_atto, "),
    (["--model", "convnext_atto", "--name", "Bad_Name"], "argument --name: 'Bad_Name' is not a repository name"),
    (["--name", "x"], "no model name: pass --model"),
    (["--model", "convnext_atto", "--name", "x", "--precisions", "fp16"], "leaves out fp32, the reference"),
    (["--model", "convnext_atto", "--name", "x", "--precisions", "fp32,int4"], "unknown precision int4"),
    (["--model", "convnext_atto", "--name", "digits", "--version", "1", "--repository", "{tmp}/broken"],
     "digits/1 already exists in {tmp}/broken; pass --overwrite to replace it"),
    (["--model", "convnext_atto", "--name", "x", "--version", "0"], "argument --version: must be at least 1, got 0"),
    (["--model", "convnext_atto", "--name", "x", "--num-classes", "0"], "argument --num-classes: must be at least 1"),
    (["--model", "convnext_atto", "--name", "x", "--input-size", "0"], "argument --input-size: must be at least 1"),
    (["--model", "convnext_atto", "--name", "x", "--input-size", "7"],
     "--input-size 7 is too small for convnext_atto, which downsamples its input 32x: pass --input-size 32 or more"),
    (["--model", "convnext_atto", "--name", "x", "--opset", "13"], "argument --opset: 13 < 17"),
    (["--model", "convnext_atto", "--name", "x", "--verify-images", "{tmp}/nosuch"],
     "--verify-images {tmp}/nosuch does not exist; pass a folder of JPEG/PNG files"),
    (["--model", "convnext_atto", "--name", "x", "--verify-images", "{tmp}/corrupt.pth"],
     "--verify-images {tmp}/corrupt.pth is not a folder"),
    (["--model", "convnext_atto", "--name", "x", "--precisions", "fp32,int8", "--calibration-images", "{tmp}/empty"],
     "--calibration-images: no images (.jpg, .jpeg, .png, .bmp, .webp) in {tmp}/empty"),
]
# The same for `python -m export tensorrt`: refused before the version is loaded (no GPU needed to be told).
TENSORRT_ARGUMENT_ERRORS = [
    (["--name", "x", "--min-batch", "0"], "argument --min-batch: must be at least 1, got 0"),
    (["--name", "x", "--min-batch", "8", "--opt-batch", "4"], "batch profile min 8 / opt 4 / max 32 must satisfy"),
    (["--name", "x", "--version", "-3"], "argument --version: must be at least 1, got -3"),
    (["--name", "x", "--device", "-1"], "argument --device: a CUDA device index is 0 or more"),
]
BENCH_SUBCOMMANDS = ["torch", "serve", "cpu", "cpu-serving", "soak", "roadmap"]
# The same errors through the `convnext` front name the command as the user typed it: (arguments, the line's start).
FRONT_ERRORS = [
    (["model", "info", "convnext_nosuch"], "convnext model info: error: argument NAME: invalid choice"),
    (["train", "--preset", "demo", "--resume", "{tmp}/corrupt.pth", "--output", "{tmp}/run"],
     "convnext train: error: "),
    (["export", "list", "--repository", "{tmp}/broken"],
     "convnext export: error: 1 version in {tmp}/broken cannot be read: digits/1"),
    (["serve", "--port", "99999"], "convnext serve: error: invalid settings: port"),
    (["serve", "doctor", "--nosuch"], "convnext serve doctor: error: unrecognized arguments: --nosuch "
                                      "(see convnext serve doctor --help)"),
    (["doctor", "--nosuch"], "convnext doctor: error: unrecognized arguments: --nosuch (see convnext doctor --help)"),
    (["bench", "nosuch"], "convnext bench: error: argument command: invalid choice"),
    (["bench", "cpu", "engines", "--nosuch"], "convnext bench cpu: error: unrecognized arguments: --nosuch"),
    (["bench", "engine", "{tmp}/missing.onnx"],
     "convnext bench engine: error: argument onnx: {tmp}/missing.onnx: no such file"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "corrupt.pth").write_bytes(b"not a checkpoint")
    legacy = tmp / "legacy.pth"  # torch.save's pre-1.6 format, cut off: its header is whole, its pickle is not
    torch.save({"model": create_model("convnext_atto").state_dict()}, legacy, _use_new_zipfile_serialization=False)
    (tmp / "legacy_cut.pth").write_bytes(legacy.read_bytes()[:2000])
    torch.manual_seed(0)  # official layout, a name that says no class count: the export assumes 1000
    torch.save({"model": create_model("convnext_atto", num_classes=10).state_dict()}, tmp / "ten_classes.pth")
    (tmp / "empty").mkdir()
    broken = tmp / "broken" / "digits" / "1"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text(json.dumps({"schema_version": 1, "name": "digits"}))
    dead = f"http://127.0.0.1:{free_port()}/"  # nothing listens there: connections are refused, as with no network
    return {"tmp": str(tmp), "dead": dead}


def cli_env(cwd: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "CONVNEXT_CACHE_DIR": str(cwd / "cache")}


def run_cli(cli: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """One run in a new interpreter."""
    return subprocess.run(CLIS[cli][0] + args, capture_output=True, text=True, timeout=300, cwd=cwd, env=cli_env(cwd))


def every_run(places: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The (cli, arguments) of every run the forked tests look at."""
    runs = [(cli, [a.format(**places) for a in args]) for cli, args, _ in ERROR_CASES]
    runs += [(cli, ["--version"]) for cli in sorted(CLIS)]
    runs += [("export", ["onnx", *(a.format(**places) for a in args)]) for args, _ in EXPORT_ARGUMENT_ERRORS]
    runs += [("export", ["tensorrt", "--repository", places["tmp"] + "/empty", *args])
             for args, _ in TENSORRT_ARGUMENT_ERRORS]
    runs += [("bench", [subcommand, flag]) for subcommand in BENCH_SUBCOMMANDS
             for flag in ("--help", "--nosuch", "--version")]
    runs += [("service", ["doctor", flag]) for flag in ("--version", "--nosuch")]
    runs += [("convnext", [a.format(**places) for a in args]) for args, _ in FRONT_ERRORS]
    return runs


@pytest.fixture(scope="module")
def forked(places) -> dict[tuple[str, tuple[str, ...]], subprocess.CompletedProcess]:
    """Every run's result by (cli, arguments), all made by one tests/cli/forked_cli.py process in the places' folder."""
    cwd = Path(places["tmp"])
    runs = every_run(places)
    spec = cwd / "runs.json"
    spec.write_text(json.dumps([{"module": CLIS[cli][0][2], "args": args, "cwd": str(cwd), "env": cli_env(cwd)}
                                for cli, args in runs]))
    runner = subprocess.run([sys.executable, str(ROOT / "tests" / "cli" / "forked_cli.py"), str(spec)],
                            capture_output=True, text=True, timeout=540, env=cli_env(cwd))  # < pytest-timeout 600
    assert runner.returncode == 0, runner.stderr[-3000:]
    assert runner.stderr == "", runner.stderr[-3000:]  # the preloaded imports printed nothing a real run would show
    results = json.loads(Path(f"{spec}.out").read_text())
    return {(cli, tuple(args)): subprocess.CompletedProcess(CLIS[cli][0] + args, r["returncode"], r["stdout"],
                                                              r["stderr"])
            for (cli, args), r in zip(runs, results, strict=True)}


@pytest.mark.parametrize(("cli", "args", "phrase"), ERROR_CASES,
                         ids=[f"{cli}-{'-'.join(a.strip('-{}') for a in args[:2])}" for cli, args, _ in ERROR_CASES])
def test_an_expected_error_is_one_line_and_a_non_zero_status_without_a_traceback(cli, args, phrase, places, forked):
    result = forked[cli, tuple(a.format(**places) for a in args)]
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output
    lines = result.stderr.strip().splitlines()
    # The message is the last line; only an export's stage lines ("[1/3] build ...") may come before it (no usage).
    assert lines and lines[-1].startswith(f"{CLIS[cli][1]}"), output
    assert ": error: " in lines[-1] and phrase in lines[-1], output
    # ... and the warning a head that does not fit logs, which the message points at ("see the warning above").
    assert [line for line in lines[:-1] if not line.startswith(
        ("INFO export.onnx: [", "[", "the checkpoint's head does not fit the model"))] == [], output


@pytest.mark.parametrize("command", [(cli, "--version") for cli in sorted(CLIS)]
                         + [("bench", subcommand, "--version") for subcommand in BENCH_SUBCOMMANDS]
                         + [("service", "doctor", "--version")], ids="-".join)
def test_version_prints_the_installed_project_version(command, forked):
    result = forked[command[0], command[1:]]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"convnext-serve {version('convnext-serve')}"


def test_the_doctor_refuses_a_bad_argument_in_one_line(forked):
    result = forked["service", ("doctor", "--nosuch")]
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "python -m service doctor: error: unrecognized arguments: --nosuch (see python -m service doctor --help)"]


@pytest.mark.parametrize(("args", "phrase"), EXPORT_ARGUMENT_ERRORS,
                         ids=["unknown-model", "bad-name", "no-model", "no-fp32", "unknown-precision", "exists",
                              "version-0", "no-classes", "size-0", "size-below-stride", "old-opset",
                              "no-verify-folder", "verify-folder-a-file", "empty-calibration-folder"])
def test_export_refuses_an_argument_error_with_status_2_before_building(args, phrase, places, forked):
    result = forked["export", ("onnx", *(a.format(**places) for a in args))]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("python -m export"), result.stderr  # no "[1/3] build" first
    assert phrase.format(**places) in lines[0], result.stderr


@pytest.mark.parametrize(("args", "phrase"), TENSORRT_ARGUMENT_ERRORS,
                         ids=["min-batch-0", "min-above-opt", "negative-version", "negative-device"])
def test_export_tensorrt_refuses_an_argument_error_with_status_2(args, phrase, places, forked):
    result = forked["export", ("tensorrt", "--repository", places["tmp"] + "/empty", *args)]
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("python -m export") and result.stderr.count("\n") == 1, result.stderr
    assert phrase in result.stderr, result.stderr


@pytest.mark.parametrize("subcommand", BENCH_SUBCOMMANDS)
def test_a_bench_subcommand_names_itself_in_its_usage_and_its_one_line_errors(subcommand, forked):
    helped = forked["bench", (subcommand, "--help")]
    assert helped.returncode == 0 and helped.stdout.startswith(f"usage: python -m bench {subcommand} ["), helped.stdout
    refused = forked["bench", (subcommand, "--nosuch")]
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(f"python -m bench {subcommand}: error: ") and refused.stderr.count("\n") == 1


def test_convnext_serve_checks_the_service_settings_and_ports_before_exporting(places):
    """A taken port or an invalid setting is answered at once with the service's status (3 / 2), not after a
    download and an export: the checkpoint here is unreadable, and it is never opened."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for service_args, status, phrase in (
                (["--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"], 3,
                 f"port 127.0.0.1:{port} is taken"),
                (["--max-batch-size", "0"], 2, "invalid settings: max_batch_size")):
            result = run_cli("convnext", ["serve", "--checkpoint", f"{places['tmp']}/corrupt.pth", "--model",
                                          "convnext_atto", "--repository", f"{places['tmp']}/never", *service_args],
                             Path(places["tmp"]))
            assert result.returncode == status, result.stderr
            assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no export stage lines
            assert result.stderr.startswith("convnext serve: error: ") and phrase in result.stderr, result.stderr
            assert not Path(places["tmp"], "never").exists()


@pytest.mark.parametrize(("args", "start"), FRONT_ERRORS, ids=["-".join(args[:2]) for args, _ in FRONT_ERRORS])
def test_through_the_convnext_front_an_error_names_the_command_as_typed(args, start, places, forked):
    result = forked["convnext", tuple(a.format(**places) for a in args)]
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith(start.format(**places)), result.stderr


@pytest.mark.parametrize("command", [["-m", "model", "info", "convnext_atto"],
                                     ["-m", "convnext_cli", "model", "info", "convnext_atto"],
                                     # unbuffered: the write inside main meets the closed pipe, not the final flush
                                     ["-u", "-m", "export", "list", "--repository", "models"]],
                         ids=["module", "front", "export-list"])
def test_a_reader_that_leaves_early_ends_the_command_quietly(command, tmp_path):
    """`convnext model info ... | head -0`: the reader is gone before the first line; status 141 (as SIGPIPE), no
    BrokenPipeError traceback and no `error:` line (export's own OSError handling lets it through too)."""
    process = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, cwd=tmp_path, env=cli_env(tmp_path))
    process.stdout.close()  # before the child has imported anything: its first write finds no reader
    stderr = process.communicate(timeout=300)[1].decode()
    assert process.returncode == 141 and stderr == "", stderr
