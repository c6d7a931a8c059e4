"""One repository write in its own process, for the dead-write cleanup tests; run as a module it is one 'exporter'.

    python -m tests.export.repository_write_worker ROOT VERSION hold READY GO   stage, touch READY, publish once GO
    python -m tests.export.repository_write_worker ROOT VERSION die-mid-overwrite
        overwrite VERSION and die by SIGKILL right after moving the old version aside (before the new one is in)

Everything but the death is the real runtime.repository code; the death is a real SIGKILL of a real process.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from runtime.repository import (
    InputSpec,
    Manifest,
    ModelRepository,
    Preprocess,
    Source,
    StagedVersion,
    describe_file,
    now_utc,
)

NAME = "tiny"
WAIT_TIMEOUT_S = 60


def fill(staged: StagedVersion, content: str) -> None:
    """A minimal complete version: one placeholder file named in its manifest."""
    (staged.path / "model.onnx").write_text(content)
    staged.manifest = Manifest(
        name=NAME, version=staged.version, architecture="convnext_atto", activation="gelu", num_classes=2,
        input=InputSpec(height=32, width=32),
        preprocess=Preprocess(resize_px=36, crop_px=32, crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3),
        labels=("cat", "dog"), source=Source(checkpoint=None, sha256=None, format="random"), onnx_opset=18,
        artifacts=(describe_file(staged.path, "model.onnx", format="onnx", precision="fp32"),),
        created_at=now_utc(), project_version="test",
    )


def write_version(root: Path, version: int, content: str, overwrite: bool = False) -> None:
    with ModelRepository(root).new_version(NAME, version, overwrite=overwrite) as staged:
        fill(staged, content)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def hold(root: Path, version: int, ready: Path, go: Path) -> None:
    """A live export: its staging folder exists until GO appears (a real export spends minutes there)."""
    with ModelRepository(root).new_version(NAME, version) as staged:
        fill(staged, f"held by {os.getpid()}")
        ready.touch()
        _wait_for(go)


def die_mid_overwrite(root: Path, version: int) -> None:
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if Path(dst).name.startswith(".old-"):  # the old version is aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace_then_die  # type: ignore[assignment]
    write_version(root, version, "the overwrite that died", overwrite=True)


def main(argv: list[str]) -> int:
    root, version, mode = Path(argv[0]), int(argv[1]), argv[2]
    if mode == "hold":
        hold(root, version, Path(argv[3]), Path(argv[4]))
    elif mode == "die-mid-overwrite":
        die_mid_overwrite(root, version)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
