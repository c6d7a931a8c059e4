"""`bench cpu engines` and `bench cpu-serving` on a small real model: every engine configuration builds and runs, the
service runs and the reports hold what the README's tables print (short windows: mechanics, not speed)."""
from __future__ import annotations

import json
import math
import sys
from statistics import median
from types import SimpleNamespace

import pytest

from bench import cpu_engines, cpu_serving
from model.flops import measure
from runtime.repository import ModelRepository, Preprocess


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    import torch

    from export.onnx import export_onnx_version

    torch.manual_seed(0)  # random weights whose int8 variant passes the exporter's parity check (unseeded: flaky)
    root = tmp_path_factory.mktemp("cpu-bench")
    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=64, precisions=("fp32", "int8"))
    return root


def test_engine_rounds_run_every_configuration_and_report_ratio_ranges(repository):
    version = ModelRepository(repository).load("atto")
    result = cpu_engines.engine_rounds(version, cpu_engines.CONFIGS, batch_size=4, rounds=2, seconds=0.3, threads=2)
    labels = [label for label, *_ in cpu_engines.CONFIGS]
    gemm = result.pop(cpu_engines.GEMM_LABEL)  # the ceiling, timed in every round beside the engines
    assert len(gemm["rounds"]) == 2 and 0 < gemm["gflops_range"][0] <= gemm["gflops"] <= gemm["gflops_range"][1]
    macs = gemm["macs_per_image"]
    assert macs == measure("convnext_atto", 64, num_classes=10).macs
    # bf16 only where the CPU computes it; everything else builds on any x86 CPU.
    assert set(labels) - {"openvino bf16 LATENCY"} <= set(result) <= set(labels)
    for row in result.values():
        assert len(row["rounds"]) == 2 and row["images_per_s"] > 0
        low, high = row["vs_onnxruntime_fp32_range"]
        assert 0 < low <= row["vs_onnxruntime_fp32"] <= high
        assert math.isclose(row["gflops"], median(rate * 2 * macs / 1e9 for rate in row["rounds"]))
        assert row["of_fp32_gemm"] > 0
    assert result["onnxruntime fp32"]["vs_onnxruntime_fp32_range"] == [1.0, 1.0]


def test_fp32_gemm_rate_is_the_blas_product_rate():
    # 2 * n^3 FLOPs per product: a rate far from what one core can do would mean a wrong count or a wrong unit.
    rate = cpu_engines.fp32_gemm_gflops(threads=1, seconds=0.2)
    assert 1 < rate < 1000


def test_model_macs_is_none_for_an_architecture_this_project_does_not_build(repository, monkeypatch):
    version = ModelRepository(repository).load("atto")
    assert cpu_engines.model_macs(version) == measure("convnext_atto", 64, num_classes=10).macs
    imported = version.manifest.model_copy(update={"architecture": "imported-onnx"})
    assert cpu_engines.model_macs(SimpleNamespace(manifest=imported)) is None
    monkeypatch.setitem(sys.modules, "model.flops", None)  # as where torch is not installed: the import fails
    assert cpu_engines.model_macs(version) is None


def test_cpu_serving_measures_the_service_against_its_engine(repository, tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_serving, "SERVICES", (("onnxruntime", "fp32", "exact", "LATENCY"),
                                                  ("onnxruntime", "fp32", "fast", "THROUGHPUT")))
    output, plot = tmp_path / "serving.json", tmp_path / "serving.png"
    assert cpu_serving.main(["--repository", str(repository), "--model", "atto", "--seconds", "1",
                             "--lone-requests", "3", "--threads", "2", "--output", str(output),
                             "--plot", str(plot)]) == 0
    rows = json.loads(output.read_text())
    assert [(r["decode_mode"], r["hint"]) for r in rows] == [("exact", "LATENCY"), ("fast", "THROUGHPUT")]
    for row in rows:
        assert row["alone"]["images_per_s"] > 0 and row["c8_efficiency"] > 0 and row["c32_efficiency"] > 0
        assert row["c8"]["elapsed_s"] == 1.0 and not row["c8"]["errors"]  # the steady window, nothing refused
        for lone in row["lone"].values():
            assert lone["requests"] == 3 and math.isfinite(lone["overhead_ms"])
            assert lone["client_p50_ms"] > lone["inference_p50_ms"] > 0 and lone["served_preprocess_p50_ms"] > 0
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_decode_costs_report_the_floor_under_any_reduced_decode():
    spec = Preprocess(resize_px=256, crop_px=224, crop_pct=0.875, interpolation="bicubic",
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    rows = {row["size"]: row for row in cpu_engines.decode_costs(spec, repeats=1)}
    assert list(rows) == [f"{w}x{h}" for w, h in cpu_engines.DECODE_SIZES]
    phone = rows["4000x3000"]
    # The floor decodes only DC coefficients: less work than either mode's whole preprocess.
    assert phone["floor_ms"] < phone["fast_ms"] < phone["exact_ms"]
    assert math.isclose(phone["exact_over_floor"], phone["exact_ms"] / phone["floor_ms"])
    assert cpu_engines.decode_at_one_eighth(cpu_engines.photo_jpeg((4000, 3000))).size == (500, 375)
