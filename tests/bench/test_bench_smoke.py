"""`python -m bench all --smoke` end to end (real export, real service and LitServe over loopback), plus its parts."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from PIL import Image
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench.loadgen import check_loopback, jpeg_payloads
from bench.report import batch_distribution, batch_histogram, service_efficiency

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "bench", "all", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_smoke_engine_sweep_covers_every_variant_and_batch_size(smoke_run):
    _, results = smoke_run
    models = results["compare"]["models"]
    assert {(m["model"], m["activation"]) for m in models} == {("convnext_atto", "gelu"), ("convnext_atto", "relu")}
    for m in models:
        assert m["measured_top1"] == "not measured here (no ImageNet)"
        assert m["params_m"] > 1 and m["gmacs"] > 0.1
        assert sorted(r["batch_size"] for r in m["results"]) == results["config"]["batch_sizes"]
        assert all(r["images_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"] for r in m["results"])


def test_smoke_load_runs_against_ours_and_the_peer_succeed(smoke_run):
    _, results = smoke_run
    servers = {(run["server"], run["mode"]) for run in results["load"]}
    assert servers == {("ours", "closed"), ("ours", "open"), ("ours (ORT spinning off)", "closed"),
                       ("litserve", "closed"), ("litserve", "open")}
    for run in results["load"]:
        assert run["errors"] == {}, run
        assert run["ok"] == run["sent"] > 0
        assert len(run["latencies_ms"]) == run["ok"]
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert (run["efficiency"] is not None) == (run["mode"] == "closed")
    assert results["efficiency_batch_size"] == results["config"]["max_batch_size"] == 8  # the batch limit it served
    ours_sent = sum(run["ok"] for run in results["load"] if run["server"] == "ours")
    batches = results["batch_distribution"]
    assert 0 < sum(batches.values()) <= ours_sent  # every image went through the engine in some batch


def test_smoke_writes_markdown_and_png_plots(smoke_run):
    out, results = smoke_run
    markdown = (out / "report.md").read_text()
    for heading in ("## Engine alone", "## Model comparison", "## End to end", "| litserve | closed |",
                    "top-1 is the published figure", "## GELU vs ReLU", "## Latency at low load",
                    "## Preprocessing cost per image", "| 1024x768 |"):
        assert heading in markdown
    assert results["low_load"]["engine_p50_ms"] > 0 and results["preprocess"]["mean_ms_per_image"] > 0
    assert {r["size"] for r in results["preprocess"]["rows"]} == {"500x375", "1024x768"}
    by_size = results["low_load"]["by_size"]
    assert [r["size"] for r in by_size] == ["500x375", "1024x768"]
    for row in by_size:  # the parts of a lone request's latency are measured, positive, and add up
        assert row["requests"] == 3 and row["http_ms"] > 0 and row["preprocess_and_handoffs_ms"] > 0
        assert row["client_p50_ms"] >= row["inference_p50_ms"] > 0 and row["preprocess_ms"] > 0
    assert "Where the time goes" in markdown and "AVX" in results["host"]
    assert results["complete"] and results["phases"] == {"engine sweep": "done", "our service": "done",
                                                         "our service, ORT spinning off": "done",
                                                         "LitServe peer": "done"}
    assert "\nPhases: engine sweep: done; our service: done;" in markdown and "Incomplete" not in markdown
    assert "| p99 ms (n calls) |" in markdown and " (n=3) |" in markdown  # the smoke preset's 3 calls per batch
    assert results["engines_under_load"] == {"ours": "ONNX Runtime CPU fp32", "litserve": "ONNX Runtime CPU fp32"}
    assert "Under load, ours runs ONNX Runtime CPU fp32 and the LitServe peer ONNX Runtime CPU fp32." in markdown
    for name in ("throughput_vs_concurrency", "latency_cdf", "batch_sizes"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
        assert results["files"][name].endswith(f"{name}.png")


def test_batch_distribution_decumulates_a_real_prometheus_histogram():
    registry = CollectorRegistry()
    histogram = Histogram("convnext_batch_size", "images per engine batch", buckets=(1, 2, 4, 8), registry=registry)
    histogram.observe(1)
    before = batch_histogram(generate_latest(registry).decode())
    for size in (1, 2, 3, 8):
        histogram.observe(size)
    after = batch_histogram(generate_latest(registry).decode())
    assert batch_distribution(before, after) == {"1.0": 1, "2.0": 1, "4.0": 1, "8.0": 1, "+Inf": 0}


def test_service_efficiency_uses_the_engine_at_the_same_batch_size():
    engine = [{"batch_size": 1, "images_per_s": 10.0}, {"batch_size": 8, "images_per_s": 40.0}]
    assert service_efficiency(20.0, engine, 8) == 0.5
    assert service_efficiency(20.0, engine, 4) is None


def test_payloads_are_real_jpegs_at_upload_sizes():
    payloads = jpeg_payloads()
    sizes = set()
    for data in payloads:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG"
            sizes.add(image.size)
    assert len(payloads) == 12 and sizes == {(500, 375), (1024, 768)}


@pytest.mark.parametrize("url", ["http://example.com/classify", "http://10.0.0.1:8000/classify"])
def test_load_generator_refuses_non_loopback_urls(url):
    with pytest.raises(ValueError, match="loopback"):
        check_loopback(url)


def test_engine_benchmark_names_the_fix_when_a_gpu_provider_is_missing(tmp_path):
    """The dev install pins the CPU `onnxruntime` package, which has no TensorRT provider."""
    from bench.engine_benchmark import make_session

    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        make_session(tmp_path / "model.onnx", "tensorrt")
    with pytest.raises(ValueError, match="choose from"):
        make_session(tmp_path / "model.onnx", "rocm")


def test_gpu_suite_on_a_host_without_a_gpu_says_what_is_missing():
    done = subprocess.run([sys.executable, "-m", "bench", "all", "--smoke", "--gpu", "--out", "unused"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "CUDAExecutionProvider" in done.stderr and "GPU host" in done.stderr
