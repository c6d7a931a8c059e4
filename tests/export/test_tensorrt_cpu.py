"""TensorRT helpers that need no GPU: engine naming, compatibility refusal, batch profiles, CLI."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from export.__main__ import main
from export.repository import Artifact, TensorRTInfo
from export.tensorrt import (
    BatchProfile, TensorRTError, check_engine_compatible, engine_file_name, find_engine, onnx_source_for,
)

SHA = "0" * 64


def _engine(trt="10.13.2.6", cc="9.0", batches=(1, 8, 32), precision="fp16") -> Artifact:
    info = TensorRTInfo(tensorrt_version=trt, compute_capability=cc, device_name="NVIDIA H100",
                        min_batch=batches[0], opt_batch=batches[1], max_batch=batches[2])
    name = engine_file_name(precision, trt, cc, BatchProfile(*batches))
    return Artifact(file=name, format="tensorrt", precision=precision, sha256=SHA, size_bytes=1, tensorrt=info)


def test_engine_name_carries_precision_tensorrt_version_and_sm():
    assert engine_file_name("fp16", "10.13.2.6", "9.0", BatchProfile(1, 8, 32)) == (
        "engines/model.fp16.trt10.13.sm90.b1-8-32.engine"
    )
    assert engine_file_name("bf16", "11.4.0.106", "12.0", BatchProfile()).startswith("engines/model.bf16.trt11.4.sm120")
    with pytest.raises(ValueError, match="choose one of"):
        engine_file_name("int4", "10.13", "9.0", BatchProfile())


def test_compatible_engine_is_accepted():
    check_engine_compatible(_engine(), "10.13.0.35", "9.0")  # same major.minor: loads


@pytest.mark.parametrize(
    "trt, cc, message",
    [("10.12.0.36", "9.0", "built with TensorRT 10.13.2.6"), ("11.4.0.106", "9.0", "built with TensorRT"),
     ("10.13.2.6", "8.9", "built for compute capability 9.0")],
)
def test_mismatched_engine_is_refused_with_a_clear_message(trt, cc, message):
    with pytest.raises(TensorRTError, match=message) as error:
        check_engine_compatible(_engine(), trt, cc)
    assert "rebuild" in str(error.value)


@pytest.mark.parametrize("batches", [(0, 1, 1), (2, 1, 4), (1, 8, 4), (1, 1, 5000)])
def test_invalid_batch_profile_is_refused(batches):
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        BatchProfile(*batches)


def test_profile_shapes_and_coverage():
    profile = BatchProfile(1, 8, 32)
    assert profile.shapes(3, 224) == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert profile.covers(BatchProfile(1, 4, 16)) and not profile.covers(BatchProfile(1, 8, 64))


def test_find_engine_picks_a_compatible_covering_engine(exported):
    engines = (_engine(trt="10.12.0.36"), _engine(batches=(1, 4, 8)), _engine(batches=(1, 16, 64)))
    version = type(exported)(exported.manifest.model_copy(update={"artifacts": exported.manifest.artifacts + engines}),
                             exported.path)
    found = find_engine(version, "fp16", BatchProfile(1, 8, 32), "10.13.2.6", "9.0")
    assert found is engines[2]
    assert find_engine(version, "bf16", BatchProfile(1, 8, 32), "10.13.2.6", "9.0") is None


def test_onnx_source_follows_the_tensorrt_typing_mode(exported):
    assert onnx_source_for(exported, "fp16", weakly_typed=True).precision == "fp32"  # TensorRT 10: builder flag
    assert onnx_source_for(exported, "fp16", weakly_typed=False).precision == "fp16"  # TensorRT 11: in the graph
    with pytest.raises(TensorRTError, match="--precisions fp32,bf16"):
        onnx_source_for(exported, "bf16", weakly_typed=False)


def test_cli_help_lists_the_build_options():
    result = subprocess.run([sys.executable, "-m", "export", "tensorrt", "--help"], capture_output=True, text=True,
                            check=True)
    for option in ("--precision", "--min-batch", "--opt-batch", "--max-batch", "--workspace-mib",
                   "--optimization-level", "--timing-cache"):
        assert option in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed (GPU host)")
def test_cli_says_tensorrt_is_missing(exported, capsys):
    code = main(["tensorrt", "--name", "atto", "--repository", str(exported.path.parent.parent)])
    assert code == 1
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_cli_refuses_a_bad_profile(exported, capsys):
    code = main(["tensorrt", "--name", "atto", "--repository", str(exported.path.parent.parent),
                 "--min-batch", "4", "--opt-batch", "2"])
    assert code == 1
    assert "1 <= min <= opt <= max" in capsys.readouterr().err
