"""Every bench's `python -m service` command line pins what it measures: CONVNEXT_* variables in the environment
(which the service reads when a flag is absent) change none of the settings the benches compare."""
from __future__ import annotations

import pytest

import bench.__main__ as bench_main
from bench import cpu_serving, serve_benchmark, soak
from bench.presets import CPU_SERVICE
from bench.server_process import SERVICE_QUEUE_DELAY_MS, measurement_pins
from runtime.decode import FAST_DECODE_HEADROOM
from service.__main__ import settings_from_args
from service.settings import Settings, usable_cpus

# Each differs from what some bench measures; a bench that forgot a pin would take it up.
ENVIRONMENT = {"DECODE_MODE": "fast", "ORT_STREAMS": "2", "ORT_SPINNING": "false", "FAST_DECODE_HEADROOM": "1",
               "ENGINE": "openvino", "PROVIDER": "cuda", "PRECISION": "int8", "MAX_QUEUE_DELAY_MS": "50",
               "PREPROCESS_WORKERS": "7"}


def measured(args: list[str]) -> tuple:
    settings = settings_from_args(args)
    assert settings.preprocess_workers == usable_cpus()  # never the environment's 7
    assert settings.max_queue_delay_ms in (SERVICE_QUEUE_DELAY_MS, bench_main.QUEUE_DELAY_MS)  # never its 50
    return (settings.engine, settings.provider, settings.precision, settings.decode_mode, settings.ort_streams,
            settings.ort_spinning, settings.fast_decode_headroom)


@pytest.fixture()
def environment(monkeypatch):
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(f"CONVNEXT_{name}", value)


def test_the_pins_are_the_service_defaults_unless_told(environment):
    pinned = settings_from_args(measurement_pins())
    assert (pinned.decode_mode, pinned.ort_streams, pinned.ort_spinning) == ("exact", 1, True)
    assert pinned.fast_decode_headroom == FAST_DECODE_HEADROOM
    told = settings_from_args(measurement_pins(decode_mode="fast", ort_streams=3, ort_spinning=False,
                                               fast_decode_headroom=1.5))
    assert (told.decode_mode, told.ort_streams, told.ort_spinning, told.fast_decode_headroom) == ("fast", 3, False, 1.5)


def test_bench_all_runs_ours_on_the_engine_it_timed_alone_spinning_off_only_when_asked(environment, tmp_path):
    args = bench_main.our_service_args(str(tmp_path), "atto", CPU_SERVICE, threads=2, max_batch_size=8)
    assert measured(args) == ("onnxruntime", "cpu", "fp32", "exact", 1, True, FAST_DECODE_HEADROOM)
    spinning_off = bench_main.our_service_args(str(tmp_path), "atto", CPU_SERVICE, threads=2, max_batch_size=8,
                                               ort_spinning=False)
    assert measured(spinning_off) == ("onnxruntime", "cpu", "fp32", "exact", 1, False, FAST_DECODE_HEADROOM)


def test_bench_serve_runs_the_engine_it_timed_alone(environment, tmp_path):
    args = serve_benchmark.service_args(tmp_path, "atto", threads=2, max_batch_size=8)
    assert measured(args) == ("onnxruntime", "cpu", "fp32", "exact", 1, True, FAST_DECODE_HEADROOM)


def test_the_soak_runs_the_service_defaults(environment, tmp_path):
    args = soak.service_args(tmp_path, queue_size=64, max_batch_size=4)
    assert measured(args) == ("onnxruntime", "cpu", "fp32", "exact", 1, True, FAST_DECODE_HEADROOM)
    assert settings_from_args(args).max_queue_delay_ms == SERVICE_QUEUE_DELAY_MS


@pytest.mark.parametrize(("config", "streams"), [(("onnxruntime", "fp32", "fast", "THROUGHPUT"), 4),
                                                 (("openvino", "bf16", "exact", "LATENCY"), 1)])
def test_cpu_serving_runs_each_configuration_as_its_engine_alone_ran(environment, tmp_path, config, streams):
    engine, precision, mode, _ = config
    args = cpu_serving.service_args(tmp_path, "atto", config, threads=4, max_batch_size=8)
    assert measured(args) == (engine, "cpu", precision, mode, streams, True, FAST_DECODE_HEADROOM)


def test_the_pinned_queue_delay_is_the_services_own_default():
    assert Settings.model_fields["max_queue_delay_ms"].default == SERVICE_QUEUE_DELAY_MS
