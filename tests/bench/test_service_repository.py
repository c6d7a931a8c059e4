"""bench all serves from a copy of the served version without the engine sweep's TensorRT engines, so the service
builds its own for its max batch size instead of reusing one tuned for the sweep's largest batch."""
from __future__ import annotations

from bench.service_repository import without_engines
from runtime.repository import Artifact, ModelRepository, TensorRTInfo, describe_file
from runtime.tensorrt_files import BatchProfile, BuildTarget, engine_file_name, find_engine
from tests.export.repository_write_worker import NAME, fill

TARGET = BuildTarget(tensorrt_version="11.4.0.106", compute_capability="9.0", device_name="NVIDIA H200",
                     weakly_typed=False)


def test_the_served_copy_keeps_every_file_but_the_sweeps_engines(tmp_path):
    swept = tmp_path / "sweep"
    with ModelRepository(swept).new_version(NAME) as staged:
        fill(staged, "fp32 weights")
        (staged.path / "model.onnx.data").write_text("external weights")  # a file no artifact names
        engine = engine_file_name("fp16", TARGET, BatchProfile(1, 64, 64))
        (staged.path / engine).parent.mkdir()
        (staged.path / engine).write_text("an engine tuned for batch 64")
        assert staged.manifest is not None
        info = TensorRTInfo(tensorrt_version=TARGET.tensorrt_version, compute_capability="9.0",
                            device_name=TARGET.device_name, min_batch=1, opt_batch=64, max_batch=64)
        described = describe_file(staged.path, engine, format="tensorrt", precision="fp16", tensorrt=info)
        staged.manifest = staged.manifest.model_copy(update={"artifacts": (*staged.manifest.artifacts, described)})
    swept_version = ModelRepository(swept).load(NAME)
    assert find_engine(swept_version, "fp16", BatchProfile(1, 8, 8), TARGET) is not None  # what the service reused

    served = without_engines(swept, NAME, tmp_path / "served")
    assert served.manifest.version == swept_version.manifest.version
    assert [a.format for a in served.manifest.artifacts] == ["onnx"]
    assert find_engine(served, "fp16", BatchProfile(1, 8, 8), TARGET) is None  # it builds its own
    assert (served.path / "model.onnx").read_text() == "fp32 weights"
    assert (served.path / "model.onnx.data").read_text() == "external weights"
    assert not (served.path / "engines").exists()
    assert isinstance(served.manifest.artifacts[0], Artifact)
