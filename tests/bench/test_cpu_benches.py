"""`bench cpu engines` and `bench cpu-serving` on a small real model: every engine configuration builds and runs, the
service runs and the reports hold what the README's tables print (short windows: mechanics, not speed)."""
from __future__ import annotations

import json
import math

import pytest

from bench import cpu_engines, cpu_serving
from runtime.repository import ModelRepository


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("cpu-bench")
    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=64, precisions=("fp32", "int8"))
    return root


def test_engine_rounds_run_every_configuration_and_report_ratio_ranges(repository):
    version = ModelRepository(repository).load("atto")
    result = cpu_engines.engine_rounds(version, cpu_engines.CONFIGS, batch_size=4, rounds=2, seconds=0.3, threads=2)
    labels = [label for label, *_ in cpu_engines.CONFIGS]
    # bf16 only where the CPU computes it; everything else builds on any x86 CPU.
    assert set(labels) - {"openvino bf16 LATENCY"} <= set(result) <= set(labels)
    for row in result.values():
        assert len(row["rounds"]) == 2 and row["images_per_s"] > 0
        low, high = row["vs_onnxruntime_fp32_range"]
        assert 0 < low <= row["vs_onnxruntime_fp32"] <= high
    assert result["onnxruntime fp32"]["vs_onnxruntime_fp32_range"] == [1.0, 1.0]


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
