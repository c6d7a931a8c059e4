"""TensorRT helpers that need no GPU: engine naming, compatibility refusal, builder flags, batch profiles, CLI."""
from __future__ import annotations

import subprocess
import sys

import pytest

from export.__main__ import main
from runtime.repository import Artifact, TensorRTInfo
from runtime.tensorrt_build import builder_flags, onnx_source_for
from runtime.tensorrt_files import (
    BatchProfile,
    BuildTarget,
    check_engine_compatible,
    device_model,
    engine_file_name,
    find_engine,
    timing_cache_name,
)
from runtime.tensorrt_runtime import TensorRTError

SHA = "0" * 64
H100_PCIE, H100_SXM, H200 = "NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA H200"  # all compute capability 9.0
LEGACY_NAME = "engines/model.fp16.trt10.13.2.6.sm90.b1-8-32.engine"  # named before device models were in names


def _target(trt="10.13.2.6", cc="9.0", device_name=H100_PCIE) -> BuildTarget:
    return BuildTarget(tensorrt_version=trt, compute_capability=cc, device_name=device_name, weakly_typed=True)


def _engine(trt="10.13.2.6", cc="9.0", batches=(1, 8, 32), precision="fp16", device_name=H100_PCIE,
            file=None) -> Artifact:
    info = TensorRTInfo(tensorrt_version=trt, compute_capability=cc, device_name=device_name,
                        min_batch=batches[0], opt_batch=batches[1], max_batch=batches[2])
    name = file or engine_file_name(precision, _target(trt, cc, device_name), BatchProfile(*batches))
    return Artifact(file=name, format="tensorrt", precision=precision, sha256=SHA, size_bytes=1, tensorrt=info)


def test_engine_name_carries_precision_full_tensorrt_version_sm_and_device_model():
    assert engine_file_name("fp16", _target(), BatchProfile(1, 8, 32)) == (
        "engines/model.fp16.trt10.13.2.6.sm90-h100-pcie.b1-8-32.engine"
    )
    assert engine_file_name("bf16", _target("11.4.0.106", "12.0", "NVIDIA RTX PRO 6000 Blackwell Server Edition"),
                            BatchProfile()).startswith("engines/model.bf16.trt11.4.0.106.sm120-rtx-pro-6000-blackwell-")
    with pytest.raises(ValueError, match="choose one of"):
        engine_file_name("int4", _target(), BatchProfile())
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        engine_file_name("fp16", _target("10.13.2.6/../x"), BatchProfile())


def test_device_models_of_one_architecture_get_one_engine_file_each():
    names = {engine_file_name("fp16", _target(device_name=gpu), BatchProfile()) for gpu in (H100_PCIE, H100_SXM, H200)}
    assert len(names) == 3 and all(".sm90-" in name for name in names)


