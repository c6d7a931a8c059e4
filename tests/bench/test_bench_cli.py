"""`bench engine` and `bench cpu engines` on a real exported model: results name the model only when its repository
manifest says what it is, and an engine whose artifact the version lacks is skipped saying which one. Usage errors of
every bench, and which loop `bench load` runs for how long."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench.__main__ as bench_main
from bench import cpu_engines
from bench.host import cpu_model
from bench.loadgen import LoadResult
from bench.open_loop import poisson_arrivals_s
from runtime.repository import ModelRepository


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("bench-cli")
    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=32, verify_images=[])
    return root


def refuse_non_finite(constant: str):
    raise AssertionError(f"{constant} in the JSON output: not JSON (use null)")


def bench_engine(onnx_path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "bench", "engine", str(onnx_path), "--batch-sizes", "1", "2",
                           "--iterations", "2", "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line, parse_constant=refuse_non_finite) for line in done.stdout.splitlines()]


def test_bench_engine_labels_a_repository_artifact_from_its_manifest(repository):
    rows = bench_engine(repository / "atto" / "1" / "model.onnx")
    assert [r["batch_size"] for r in rows] == [1, 2]
    for row in rows:
        assert (row["model"], row["activation"], row["precision"]) == ("convnext_atto", "gelu", "fp32")
        assert f"{cpu_model()}, " in row["host"] and "cores, load average (" in row["host"]  # whose numbers these are


def test_bench_engine_leaves_out_what_a_bare_onnx_file_cannot_tell(repository, tmp_path):
    bare = shutil.copy(repository / "atto" / "1" / "model.onnx", tmp_path / "model.onnx")
    for row in bench_engine(bare):
        assert not {"model", "activation", "precision"} & set(row)
        assert row["images_per_s"] > 0 and row["provider"] == "cpu"


def test_an_engine_whose_artifact_the_version_lacks_is_skipped_naming_what_it_has(repository, capsys):
    version = ModelRepository(repository).load("atto")
    configs = [c for c in cpu_engines.CONFIGS if c[0] in ("onnxruntime fp32", "onnxruntime int8")]
    result = cpu_engines.engine_rounds(version, configs, batch_size=1, rounds=1, seconds=0.05, threads=1)
    assert "onnxruntime fp32" in result and "onnxruntime int8" not in result
    assert "skipped onnxruntime int8: no int8 ONNX artifact in atto/1 (has fp32)\n" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--iterations", "--threads", "--batch-sizes"])
def test_a_count_of_zero_is_a_usage_error_not_a_traceback(repository, flag, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench_main.main(["engine", str(repository / "atto" / "1" / "model.onnx"), flag, "0"])
    assert stopped.value.code == 2
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["cpu", "engines", "--rounds"], ["cpu-serving", "--lone-requests"],
                                     ["torch", "--timed-iters"], ["roadmap", "--threads"], ["roadmap", "--rounds"],
                                     ["serve", "--concurrency"], ["soak", "--max-batch-size"]],
                         ids=lambda c: "-".join(c).replace("--", ""))
def test_every_benchs_counts_refuse_zero_as_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as stopped:
        bench_main.main([*command, "0"])
    assert stopped.value.code == 2
    assert f"argument {command[-1]}: must be at least 1, got 0" in capsys.readouterr().err


def test_roadmap_refuses_a_single_round(capsys):
    with pytest.raises(SystemExit) as stopped:
        bench_main.main(["roadmap", "--rounds", "1"])
    assert stopped.value.code == 2
    assert "--rounds must be at least 2" in capsys.readouterr().err


def test_precision_labels_a_bare_file_and_may_not_contradict_a_manifest(repository, tmp_path):
    artifact = repository / "atto" / "1" / "model.onnx"
    bare = shutil.copy(artifact, tmp_path / "model.onnx")
    assert bench_main.engine_labels(bare, "fp16") == {"precision": "fp16"}
    assert bench_main.engine_labels(bare, None) == {}
    assert bench_main.engine_labels(artifact, "fp32")["precision"] == "fp32"
    with pytest.raises(ValueError, match="--precision fp16, but .* lists it as fp32"):
        bench_main.engine_labels(artifact, "fp16")


@pytest.mark.parametrize(("flag", "value"), [("--rate", "0"), ("--rate", "-5"), ("--rate", "nan"), ("--rate", "inf"),
                                             ("--seconds", "0")])
def test_a_rate_or_duration_that_is_not_above_zero_is_a_usage_error(flag, value, capsys):
    # --rate 0 was read as no rate: a closed loop ran in place of the open loop asked for.
    with pytest.raises(SystemExit) as stopped:
        bench_main.main(["load", "http://127.0.0.1:8000/classify", flag, value])
    assert stopped.value.code == 2
    assert f"argument {flag}: must be a number above 0, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize(("url", "refusal"), [
    ("localhost:8000/classify", "no scheme; the load generator sends plain HTTP: pass http://localhost:8000/classify"),
    ("https://127.0.0.1:8443/classify", "the load generator sends plain HTTP (no TLS): pass an http:// URL, not "
                                        "https://"),
    ("http://10.0.0.1:8000/classify", "the load generator only targets loopback (127.0.0.1, localhost, ::1), got "
                                      "'10.0.0.1'")])
def test_bench_load_takes_an_http_url_on_loopback_only_as_a_usage_error(url, refusal, capsys):
    """Without a scheme the host was None (a misleading loopback error); an https:// URL was sent as plain HTTP."""
    with pytest.raises(SystemExit) as stopped:
        bench_main.main(["load", url])
    assert stopped.value.code == 2
    assert f"python -m bench load: error: argument url: {url}: {refusal}" in capsys.readouterr().err


