"""The repository `bench all` starts its service on: the served version as exported, without the engine sweep's
TensorRT engines. The sweep builds those tuned for its largest batch (opt = max = 64); a service whose batches stop at
max_batch_size would find one covering its range and run on it, instead of building its own for that range as a
deployed service does (the one the report says it measured)."""
from __future__ import annotations

import shutil
from pathlib import Path

from runtime.repository import LOCK_FILE, ModelRepository, ModelVersion
from runtime.tensorrt import ENGINE_STAGING_PREFIX

ENGINE_FILES = ("engines", f"{ENGINE_STAGING_PREFIX}*", LOCK_FILE)  # engines, builds in progress, the build lock


def without_engines(repository: Path, name: str, into: Path) -> ModelVersion:
    """The latest version of `name` in `repository`, copied into the repository at `into` (same version number) with
    every file but its TensorRT engines, and a manifest that lists no engine."""
    source = ModelRepository(repository).load(name)
    kept = tuple(a for a in source.manifest.artifacts if a.format != "tensorrt")
    target = ModelRepository(into)
    with target.new_version(name, version=source.manifest.version) as staged:
        shutil.copytree(source.path, staged.path, ignore=shutil.ignore_patterns(*ENGINE_FILES), dirs_exist_ok=True)
        staged.manifest = source.manifest.model_copy(update={"artifacts": kept})
    return target.load(name, source.manifest.version)
