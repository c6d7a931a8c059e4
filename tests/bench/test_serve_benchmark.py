"""`bench serve`: the service it starts runs the engine it times alone, it compares at batch sizes the service runs,
and without --repository it exports the architecture it names."""
from __future__ import annotations

import pytest

from bench import serve_benchmark
from service.__main__ import settings_from_args


def test_the_started_service_runs_the_timed_engine_whatever_the_environment_says(tmp_path, monkeypatch):
    for name, value in {"ENGINE": "openvino", "PROVIDER": "tensorrt", "PRECISION": "int8", "DECODE_MODE": "fast",
                        "ORT_STREAMS": "4"}.items():
        monkeypatch.setenv(f"CONVNEXT_{name}", value)
    settings = settings_from_args(serve_benchmark.service_args(tmp_path, "atto", threads=2, max_batch_size=8))
    assert (settings.engine, settings.provider, settings.precision) == ("onnxruntime", "cpu", "fp32")
    assert (settings.decode_mode, settings.ort_streams, settings.intra_op_threads) == ("exact", 1, 2)


def test_engine_best_is_over_the_batch_sizes_the_service_runs():
    engine = {1: 10.0, 4: 30.0, 8: 40.0, 16: 55.0}
    assert serve_benchmark.engine_best(engine, max_batch_size=8) == (8, 40.0)  # not batch 16's 55
    assert serve_benchmark.engine_best(engine, max_batch_size=4) == (4, 30.0)


def test_without_a_repository_it_exports_the_architecture_model_names(monkeypatch):
    exported = []

    class Stop(Exception):
        pass

    def export(root, name, architecture):
        exported.append((name, architecture))
        raise Stop

    monkeypatch.setattr(serve_benchmark, "export_onnx_version", export)
    with pytest.raises(Stop):
        serve_benchmark.main(["--model", "convnext_atto"])
    assert exported == [("convnext_atto", "convnext_atto")]


def test_batch_sizes_all_above_the_service_max_batch_are_refused(capsys):
    with pytest.raises(SystemExit):
        serve_benchmark.main(["--batch-sizes", "16", "--max-batch-size", "8"])
    assert "<= --max-batch-size 8" in capsys.readouterr().err
