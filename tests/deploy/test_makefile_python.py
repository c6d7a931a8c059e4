"""The Makefile's venv target checks $(PYTHON)'s version before it installs: locks/dev.txt pins CPython 3.11 wheels,
and another version failed deep in `pip install --require-hashes`. Real make, with a fake interpreter that prints a
version and records how it was called."""
from __future__ import annotations

import subprocess
from pathlib import Path

from compose_yaml import ROOT


def fake_python(folder: Path, version: str) -> Path:
    """An executable that answers every call with `version` and appends its arguments to calls.log beside it."""
    script = folder / "python"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{folder / "calls.log"}"\necho {version}\n')
    script.chmod(0o755)
    return script


def make_install(python: Path, venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-C", str(ROOT), "install", f"PYTHON={python}", f"VENV={venv}"],
                          capture_output=True, text=True, timeout=60)


def test_another_python_stops_before_the_venv_with_one_line_naming_make_serve_python311(tmp_path):
    python = fake_python(tmp_path, "3.12")
    done = make_install(python, tmp_path / "venv")
    assert done.returncode != 0
    assert (f"make: {python} is Python 3.12, but locks/dev.txt pins CPython 3.11 wheels: run "
            "`make serve PYTHON=python3.11`") in done.stderr
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 1  # the version check only: no `-m venv`
    assert not (tmp_path / "venv").exists()


def test_python_311_passes_the_check_and_goes_on_to_make_the_venv(tmp_path):
    python = fake_python(tmp_path, "3.11")
    done = make_install(python, tmp_path / "venv")  # fails later: the fake makes no venv for pip to run in
    assert "pins CPython" not in done.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls[1:] == [f"-m venv {tmp_path / 'venv'}"]
