"""deploy/entrypoint.py loaded as a module, and its settings from exactly a container's CONVNEXT_* environment."""
from __future__ import annotations

import importlib.util
import os
import sys

from compose_yaml import ROOT

ENTRYPOINT = ROOT / "deploy" / "entrypoint.py"


def load_entrypoint():
    spec = importlib.util.spec_from_file_location("deploy_entrypoint", ENTRYPOINT)
    entrypoint = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = entrypoint  # dataclasses look their module up while the file executes
    spec.loader.exec_module(entrypoint)
    return entrypoint


def settings_from(entrypoint, monkeypatch, env: dict[str, str]):
    """The entrypoint's settings with exactly `env`'s CONVNEXT_* variables set, as in the container."""
    for name in [name for name in os.environ if name.startswith("CONVNEXT_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("CONVNEXT_"):
            monkeypatch.setenv(name, value)
    return entrypoint.PrepareSettings.from_env()