@pytest.mark.parametrize("device_name, model", [
    (H100_PCIE, "h100-pcie"), (H100_SXM, "h100-80gb-hbm3"), (H200, "h200"), ("NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
    ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"), ("Tesla T4", "tesla-t4"), (" NVIDIA  L4\x00", "l4"),
])
def test_device_model_is_a_file_name_safe_slug_of_the_cuda_device_name(device_name, model):
    assert device_model(device_name) == model


def test_a_device_name_with_nothing_to_name_an_engine_by_is_refused():
    with pytest.raises(ValueError, match="no letters or digits"):
        device_model("---")


def test_timing_cache_is_named_by_full_tensorrt_version_sm_and_device_model():
    assert timing_cache_name(_target("11.4.0.106", "9.0", H200)) == ".timing_cache.trt11.4.0.106.sm90-h200"
    assert timing_cache_name(_target("10.13.2.6")) != timing_cache_name(_target("10.13.0.35"))
    assert timing_cache_name(_target(device_name=H100_PCIE)) != timing_cache_name(_target(device_name=H200))


def test_compatible_engine_is_accepted():
    check_engine_compatible(_engine(), _target())  # the exact TensorRT build, GPU architecture and device model


@pytest.mark.parametrize(
    "trt, cc, device_name, message",
    [("10.13.0.35", "9.0", H100_PCIE, "built with TensorRT 10.13.2.6"),  # same major.minor, another build: refused
     ("10.12.0.36", "9.0", H100_PCIE, "built with TensorRT 10.13.2.6"),
     ("11.4.0.106", "9.0", H100_PCIE, "built with TensorRT"),
     ("10.13.2.6", "8.9", H100_PCIE, "built for compute capability 9.0"),
     ("10.13.2.6", "9.0", H200, "built on NVIDIA H100 PCIe, this GPU is NVIDIA H200"),  # same architecture
     ("10.13.2.6", "9.0", H100_SXM, "built on NVIDIA H100 PCIe, this GPU is NVIDIA H100 80GB HBM3")],
)
def test_mismatched_engine_is_refused_with_a_clear_message(trt, cc, device_name, message):
    with pytest.raises(TensorRTError, match=message) as error:
        check_engine_compatible(_engine(), _target(trt, cc, device_name))
    assert "rebuild" in str(error.value)


def test_an_engine_named_before_device_models_were_in_names_fits_the_device_model_its_manifest_records():
    legacy = _engine(file=LEGACY_NAME)
    check_engine_compatible(legacy, _target(device_name=H100_PCIE))
    with pytest.raises(TensorRTError, match="this GPU is NVIDIA H200"):
        check_engine_compatible(legacy, _target(device_name=H200))


TRT10_FLAGS = ("FP16", "BF16", "INT8", "TF32", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")
TRT11_FLAGS = ("TF32", "DEBUG", "REFIT", "STRICT_NANS")  # strongly typed only: no precision flags


@pytest.mark.parametrize(
    "precision, available, to_set, to_clear",
    [("fp32", TRT10_FLAGS, set(), {"TF32"}), ("fp32", TRT11_FLAGS, set(), {"TF32"}),
     ("fp16", TRT10_FLAGS, {"FP16", "OBEY_PRECISION_CONSTRAINTS"}, set()),
     ("bf16", TRT10_FLAGS, {"BF16", "OBEY_PRECISION_CONSTRAINTS"}, set()),
     ("fp16", TRT11_FLAGS, set(), set()), ("bf16", TRT11_FLAGS, set(), set())],
)
def test_builder_flags_per_precision_and_tensorrt_typing_mode(precision, available, to_set, to_clear):
    assert builder_flags(precision, available) == (to_set, to_clear)


def test_builder_flags_refuse_a_tensorrt_without_a_needed_flag():
    with pytest.raises(TensorRTError, match="no builder flag \\['TF32'\\]"):
        builder_flags("fp32", ("FP16", "BF16", "OBEY_PRECISION_CONSTRAINTS"))


@pytest.mark.parametrize("batches", [(0, 1, 1), (2, 1, 4), (1, 8, 4), (1, 1, 5000)])
def test_invalid_batch_profile_is_refused(batches):
    with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
        BatchProfile(*batches)


def test_profile_shapes_and_coverage():
    profile = BatchProfile(1, 8, 32)
    assert profile.shapes(3, 224) == ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    assert profile.covers(BatchProfile(1, 4, 16)) and not profile.covers(BatchProfile(1, 8, 64))


def test_find_engine_picks_a_compatible_covering_engine(exported):
    engines = (_engine(trt="10.13.0.35"), _engine(batches=(1, 4, 8)), _engine(batches=(1, 16, 64), device_name=H200),
               _engine(batches=(1, 16, 64)))
    version = type(exported)(exported.manifest.model_copy(update={"artifacts": exported.manifest.artifacts + engines}),
                             exported.path)
    assert find_engine(version, "fp16", BatchProfile(1, 8, 32), _target()) is engines[3]
    assert find_engine(version, "fp16", BatchProfile(1, 8, 32), _target(device_name=H200)) is engines[2]
    assert find_engine(version, "fp16", BatchProfile(1, 8, 32), _target(device_name=H100_SXM)) is None
    assert find_engine(version, "bf16", BatchProfile(1, 8, 32), _target()) is None


def test_find_engine_prefers_the_nearest_opt_batch_then_the_narrowest_range(exported):
    engines = (_engine(batches=(1, 8, 64)), _engine(batches=(1, 32, 32)), _engine(batches=(1, 8, 32)),
               _engine(batches=(1, 16, 32)))
    version = type(exported)(exported.manifest.model_copy(update={"artifacts": exported.manifest.artifacts + engines}),
                             exported.path)
    assert find_engine(version, "fp16", BatchProfile(1, 32, 32), _target()) is engines[1]  # its opt is 32
    assert find_engine(version, "fp16", BatchProfile(1, 8, 8), _target()) is engines[2]  # opt 8, narrower than 1-64
    assert find_engine(version, "fp16", BatchProfile(1, 16, 16), _target()) is engines[3]
    assert find_engine(version, "fp16", BatchProfile(1, 4, 4), _target()) is engines[2]  # opt 8 is nearest; narrower
    assert find_engine(version, "fp16", BatchProfile(1, 48, 48), _target()) is engines[0]  # the only one covering 48


def test_onnx_source_follows_the_tensorrt_typing_mode(exported):
    assert onnx_source_for(exported, "fp16", weakly_typed=True).precision == "fp32"  # TensorRT 10: builder flag
    assert onnx_source_for(exported, "fp16", weakly_typed=False).precision == "fp16"  # TensorRT 11: in the graph
    with pytest.raises(TensorRTError, match="--precisions fp32,bf16"):
        onnx_source_for(exported, "bf16", weakly_typed=False)


def test_cli_help_lists_the_build_options():
    result = subprocess.run([sys.executable, "-m", "export", "tensorrt", "--help"], capture_output=True, text=True,
                            check=True)
    for option in ("--precision", "--min-batch", "--opt-batch", "--max-batch", "--workspace-mib",
                   "--optimization-level", "--timing-cache", "--device"):
        assert option in result.stdout


def test_cli_says_tensorrt_is_missing(exported, capsys, monkeypatch):
    """Where TensorRT is installed (a GPU host) too: a None in sys.modules makes its import fail as a missing one."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code = main(["tensorrt", "--name", "atto", "--repository", str(exported.path.parent.parent)])
    assert code == 1
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_cli_refuses_a_bad_profile(exported, capsys):
    """As an argument error (status 2, as README says of bad arguments), before the version is loaded."""
    with pytest.raises(SystemExit) as exit_:
        main(["tensorrt", "--name", "atto", "--repository", str(exported.path.parent.parent),
              "--min-batch", "4", "--opt-batch", "2"])
    assert exit_.value.code == 2
    assert "1 <= min <= opt <= max" in capsys.readouterr().err