# Every bench's --threads default and its host line, in a process allowed one CPU fewer than the machine has (as under
# taskset or a container's cpuset).
THREAD_DEFAULTS_UNDER_A_MASK = """
import json, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
sys.path.insert(0, "scripts")
import compare_service_trees
import bench.__main__ as bench_main
from bench import cpu_engines, cpu_serving, serve_benchmark
from bench.host import host_description
from bench.model_throughput import get_args_parser as torch_parser
from bench.roadmap import get_args_parser as roadmap_parser
threads = {"all": bench_main.get_args_parser().parse_args(["all"]).threads,
           "engine": bench_main.get_args_parser().parse_args(["engine", sys.executable]).threads,
           "cpu": cpu_engines.get_args_parser().parse_args(["engines"]).threads,
           "cpu-serving": cpu_serving.get_args_parser().parse_args([]).threads,
           "serve": serve_benchmark.get_args_parser().parse_args([]).threads,
           "torch": torch_parser().parse_args([]).threads, "roadmap": roadmap_parser().parse_args([]).threads,
           "compare_service_trees": compare_service_trees.get_args_parser().parse_args(
               ["--before", ".", "--repository", ".", "--model", "m"]).threads}
print(json.dumps({"threads": threads, "host": host_description()}))
"""


def test_thread_defaults_and_the_host_line_count_the_cpus_the_affinity_mask_allows():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", THREAD_DEFAULTS_UNDER_A_MASK], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    assert measured["threads"] == dict.fromkeys(measured["threads"], 1)  # the service's usable_cpus(), not the machine
    machine = os.cpu_count() or 1  # a one-CPU host leaves none out: its line names the one core alone
    assert measured["host"].endswith(f", 1 usable of {machine} cores" if machine > 1 else ", 1 cores")


@pytest.mark.parametrize("command", [["soak", "--window-s", "0"], ["soak", "--window-s", "-10"],
                                     ["soak", "--minutes", "0"], ["soak", "--rate", "nan"], ["serve", "--seconds", "0"],
                                     ["cpu", "engines", "--seconds", "0"], ["cpu-serving", "--seconds", "-1"],
                                     ["roadmap", "--seconds", "nan"]], ids=lambda c: "-".join(c).replace("--", ""))
def test_every_benchs_durations_and_rates_refuse_a_value_not_above_zero_before_anything_starts(command, capsys):
    # soak --window-s 0 failed with an IndexError (a negative one a ZeroDivisionError) after the whole soak.
    with pytest.raises(SystemExit) as stopped:
        bench_main.main(command)
    assert stopped.value.code == 2
    assert f"argument {command[-2]}: must be a number above 0, got {command[-1]}" in capsys.readouterr().err


def test_compare_service_trees_refuses_a_duration_or_count_not_above_zero(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts"))
    import compare_service_trees

    for flag, value in (("--seconds", "0"), ("--rounds", "0"), ("--lone-requests", "0")):
        with pytest.raises(SystemExit) as stopped:
            compare_service_trees.get_args_parser().parse_args(["--before", ".", "--repository", ".", "--model", "m",
                                                                 flag, value])
        assert stopped.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err


@pytest.fixture()
def loads(monkeypatch):
    """bench load's two loops, recorded instead of run: (loop, its arguments)."""
    started = []

    def recording(mode):
        async def run(url, payloads, first, requests, seconds, form_field=None, api_key=None):
            started.append((mode, first, requests, seconds))
            return LoadResult(mode, url, None, None, sent=1, ok=1, elapsed_s=1.0, latencies_ms=[1.0])
        return run

    monkeypatch.setattr(bench_main, "jpeg_payloads", lambda: [b"jpeg"])
    monkeypatch.setattr(bench_main, "open_loop", recording("open"))
    monkeypatch.setattr(bench_main, "closed_loop", recording("closed"))
    return started


def test_an_open_loop_sends_for_the_whole_duration_asked_unless_its_requests_are_capped(loads, capsys):
    url = "http://127.0.0.1:8000/classify"
    assert bench_main.main(["load", url, "--rate", "20", "--seconds", "30"]) == 0  # the README's example
    ((mode, rate, cap, seconds),) = loads
    assert (mode, rate, seconds) == ("open", 20.0, 30.0)
    arrivals = poisson_arrivals_s(rate, cap, seconds)
    assert arrivals[-1] > 29 and 500 < len(arrivals) < 700  # ~rate x seconds, due until the end, not 200 in 10 s
    assert f"{cpu_model()}, " in json.loads(capsys.readouterr().out)["host"]  # the machine the numbers are from
    bench_main.main(["load", url, "--rate", "20", "--requests", "50"])
    bench_main.main(["load", url])
    assert loads[1:] == [("open", 20.0, 50, 30.0), ("closed", 8, bench_main.CLOSED_LOOP_REQUESTS, 30.0)]
