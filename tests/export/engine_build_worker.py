"""A tiny model version and a stand-in engine build for find-or-build tests; run as a module it is one 'replica'
(`python -m tests.export.engine_build_worker ROOT LOG READY_DIR REPLICAS BUILD_S`).

The stand-in build writes a file and sleeps (TensorRT itself needs a GPU); everything around it (the lock, the
re-check, the manifest update) is the real runtime.tensorrt.find_or_build_engine code path.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.repository import (
    InputSpec,
    Manifest,
    ModelRepository,
    ModelVersion,
    Parity,
    Preprocess,
    Source,
    describe_file,
    now_utc,
)
from runtime.tensorrt import BatchProfile, BuildTarget, find_or_build_engine

NAME = "tiny"
PROFILE = BatchProfile(1, 4, 8)
TARGET = BuildTarget(tensorrt_version="10.13.2.6", compute_capability="9.0", device_name="NVIDIA H100",
                     weakly_typed=True)
BARRIER_TIMEOUT_S = 60


def make_version(root: Path) -> ModelVersion:
    """models/tiny/1 with one (placeholder) fp32 ONNX file: enough for find-or-build, which never reads it."""
    repository = ModelRepository(root)
    with repository.new_version(NAME, 1) as staged:
        (staged.path / "model.onnx").write_bytes(b"placeholder onnx")
        staged.manifest = Manifest(
            name=NAME, version=1, architecture="convnext_atto", activation="gelu", num_classes=2,
            input=InputSpec(height=32, width=32),
            preprocess=Preprocess(resize_px=36, crop_px=32, crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3),
            labels=("cat", "dog"), source=Source(checkpoint=None, sha256=None, format="random"), onnx_opset=18,
            artifacts=(describe_file(staged.path, "model.onnx", format="onnx", precision="fp32"),),
            created_at=now_utc(), project_version="test",
        )
    return repository.load(NAME, 1)


@dataclass
class StandInBuild:
    """Writes `contents[i]` for the i-th build (the last one repeats), logs one line per build, then sleeps."""

    log: Path
    contents: tuple[bytes, ...] = (b"engine",)
    sleep_s: float = 0.0

    def builds(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.is_file() else []

    def __call__(self, version, source, engine_path: Path, precision: str, profile: BatchProfile) -> Parity:
        done = len(self.builds())
        with open(self.log, "a") as f:  # O_APPEND: one whole line per build, from any process
            f.write(f"{os.getpid()} {engine_path.name}\n")
        engine_path.write_bytes(self.contents[min(done, len(self.contents) - 1)] + f" {os.getpid()}".encode())
        time.sleep(self.sleep_s)  # a real build takes minutes: the other replica arrives meanwhile
        return Parity(reference="onnxruntime-fp32", num_inputs=1, num_real_images=0, max_abs_diff=0.0,
                      top1_agreement=1.0, top5_agreement=1.0)


def _wait_for_each_other(ready: Path, replicas: int) -> None:
    """Start find-or-build in every replica at about the same moment (they start at different speeds)."""
    (ready / str(os.getpid())).touch()
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while len(list(ready.iterdir())) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other replicas never started ({ready})")
        time.sleep(0.01)


def main(argv: list[str]) -> int:
    root, log, ready, replicas, build_s = Path(argv[0]), Path(argv[1]), Path(argv[2]), int(argv[3]), float(argv[4])
    stale = ModelRepository(root).load(NAME, 1)  # read at start, before anyone built: the engine is not in it
    _wait_for_each_other(ready, replicas)
    artifact, current = find_or_build_engine(stale, "fp16", PROFILE, TARGET, StandInBuild(log, sleep_s=build_s),
                                             repository_root=root)
    print(json.dumps({"file": artifact.file, "sha256": artifact.sha256, "version": current.manifest.version}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
