"""What check_engine_options refuses before a start (python -m service's one line), decided without a GPU.

TensorRT cannot be installed here: where a check needs it past its import, a stand-in module answers the one
question asked of it (does this TensorRT build weakly typed, i.e. from the fp32 graph: TensorRT 10, or only from the
precision's own graph: TensorRT 11), as in tests/export/test_tensorrt_build_cpu.py."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import onnxruntime
import pytest

import runtime.engines.factory as factory
from runtime.engines.base import EngineError
from runtime.engines.factory import EngineOptions, check_engine_options, open_engine
from runtime.repository import ModelRepository


def stand_in_tensorrt(monkeypatch, weakly_typed: bool) -> None:
    flags = {"FP16": 0, "BF16": 1} if weakly_typed else {"STRONGLY_TYPED": 0}
    trt = SimpleNamespace(BuilderFlag=SimpleNamespace(__members__=flags))
    monkeypatch.setattr(factory, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(factory, "cudart", lambda: object())


@pytest.mark.parametrize(("weakly_typed", "precision"), [(True, "fp16"), (True, "bf16"), (False, "fp32")])
def test_tensorrt_passes_when_the_version_has_the_onnx_file_it_builds_from(version, monkeypatch, weakly_typed,
                                                                             precision):
    stand_in_tensorrt(monkeypatch, weakly_typed)
    check_engine_options(version, EngineOptions(engine="tensorrt", precision=precision, max_batch_size=4096))


def test_tensorrt_11_without_the_precisions_onnx_file_is_refused_with_the_export_to_run(version, monkeypatch):
    stand_in_tensorrt(monkeypatch, weakly_typed=False)  # the session's version has model.onnx (fp32) only
    with pytest.raises(EngineError, match=r"no fp16 ONNX artifact .* --precisions fp32,fp16"):
        check_engine_options(version, EngineOptions(engine="tensorrt", precision="fp16"))


@pytest.mark.parametrize(("options", "refusal"), [
    (EngineOptions(engine="tensorrt", precision="int8"), "builds fp32/fp16/bf16 engines, not int8"),
    (EngineOptions(engine="tensorrt", max_batch_size=4097), "--max-batch-size 4097: batch profile"),
])
def test_what_tensorrt_cannot_build_is_refused_before_its_import(version, monkeypatch, options, refusal):
    monkeypatch.setattr(factory, "import_tensorrt", lambda: pytest.fail("TensorRT imported first"))
    with pytest.raises(EngineError, match=refusal):
        check_engine_options(version, options)


def test_a_tensorrt_start_at_int8_neither_locks_nor_builds(model_repository, tmp_path):
    """A start past the check (the lifespan's, in-process) is refused as one EngineError before the version's lock."""
    root = tmp_path / "models"
    shutil.copytree(model_repository / "atto" / "1", root / "atto" / "1", ignore=shutil.ignore_patterns(".lock"))
    copy = ModelRepository(root).load("atto", 1)
    with pytest.raises(EngineError, match="not int8"):
        open_engine(copy, EngineOptions(engine="tensorrt", precision="int8", repository=str(root)))
    assert not (copy.path / ".lock").exists()


@pytest.mark.parametrize(("options", "refusal"), [
    (EngineOptions(engine="openvino", provider="cuda"), "runs on the CPU, not provider 'cuda'"),
    (EngineOptions(engine="openvino", provider="tensorrt"), "runs on the CPU, not provider 'tensorrt'"),
    (EngineOptions(engine="openvino", ort_streams=2), "--openvino-performance-hint THROUGHPUT"),
])
def test_openvino_refuses_onnx_runtime_options_instead_of_running_on_the_cpu_anyway(version, options, refusal):
    with pytest.raises(EngineError, match=refusal):
        check_engine_options(version, options)


def test_engine_auto_gives_ort_streams_to_its_onnx_runtime_candidate_only(version):
    options = EngineOptions(engine="auto", threads=2, ort_streams=2)
    check_engine_options(version, options)  # builds each candidate: OpenVINO's is not refused
    candidates = open_engine(version, options).candidates
    assert candidates["onnxruntime"]().max_concurrent_batches == 2
    assert candidates["openvino"]().name == "openvino"


def test_onnx_runtime_bf16_is_refused_on_the_cpu_provider_only(version, monkeypatch):
    """Refused for what the CPU provider lacks, not for the missing file: exporting bf16 would not help there. The
    CUDA provider has bf16 Conv kernels: with it in the onnxruntime build (as onnxruntime-gpu's is), the missing file
    is what is refused; without it, the provider is, before any version is read (convnext serve asks before its
    export)."""
    with pytest.raises(EngineError, match="no bfloat16 Conv kernel.* --engine openvino --precision bf16"):
        check_engine_options(version, EngineOptions(precision="bf16"))
    # An onnxruntime build without the CUDA provider (onnxruntime-gpu lists it even without a GPU).
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(EngineError, match="CUDAExecutionProvider is not in this onnxruntime build"):
        factory.check_engine_settings(EngineOptions(provider="cuda", precision="bf16"))
    monkeypatch.setattr(factory, "available_provider", lambda provider: "CUDAExecutionProvider")
    with pytest.raises(EngineError, match=r"no bf16 ONNX artifact \(has \['fp32'\]\)"):
        check_engine_options(version, EngineOptions(provider="cuda", precision="bf16"))
