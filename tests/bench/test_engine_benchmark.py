"""bench.engine_benchmark on a real fp16 export: TensorRT's options follow the artifact's precision (its file keeps
fp32 inputs, so it cannot tell), over the profile the caller asks for; the fp16 file runs on the CPU provider with the
float32 batch every exported precision takes. Options are only built here: no GPU needed. The native TensorRT path's
decisions (the profile it builds, the order it times the variants in, what the report says) run on fakes of the
engine and its build."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest

from bench import engine_benchmark
from bench.engine_benchmark import benchmark_onnx, gpu_provider_options
from bench.report import markdown
from bench.roadmap_engines import points_from
from runtime.repository import ModelRepository
from runtime.tensorrt import BatchProfile


@pytest.fixture(scope="module")
def fp16_onnx(tmp_path_factory):
    import torch

    from export.onnx import export_onnx_version

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bench-fp16")
    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=32, precisions=("fp32", "fp16"),
                        verify_images=[])
    version = ModelRepository(root).load("atto")
    return version.artifact_path(version.manifest.find("onnx", "fp16"))


def test_an_fp16_artifact_keeps_float32_inputs_so_its_file_cannot_tell_its_precision(fp16_onnx):
    graph_input = onnx.load(str(fp16_onnx), load_external_data=False).graph.input[0]
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_tensorrt_options_of_an_fp16_artifact_enable_fp16_over_the_asked_profile(fp16_onnx):
    options = gpu_provider_options(fp16_onnx, "tensorrt", "fp16", max_batch_size=16)["tensorrt"]
    assert options["trt_fp16_enable"] == options["trt_layer_norm_fp32_fallback"] == "True"
    assert options["trt_profile_max_shapes"] == options["trt_profile_opt_shapes"] == "input:16x3x32x32"
    fp32 = gpu_provider_options(fp16_onnx, "tensorrt", "fp32", max_batch_size=4)["tensorrt"]
    assert fp32["trt_fp16_enable"] == "False" and fp32["trt_profile_max_shapes"] == "input:4x3x32x32"


def test_tensorrt_options_without_a_precision_are_refused_naming_the_flag(fp16_onnx):
    with pytest.raises(ValueError, match="--precision"):
        gpu_provider_options(fp16_onnx, "tensorrt", None, max_batch_size=8)
    assert "tensorrt" not in gpu_provider_options(fp16_onnx, "cuda", None, None)  # CUDA needs neither


def test_an_fp16_artifact_runs_on_the_cpu_provider_with_a_float32_batch(fp16_onnx):
    (row,) = benchmark_onnx(fp16_onnx, [2], threads=1, warmup=1, iterations=2, precision="fp16")
    assert row.precision == "fp16" and row.images_per_s > 0 and row.iterations == 2


def test_a_profile_smaller_than_the_largest_timed_batch_is_refused(fp16_onnx):
    with pytest.raises(ValueError, match="under the largest batch size timed, 4"):
        benchmark_onnx(fp16_onnx, [1, 4], threads=1, iterations=1, max_batch_size=2)


@pytest.mark.filterwarnings("ignore:the float32 number:UserWarning")  # the converter's note on tiny weights
def test_a_file_from_elsewhere_with_float16_inputs_is_timed_with_a_float16_batch(fp16_onnx, tmp_path):
    from onnxconverter_common import float16

    fp32 = onnx.load(str(fp16_onnx.with_name("model.onnx")))
    half_io = tmp_path / "half_io.onnx"
    onnx.save(float16.convert_float_to_float16(fp32, keep_io_types=False), str(half_io))
    assert onnx.load(str(half_io)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    (row,) = benchmark_onnx(half_io, [2], threads=1, warmup=1, iterations=2, precision="fp16")
    assert row.images_per_s > 0


class FakeTensorRTEngine:
    """Stands in for runtime's TensorRTEngine on a host without a GPU: records which variant's engine ran, in order."""

    calls: list[tuple[str, int]] = []
    closed: list[str] = []

    def __init__(self, engine_path, input_shape, **options):
        self.path, self.input_shape = str(engine_path), input_shape

    def load(self):
        pass

    def describe(self):
        return SimpleNamespace(input_shape=self.input_shape)

    def run(self, batch):
        FakeTensorRTEngine.calls.append((self.path, len(batch)))

    def close(self):
        FakeTensorRTEngine.closed.append(self.path)


def fake_version(name: str):
    manifest = SimpleNamespace(input=SimpleNamespace(channels=3, height=8, width=8, name="input"),
                               output_name="logits", artifacts=[])
    return SimpleNamespace(manifest=manifest, artifact_path=lambda artifact: f"{name}.engine")


@pytest.fixture()
def native_tensorrt(monkeypatch):
    """bench.engine_benchmark's native TensorRT path on fakes: the profiles it asks for, and its engines' calls."""
    profiles = []

    def select_or_build_engine(version, precision, profile):
        profiles.append(profile)
        built = SimpleNamespace(min_batch=profile.min_batch, opt_batch=profile.opt_batch, max_batch=profile.max_batch)
        return SimpleNamespace(tensorrt=built), version

    monkeypatch.setattr(engine_benchmark, "select_or_build_engine", select_or_build_engine)
    monkeypatch.setattr(engine_benchmark, "TensorRTEngine", FakeTensorRTEngine)
    monkeypatch.setattr(FakeTensorRTEngine, "calls", [])
    monkeypatch.setattr(FakeTensorRTEngine, "closed", [])
    return profiles


def test_native_tensorrt_engines_are_tuned_for_the_largest_batch_timed_as_the_services(native_tensorrt):
    # The roadmap's GPU verdicts read batch 32: an engine tuned for batch 8 would time it on the wrong kernels.
    rows = engine_benchmark.benchmark_tensorrt(fake_version("step"), "fp16", [1, 32], warmup=0, iterations=2,
                                               max_seconds=1.0)
    assert native_tensorrt == [BatchProfile(1, 32, 32)]
    assert [(r.batch_size, r.opt_batch) for r in rows] == [(1, 32), (32, 32)]
    assert points_from(rows)["32"]["opt_batch"] == 32


def test_bench_all_times_the_variants_native_engines_in_alternating_rounds_and_reports_their_profile(
        native_tensorrt, monkeypatch):
    variants = {"gelu": fake_version("gelu"), "relu": fake_version("relu")}
    monkeypatch.setattr(engine_benchmark, "export_variant",
                        lambda root, model, activation, precisions: (variants[activation], {}))
    monkeypatch.setattr("model.flops.measure", lambda *a, **k: SimpleNamespace(params_m=3.7, gmacs=0.55))
    compared = engine_benchmark.compare_models(Path("unused"), [("convnext_atto", "gelu"), ("convnext_atto", "relu")],
                                               ["fp32"], [1, 8, 64], providers=[], tensorrt_precisions=["fp16"],
                                               warmup=0, iterations=6, max_seconds=5.0)
    assert native_tensorrt == [BatchProfile(1, 64, 64)] * 2 and not compared["skipped"]
    for model in compared["models"]:
        assert [(r["provider"], r["batch_size"], r["opt_batch"]) for r in model["results"]] == [
            ("tensorrt-engine", b, 64) for b in (1, 8, 64)]
    for batch in (1, 8, 64):  # gelu, relu, relu, gelu, gelu, relu: the rounds alternate, not one variant then the other
        order = [path for path, size in FakeTensorRTEngine.calls if size == batch]
        turns = [path for index, path in enumerate(order) if index == 0 or order[index - 1] != path]
        assert turns == ["gelu.engine", "relu.engine", "gelu.engine", "relu.engine"]
    assert sorted(FakeTensorRTEngine.closed) == ["gelu.engine", "relu.engine"]
    report = markdown_of(compared)
    assert "| tensorrt-engine, opt 64 | 8 |" in report and "batch 1 to 64, opt = max" in report


def markdown_of(compared: dict) -> str:
    return markdown({"config": {"name": "test"}, "host": "test host", "compare": compared, "load": []})
