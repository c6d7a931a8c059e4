"""Find-or-build: a TensorRT engine for this GPU from a model repository version, built once and added to it.

Which engines fit a GPU and how their files are named: runtime/tensorrt_files.py; the build itself and its parity
check: runtime/tensorrt_build.py. Replicas sharing one repository build an engine once: find-or-build and the manifest
update run under the version's lock (ModelRepository.lock), and whoever gets the lock second finds the engine the
first one added; builds stage only under that lock, so its holder removes any `.engine-*` staging folder a killed
build left; an export --overwrite of the version takes the same lock to swap it, so it waits for a build to end,
and an engine is added only to the version it was built from. An engine that fails to deserialize is rebuilt once
(open_or_rebuild) instead of failing every start. A rebuilt engine keeps the file name of the one it replaces (an
engine named before device models were in file names too), so a version never lists two engines for one device
model, precision and batch profile. `device` picks the GPU: the build and its parity run make it current first
(TensorRT builds and runs on the calling thread's current CUDA device).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from runtime.repository import (
    Artifact,
    ModelRepository,
    ModelVersion,
    Parity,
    TensorRTInfo,
    artifact_problem,
    describe_file,
)
from runtime.tensorrt_build import TensorRTBuild, onnx_source_for, tensorrt_target
from runtime.tensorrt_files import BatchProfile, BuildTarget, engine_file_name, find_engine, timing_cache_name
from runtime.tensorrt_runtime import EngineDeserializeError, TensorRTError, import_tensorrt

# Re-exported: callers import these from here (the find-or-build API takes and returns them).
__all__ = ["BatchProfile", "BuildTarget", "EngineDeserializeError", "TensorRTError", "import_tensorrt",
           "tensorrt_target"]

ENGINE_STAGING_PREFIX = ".engine-"  # a build's folder inside the version, until its engine is added
BUILD_LOCK_TIMEOUT_S = 1800.0  # a ConvNeXt-T engine builds in minutes; a replica waits for the one building it
logger = logging.getLogger("convnext.export")
Opened = TypeVar("Opened")

# build(version, onnx source, engine path to write, precision, profile) -> the engine's parity; raises on failure.
EngineBuild = Callable[[ModelVersion, Artifact, Path, str, BatchProfile], Parity]


def _sound(version: ModelVersion, artifact: Artifact, replace: Artifact | None) -> bool:
    """The engine file is there, in the version, matches its sha256, and is not the one the caller could not
    deserialize. The service loads versions without checking engines (ModelRepository.load(verify_engines=False)):
    this is where the one it serves is checked."""
    if replace is not None and artifact.sha256 == replace.sha256:
        return False
    problem = artifact_problem(version.path, artifact)
    if problem is not None:
        logger.warning("%s/%s: %s; rebuilding it", version.manifest.name, version.manifest.version, problem)
        return False
    return True


def find_or_build_engine(
    version: ModelVersion,
    precision: str,
    profile: BatchProfile,
    target: BuildTarget,
    build: EngineBuild,
    *,
    repository_root: str | Path | None = None,
    rebuild: bool = False,
    replace: Artifact | None = None,
    lock_timeout_s: float = BUILD_LOCK_TIMEOUT_S,
) -> tuple[Artifact, ModelVersion]:
    """A fitting engine from the version on disk, or one built (once across processes) and added to it.

    The manifest is re-read from disk (a caller's ModelVersion may be stale); building and adding run under the
    version's lock, after a re-check, so a process that waited for the lock uses the engine the other one added.
    `replace`: an engine that failed to deserialize; it is rebuilt (same profile and file) unless already replaced.
    """
    name, number = version.manifest.name, version.manifest.version
    repository = ModelRepository(repository_root if repository_root is not None else version.path.parent.parent)

    def fitting() -> tuple[Artifact | None, ModelVersion]:
        current = repository.load(name, number, verify_files=False)
        found = find_engine(current, precision, profile, target)
        return found, current

    if not rebuild:  # the common case needs no lock (nor write access to the repository)
        found, current = fitting()
        if found is not None and _sound(current, found, replace):
            return found, current
    with repository.lock(name, number, lock_timeout_s):
        found, current = fitting()
        if not rebuild and found is not None and _sound(current, found, replace):
            return found, current
        _remove_dead_builds(current.path)
        build_profile = BatchProfile.of(found) if found is not None and not rebuild else profile
        return _build_and_add(repository, current, precision, build_profile, target, build, found)


def _remove_dead_builds(version_path: Path) -> None:
    """Remove the staging folders of builds killed mid-way: builds stage only while holding the version's lock, so
    a `.engine-*` folder seen by its holder belongs to none that is alive."""
    for folder in version_path.glob(f"{ENGINE_STAGING_PREFIX}*"):
        try:
            shutil.rmtree(folder)
        except OSError as err:
            logger.warning("could not remove %s, left by a dead engine build (%s)", folder, err)


def _engine_file(precision: str, profile: BatchProfile, target: BuildTarget, found: Artifact | None) -> str:
    """Where the new engine goes: over the fitting engine it rebuilds when their profiles match (whatever that one's
    name, e.g. one named before device models were in file names), else under its own name."""
    if found is not None and BatchProfile.of(found) == profile:
        return found.file
    return engine_file_name(precision, target, profile)


def _build_and_add(repository: ModelRepository, version: ModelVersion, precision: str, profile: BatchProfile,
                   target: BuildTarget, build: EngineBuild, found: Artifact | None) -> tuple[Artifact, ModelVersion]:
    manifest = version.manifest
    source = onnx_source_for(version, precision, target.weakly_typed)
    relative = _engine_file(precision, profile, target, found)
    with tempfile.TemporaryDirectory(prefix=ENGINE_STAGING_PREFIX, dir=version.path) as tmp:
        staged = Path(tmp) / Path(relative).name
        parity = build(version, source, staged, precision, profile)
        info = TensorRTInfo(
            tensorrt_version=target.tensorrt_version, compute_capability=target.compute_capability,
            device_name=target.device_name, min_batch=profile.min_batch, opt_batch=profile.opt_batch,
            max_batch=profile.max_batch,
        )
        artifact = describe_file(Path(tmp), staged.name, format="tensorrt", precision=precision, parity=parity,
                                 tensorrt=info).model_copy(update={"file": relative})
        updated = repository.add_artifact(manifest.name, manifest.version, staged, artifact, based_on=manifest)
    return artifact, updated


def select_or_build_engine(
    version: ModelVersion,
    precision: str,
    profile: BatchProfile,
    *,
    repository_root: str | Path | None = None,
    workspace_mib: int = 4096,
    optimization_level: int = 3,
    timing_cache: str | Path | None = None,
    rebuild: bool = False,
    replace: Artifact | None = None,
    device: int = 0,
    lock_timeout_s: float = BUILD_LOCK_TIMEOUT_S,
    quiet: bool = False,
) -> tuple[Artifact, ModelVersion]:
    """A compatible engine from the version, or a new one built on CUDA device `device`, verified against ONNX
    Runtime and added to it.

    A build prints TensorRT's phases on stderr (runtime/tensorrt_progress.py) unless `quiet`.
    """
    target = tensorrt_target(device)
    root = Path(repository_root) if repository_root is not None else version.path.parent.parent
    cache = Path(timing_cache) if timing_cache is not None else root / timing_cache_name(target)
    build = TensorRTBuild(cache, workspace_mib, optimization_level, quiet, device=target.device)
    return find_or_build_engine(version, precision, profile, target, build, repository_root=root, rebuild=rebuild,
                                replace=replace, lock_timeout_s=lock_timeout_s)


def open_or_rebuild(
    select: Callable[[Artifact | None], tuple[Artifact, ModelVersion]],
    open_engine: Callable[[ModelVersion, Artifact], Opened],
) -> tuple[Opened, Artifact, ModelVersion]:
    """Select an engine and open it; if it fails to deserialize, have it rebuilt (once) and open that one.

    select(replace) is find-or-build (replace: the engine that failed, or None); open_engine deserializes.
    """
    artifact, version = select(None)
    try:
        return open_engine(version, artifact), artifact, version
    except EngineDeserializeError as error:
        logger.warning("%s: %s; rebuilding it", version.artifact_path(artifact), error)
    artifact, version = select(artifact)
    return open_engine(version, artifact), artifact, version
