"""`make clean` removes the venv and the tools' caches, never training runs or exports; `make clean-demo` removes the
demo's run and model only. Real make on a copy of the Makefile, in a folder laid out as a checkout after some work."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from compose_yaml import ROOT

MADE = [".venv/bin/python", ".pytest_cache/README.md", ".mypy_cache/3.11/x.json", ".ruff_cache/0.1/x",
        "runs/demo/checkpoint_last.pth", "runs/in1k/checkpoint_last.pth", "models/digits/1/manifest.json",
        "models/convnext-tiny/1/manifest.json"]


def checkout_after_work(folder: Path) -> Path:
    shutil.copy(ROOT / "Makefile", folder / "Makefile")
    for name in MADE:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    return folder


def make(folder: Path, target: str) -> list[str]:
    """Runs `target`; the files of MADE left after it."""
    subprocess.run(["make", "-C", str(folder), target], check=True, capture_output=True, text=True, timeout=60)
    return [name for name in MADE if (folder / name).exists()]


def test_clean_removes_the_venv_and_caches_but_no_training_run_or_export(tmp_path):
    assert make(checkout_after_work(tmp_path), "clean") == [
        "runs/demo/checkpoint_last.pth", "runs/in1k/checkpoint_last.pth", "models/digits/1/manifest.json",
        "models/convnext-tiny/1/manifest.json"]


def test_clean_demo_removes_the_demos_run_and_model_only(tmp_path):
    assert make(checkout_after_work(tmp_path), "clean-demo") == [
        ".venv/bin/python", ".pytest_cache/README.md", ".mypy_cache/3.11/x.json", ".ruff_cache/0.1/x",
        "runs/in1k/checkpoint_last.pth", "models/convnext-tiny/1/manifest.json"]
