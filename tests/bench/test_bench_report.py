"""`bench all`'s report on given figures: what it says about few-sample percentiles, a low-load difference measured
across two phases, the engines under load, and the GPU host it ran on (no GPU needed: only its name is looked up)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import bench.__main__ as bench_main
from bench.presets import PRESETS
from bench.report import latency_cdf_label, low_load_line, markdown, write_report


def engine_row(batch_size: int, iterations: int) -> dict:
    return {"model": "convnext_atto", "activation": "gelu", "precision": "fp32", "provider": "cpu",
            "batch_size": batch_size, "threads": 2, "images_per_s": 100.0, "p50_ms": 10.0, "p99_ms": 12.0,
            "iterations": iterations}


def load_run(server: str, mode: str, concurrency: int | None, rate: float | None) -> dict:
    return {"server": server, "mode": mode, "concurrency": concurrency, "rate_per_s": rate, "ok": 10, "errors": {},
            "images_per_s": 50.0, "p50_ms": 20.0, "p95_ms": 25.0, "p99_ms": 30.0, "send_lag_max_ms": None,
            "efficiency": None, "latencies_ms": [20.0] * 10}


@pytest.fixture()
def results() -> dict:
    return {"config": {"name": "smoke"}, "host": "Linux, Test CPU (AVX2), 2 cores",
            "compare": {"models": [{"model": "convnext_atto", "activation": "gelu", "params_m": 3.7, "gmacs": 0.55,
                                    "published_top1": None, "published_top1_source": "not published",
                                    "results": [engine_row(1, 40), engine_row(8, 3)]}], "skipped": {}},
            "load": [load_run("ours", "closed", 1, None), load_run("ours", "open", None, 5.5)],
            "served_engine": {"engine": "onnxruntime", "provider": "cpu", "precision": "fp32"}}


def test_engine_table_shows_how_many_calls_each_p99_rests_on(results):
    report = markdown(results)
    assert "## Engine alone (ONNX Runtime; random-init weights: speed only)" in report  # no TensorRT in a CPU run
    results["compare"]["models"][0]["results"].append({**engine_row(8, 3), "provider": "tensorrt-engine"})
    assert "## Engine alone (ONNX Runtime providers and native TensorRT engines;" in markdown(results)
    assert "p99 ms (n calls)" in report
    assert "| 1 | 100.0 | 10.0 | 12.0 (n=40) |" in report and "| 8 | 100.0 | 10.0 | 12.0 (n=3) |" in report


def test_end_to_end_latencies_say_they_are_the_successes_and_failed_requests_have_their_own(results):
    results["load"][1].update(ok=6, errors={"503": 4}, failed_p50_ms=310.0, failed_max_ms=402.5)
    report = markdown(results)
    assert "| p50 ms (200s) | p95 ms (200s) | p99 ms (200s) | errors: p50 / max ms |" in report
    assert "| 5.5 | 6 | 4 | 50.0 | 20.0 | 25.0 | 30.0 | 310.0 / 402.5 |" in report
    assert "| 1 | - | 10 | 0 | 50.0 | 20.0 | 25.0 | 30.0 | - |" in report  # no failures (or a run before the figure)
    assert "Latency percentiles are of the successful (200) answers alone" in report


def test_a_low_load_difference_below_the_engine_alone_is_flagged_as_phase_drift_not_a_cost():
    lone = {"service_p50_ms": 10.0, "engine_p50_ms": 10.7, "overhead_ms": -0.7, "preprocess_ms": 3.0}
    line = low_load_line(lone)
    assert "-0.7 ms, below the engine's own batch-1 p50 measured earlier: phase drift" in line
    assert "for HTTP" not in line
    below_preprocessing = low_load_line({**lone, "service_p50_ms": 12.0, "overhead_ms": 1.3})
    assert "less than the preprocessing alone (3.0 ms)" in below_preprocessing and "phase drift" in below_preprocessing
    plausible = low_load_line({**lone, "service_p50_ms": 16.0, "overhead_ms": 5.3})
    assert plausible.endswith("+5.3 ms for HTTP, JPEG decode and preprocessing.")


def test_latency_cdf_labels_an_open_loop_by_its_rate():
    assert latency_cdf_label(load_run("ours", "open", None, 5.5)) == "ours open loop 5.5 req/s"
    assert latency_cdf_label(load_run("litserve", "closed", 8, None)) == "litserve closed c=8"


def test_report_says_when_the_peer_runs_another_engine_and_notes_the_closed_loop_window(results):
    gpu = PRESETS["smoke"].on_gpu()
    results["engines_under_load"] = {"ours": gpu.service.label, "litserve": gpu.peer_engine.label}
    results["served_engine"] = {"engine": "tensorrt", "provider": "cuda", "precision": "fp16"}
    results["preprocess"] = {"rows": [], "mean_ms_per_image": 3.0, "engine_cpu_ms_per_image": None,
                             "share_of_cpu": None}
    report = markdown(results)
    assert "ours runs TensorRT fp16 and the LitServe peer ONNX Runtime CUDA fp16: not the same engine" in report
    assert "Closed loop: the whole run, its ramp-up and drain included (no steady-state window)" in report
    assert "The engine runs on the GPU" in report and "engine CPU per image" not in report
    cpu = PRESETS["smoke"]
    assert cpu.service.label == cpu.peer_engine.label == "ONNX Runtime CPU fp32"


def test_efficiency_names_its_denominator_the_sweeps_tensorrt_engine_not_the_served_one(results):
    assert ("Service efficiency (closed loop) = end-to-end images/s / the served engine alone (fp32/cpu) images/s at "
            "batch 8, the service's max batch size.") in markdown({**results, "efficiency_batch_size": 8})
    # bench all --gpu: the sweep's TensorRT engine is built for its largest batch (opt 64); the service builds its own.
    sweep = [{**engine_row(batch, 10), "precision": "fp16", "provider": "tensorrt-engine", "opt_batch": 64}
             for batch in (1, 8, 64)]
    results["compare"]["models"][0]["results"] += sweep
    results["served_engine"] = {"engine": "tensorrt", "provider": "cuda", "precision": "fp16",
                                "engine_rows": "fp16/tensorrt-engine"}
    report = markdown({**results, "config": {"name": "smoke-gpu", "max_batch_size": 8}, "efficiency_batch_size": 8})
    assert ("/ the sweep's engine alone (fp16/tensorrt-engine, opt 64) images/s at batch 8, the service's max batch "
            "size: not the engine the service serves, which it builds itself (opt 8).") in report
    assert "served engine alone" not in report


def test_gpu_run_names_the_gpu_on_the_host_line(monkeypatch):
    looked_up = []

    def target():
        looked_up.append(True)
        return SimpleNamespace(device_name="NVIDIA H200", compute_capability="9.0")

    monkeypatch.setattr(bench_main, "tensorrt_target", target)
    host = bench_main.host_line(["cpu", "cuda", "tensorrt"])
    assert ", GPU NVIDIA H200 (compute capability 9.0), load average (" in host
    assert "cores, load average (" in bench_main.host_line(["cpu"]) and len(looked_up) == 1  # no lookup on CPU


def test_the_report_lists_and_writes_every_plot_then_its_results_and_markdown(results, tmp_path):
    files = write_report(results, tmp_path)
    listed = json.loads(files["json"].read_text())["files"]
    assert set(listed) == {"json", "markdown", "throughput_vs_concurrency", "latency_cdf", "batch_sizes"}
    assert all(files[name].read_bytes().startswith(b"\x89PNG") for name in listed if name not in ("json", "markdown"))
    assert files["markdown"].read_text() == markdown(results)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files.values())  # no temporaries


def test_a_report_that_fails_to_render_leaves_the_old_one_and_no_new_plots(results, tmp_path):
    (tmp_path / "report.md").write_text("the previous run's report")
    del results["compare"]  # the markdown needs the engine sweep; the plots, rendered first, do not
    with pytest.raises(KeyError):
        write_report(results, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]
    assert (tmp_path / "report.md").read_text() == "the previous run's report"
