"""`python -m service --help` is generated from the Settings class: every setting, its description, type and default."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.__main__ import SECRET_SETTINGS, StartRefused, flag_name, settings_from_args, startable_settings
from service.settings import C_INT_MAX, Settings

ROOT = Path(__file__).resolve().parents[2]
FLOAT_SETTINGS = sorted(name for name, field in Settings.model_fields.items() if field.annotation is float)
C_INT_SETTINGS = ["backlog", "intra_op_threads", "max_body_bytes", "max_connections"]  # grpc core, listen(), engines


@pytest.fixture(scope="module")
def help_text() -> str:
    result = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"PATH": "", "PYTHONPATH": str(ROOT), "COLUMNS": "1000"})
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_every_setting_has_a_description_and_is_in_the_help(name, help_text):
    description = Settings.model_fields[name].description
    assert description and len(description) > 10, f"Settings.{name} needs Field(description=...)"
    assert description in " ".join(help_text.split())  # as argparse wraps it
    assert f"CONVNEXT_{name.upper()}" in help_text
    if name not in SECRET_SETTINGS:
        assert f"  {flag_name(name)} " in help_text


def test_help_shows_types_choices_and_defaults(help_text):
    text = " ".join(help_text.split())
    assert "--engine {onnxruntime,tensorrt,openvino,auto} tensorrt builds" in text
    assert "(env CONVNEXT_ENGINE; default: onnxruntime)" in text
    assert "--port INT listen port (env CONVNEXT_PORT; default: 8000)" in text
    assert "--max-queue-delay-ms FLOAT how long" in text
    assert "--ort-spinning {true,false} ONNX" in text and "(env CONVNEXT_ORT_SPINNING; default: true)" in text
    assert "--model-version INT model version to serve (default: the latest) (env CONVNEXT_VERSION)" in text
    assert "--cors-origins JSON_LIST" in text and "default: [])" in text
    assert "--api-key " not in text  # environment only


def test_help_lists_every_flag_of_convnext_serves_own(help_text):
    """`python -m service --help` sends --pretrained/--checkpoint users to `convnext serve` and lists the flags that
    command takes for its download or export (all but the service's shared --repository)."""
    from convnext_serve import get_args_parser  # torch-side: imported here, the service's own import stays torch-free

    own = {option for action in get_args_parser()._actions for option in action.option_strings
           if option.startswith("--") and option not in ("--help", "--version", "--pretrained", "--checkpoint",
                                                         "--repository")}
    listed = " ".join(help_text.split()).split("its own flags:")[1].split(";")[0]
    assert {flag.strip(" ,") for flag in listed.split()} == own


def test_flags_parse_to_the_settings_types():
    settings = settings_from_args(["--ort-spinning", "off", "--cors-origins", '["https://a.example"]', "--port", "81",
                                   "--decode-mode", "fast", "--watch-interval-s", "0.5"])
    assert (settings.ort_spinning, settings.cors_origins, settings.port) == (False, ["https://a.example"], 81)
    assert (settings.decode_mode, settings.watch_interval_s) == ("fast", 0.5)
    assert settings_from_args([]) == Settings()


def test_thread_defaults_follow_the_cpus_the_process_may_use():
    """Pinned to one CPU (taskset, a container's cpuset), the engine and decode pools default to 1 thread, not to the
    machine's core count (oversubscribed threads spin against each other)."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from service.settings import Settings; s = Settings(); print(s.intra_op_threads, s.preprocess_workers)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.stdout.split() == ["1", "1"], result.stderr


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_no_float_setting_takes_infinity_or_nan(name, value):
    """Refused with the one-line status-2 answer, not a start that ends in a traceback once the model has loaded
    (request_timeout_ms=inf: the graceful shutdown's int(inf))."""
    with pytest.raises(StartRefused) as refused:
        startable_settings([f"{flag_name(name)}={value}"])
    assert refused.value.status == 2
    assert str(refused.value) == f"invalid settings: {name}: Input should be a finite number"


@pytest.mark.parametrize("name", C_INT_SETTINGS)
def test_settings_that_reach_a_c_int_stop_at_its_largest_value(name):
    """max_body_bytes of 2 GiB was grpc's max_receive_message_length: an OverflowError traceback after the model
    loaded; the backlog reaches listen(), threads the engines (max_connections keeps the bound it had as grpc's
    maximum_concurrent_rpcs)."""
    with pytest.raises(StartRefused) as refused:
        startable_settings([flag_name(name), str(C_INT_MAX + 1)])
    assert refused.value.status == 2
    assert str(refused.value) == f"invalid settings: {name}: Input should be less than or equal to {C_INT_MAX}"
    overrides = {"max_buffered_body_bytes": 2 * C_INT_MAX} if name == "max_body_bytes" else {}
    assert getattr(Settings(**{name: C_INT_MAX}, **overrides), name) == C_INT_MAX
