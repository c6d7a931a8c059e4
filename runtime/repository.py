"""The model repository: `<root>/<name>/<version>/manifest.json` beside the model files.

This module is the one contract between `export/` (which writes versions) and `service/` (which reads them).
It imports neither torch nor onnx, so the serving image can use it. Versions are written atomically: files
go to a hidden staging folder first and the folder is renamed into place once the manifest is complete.
A write that dies leaves its hidden folders behind; the next new version of that model (new_version) removes them,
and puts back a version a dead overwrite had moved aside; adding an engine (add_artifact) does not
(runtime.repository_writes says under which rule).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from convnext_files import fsync_folder, fsync_tree, replace_atomic, sha256_file, write_text_atomic
from runtime.repository_writes import (
    FOLDER_MODE,
    LockBusy,
    finish_write,
    hold_write_lock,
    make_folders,
    remove_dead_writes,
    share_tree,
    wait_for_lock,
)

logger = logging.getLogger("runtime.repository")

SCHEMA_VERSION: Final = 1
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"  # in a version folder: held while an engine is found-or-built and added (ModelRepository.lock)
LOCK_POLL_S = 0.5
# An overwrite waits this long for the version's lock: a TensorRT engine being built for it holds the lock for minutes.
OVERWRITE_LOCK_TIMEOUT_S = 1800.0
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# A version folder's name: a positive whole number in ASCII digits without leading zeros (str.isdigit() takes "²" and
# "١", which int() refuses or reads as another version's number, and "01", the same version as "1").
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")
Precision = Literal["fp32", "fp16", "bf16", "int8"]
DIGITS_DATASET = "digits"  # Source.dataset of a project run trained without --data-dir (the offline demo)
# flock's answers when the file system has no locks: NFSv3 without a lock manager (ENOLCK), FUSE and the like
NO_FILE_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RepositoryError(Exception):
    """A model repository entry is missing, malformed, or does not match its manifest."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    name: str = "input"
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    channels: int = Field(3, ge=1)
    height: int = Field(gt=0)
    width: int = Field(gt=0)


class Preprocess(_Strict):
    """The evaluation transform: RGB, resize to resize_px, center-crop to crop_px, normalize.

    crop_mode "center" resizes the short side to resize_px (aspect kept); "squash" resizes both sides to resize_px
    (aspect not kept: the official ConvNeXt evaluation at 384). Manifests without crop_mode mean "center".
    """

    resize_px: int = Field(gt=0)
    crop_px: int = Field(gt=0)
    crop_pct: float = Field(gt=0, le=1)
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_mode: Literal["center", "squash"] = "center"

    @model_validator(mode="after")
    def _check(self) -> Preprocess:
        if self.crop_px > self.resize_px:
            raise ValueError(f"crop_px {self.crop_px} is larger than resize_px {self.resize_px}")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError("mean and std need one entry per channel and std must be positive")
        return self


class Parity(_Strict):
    """How closely an artifact's outputs match its reference on a fixed set of inputs."""

    reference: str  # e.g. "pytorch-fp32", "onnxruntime-fp32"
    num_inputs: int = Field(ge=1)
    num_real_images: int = Field(ge=0)
    max_abs_diff: float = Field(ge=0)
    top1_agreement: float = Field(ge=0, le=1)
    top5_agreement: float = Field(ge=0, le=1)


class TensorRTInfo(_Strict):
    tensorrt_version: str
    compute_capability: str  # "9.0" for H100
    device_name: str
    min_batch: int = Field(ge=1)
    opt_batch: int = Field(ge=1)
    max_batch: int = Field(ge=1)


class Artifact(_Strict):
    file: str  # relative to the version folder
    format: Literal["onnx", "tensorrt"]
    precision: Precision
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    parity: Parity | None = None
    tensorrt: TensorRTInfo | None = None
    onnx_opset: int | None = Field(None, ge=17)  # an ONNX file's own (bf16: 22+); None: an engine, or not recorded

    @field_validator("file")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts or not parts:
            raise ValueError(f"artifact file {value!r} must be a relative path inside the version folder")
        return value


class Source(_Strict):
    checkpoint: str | None  # file name of the source checkpoint; None for random init
    sha256: str | None
    format: Literal["project", "official", "timm", "torchvision", "random"]
    weights: Literal["model", "ema"] = "model"  # which weights of the checkpoint: the trained or the EMA copy
    # What the weights were trained on ("ImageNet-1K", "digits" for the offline demo, an ImageFolder's name...);
    # optional: manifests written before it existed still load (the service then infers it, service/model_card.py).
    dataset: str | None = None
    # The published weights the checkpoint is, when the export knows them: an official file's name
    # ("convnext_tiny_1k_224_ema"), a timm tag ("convnext_tiny.in12k_ft_in1k") or torchvision's weights
    # ("ConvNeXt_Tiny_Weights.IMAGENET1K_V1"). None for any other checkpoint: `format` only says how its keys are
    # named (the official repository's own fine-tuning writes official names). Optional, as `dataset`.
    pretrained: str | None = None


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: int = Field(ge=1)
    architecture: str  # a `model.list_models()` name: shown (/models, the web page), not needed to serve the ONNX
    activation: Literal["gelu", "relu"]  # model/registry.py ACTIVATIONS
    num_classes: int = Field(ge=1)
    input: InputSpec
    output_name: str = "logits"
    preprocess: Preprocess
    labels: tuple[str, ...]
    source: Source
    onnx_opset: int = Field(ge=17)  # model.onnx's (--opset); each ONNX artifact records its own as well
    artifacts: tuple[Artifact, ...]
    created_at: datetime
    project_version: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(f"model name {value!r} must match {NAME_PATTERN.pattern}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if len(self.labels) != self.num_classes:
            raise ValueError(f"{len(self.labels)} labels for {self.num_classes} classes")
        if len(self.preprocess.mean) != self.input.channels:
            raise ValueError("preprocess mean/std must have one entry per input channel")
        if self.preprocess.crop_px != self.input.height or self.input.height != self.input.width:
            raise ValueError("the input must be square and equal to the preprocess crop")
        files = [a.file for a in self.artifacts]
        if len(set(files)) != len(files):
            raise ValueError("two artifacts name the same file")
        return self

    def find(self, format: str, precision: str) -> Artifact | None:
        """The first artifact of this format and precision (TensorRT ones are filtered by the caller)."""
        return next((a for a in self.artifacts if a.format == format and a.precision == precision), None)


def describe_file(version_dir: Path, relative: str, **fields) -> Artifact:
    """An Artifact for a file already in `version_dir`, with its size and sha256 filled in."""
    path = version_dir / relative
    return Artifact(file=relative, sha256=sha256_file(path), size_bytes=path.stat().st_size, **fields)


def artifact_problem(version_dir: Path, artifact: Artifact) -> str | None:
    """What is wrong with the artifact's file (missing, a link out of the version, another sha256), or None."""
    file = version_dir / artifact.file
    if not file.is_file():
        return f"artifact {artifact.file} is missing"
    if not file.resolve().is_relative_to(version_dir.resolve()):
        return f"artifact {artifact.file} links outside the version's folder; copy the file in instead"
    if sha256_file(file) != artifact.sha256:
        return f"{artifact.file} does not match its sha256 in the manifest"
    return None


def now_utc() -> datetime:
    """A manifest's created_at: to the microsecond, as the watcher tells two exports of a version apart by it."""
    return datetime.now(UTC)


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@dataclass(frozen=True)
class ModelVersion:
    """A validated version on disk: its manifest and its folder."""

    manifest: Manifest
    path: Path

    def artifact_path(self, artifact: Artifact) -> Path:
        return self.path / artifact.file


@dataclass
class StagedVersion:
    """A version being written: put files in `path`, then set `manifest` before the `with` block ends."""

    name: str
    version: int
    path: Path
    manifest: Manifest | None = None


def _publish_new(staging: Path, final: Path) -> None:
    """Rename the staged folder into place unless a version already sits there: another export that staged the same
    number and published first (a published version is never empty, and rename onto a non-empty folder fails)."""
    try:
        os.rename(staging, final)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise RepositoryError(f"{final.parent.name}/{final.name} was published by another export while this one ran; "
                              "export again (it takes the next version number), or pass overwrite=True "
                              "(--overwrite) to replace it") from None


def _lock_error(path: Path, err: OSError) -> RepositoryError:
    """Why a lock file in the repository could not be created or locked, and what to do."""
    if err.errno in NO_FILE_LOCKS:
        return RepositoryError(f"cannot lock {path} ({err}): the repository's volume does not support file locks "
                               "(flock); mount it with locking (NFS: not nolock; NFSv3 needs its lock manager) or "
                               "keep the repository on a local disk")
    return RepositoryError(f"cannot lock {path} ({err}): the repository must be writable by this process, on a "
                           "volume with file locks")


class ModelRepository:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and NAME_PATTERN.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not NAME_PATTERN.match(name) or not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir()
                      if VERSION_PATTERN.fullmatch(p.name) and (p / MANIFEST_FILE).is_file())

    def latest_version(self, name: str) -> int:
        versions = self.versions(name)
        if not versions:
            raise RepositoryError(f"no versions of model {name!r} in {self.root} (have: {self.models() or 'none'})")
        return versions[-1]

    def load(self, name: str, version: int | None = None, verify_files: bool = True,
             verify_engines: bool = True) -> ModelVersion:
        """Read and validate a manifest; with verify_files, every artifact's sha256 is checked too, and each must be a
        file of the version itself (a symlink out of it is refused: what is served is what the repository holds).
        verify_engines=False (the service's way) leaves TensorRT engines to find-or-build, which rebuilds the one it
        would serve when broken (runtime.tensorrt): one GPU's engine stops no replica of the version."""
        if not NAME_PATTERN.match(name):
            raise RepositoryError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
        version = self.latest_version(name) if version is None else version
        path = self.root / name / str(version)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise RepositoryError(f"{manifest_path} does not exist")
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_bytes())
        except ValidationError as err:
            raise RepositoryError(f"{manifest_path} is not a valid manifest:\n{err}") from None
        if manifest.name != name or manifest.version != version:
            raise RepositoryError(f"{manifest_path} describes {manifest.name}/{manifest.version}, not {name}/{version}")
        checked = [a for a in manifest.artifacts if verify_engines or a.format != "tensorrt"] if verify_files else []
        for artifact in checked:
            problem = artifact_problem(path, artifact)
            if problem is not None:
                raise RepositoryError(f"{name}/{version}: {problem}")
        return ModelVersion(manifest, path)

    @contextmanager
    def new_version(self, name: str, version: int | None = None, overwrite: bool = False,
                    lock_timeout_s: float = OVERWRITE_LOCK_TIMEOUT_S) -> Iterator[StagedVersion]:
        """Stage a version in a hidden folder and rename it into place only if the block completes.

        First removes what dead writes to this model left behind (see the module docstring). An overwrite swaps the
        versions under the existing version's lock (ModelRepository.lock), waiting up to `lock_timeout_s` for an
        engine build of that version to end: it never moves a folder aside while an engine is built or added in it.
        """
        if not NAME_PATTERN.match(name):
            raise RepositoryError(f"model name {name!r} must match {NAME_PATTERN.pattern}")
        if version is not None and version < 1:  # before any folder: a write's folders are named by a number >= 1
            raise RepositoryError(f"version {version}: versions are numbered from 1")
        if version is not None and not VERSION_PATTERN.fullmatch(str(version)):  # 10**18 or more: never listed
            raise RepositoryError(f"version {version}: versions have at most 18 digits (a folder with more is no "
                                  "version to the repository's listing, so nothing would load it)")
        folder = self.root / name
        make_folders(folder)
        remove_dead_writes(folder)  # before numbering: it may put back a version a dead overwrite moved aside
        existing = self.versions(name)
        if version is None:  # the next number: overwrite could only replace what a concurrent export just published
            overwrite = False
            version = existing[-1] + 1 if existing else 1
        final = folder / str(version)
        if final.exists() and not overwrite:
            raise RepositoryError(f"{name}/{version} already exists; pass overwrite=True (--overwrite on the command "
                                  "line) to replace it")
        try:
            lock_fd, paths = hold_write_lock(folder, version)  # held until this write's folders are gone
        except OSError as err:
            raise _lock_error(folder, err) from None
        staging = paths.staging
        try:
            staging.mkdir()
            os.chmod(staging, FOLDER_MODE)  # the service may run as another user
            staged = StagedVersion(name, version, staging)
            yield staged
            if staged.manifest is None:
                raise RepositoryError("the staged version was never given a manifest")
            if (staged.manifest.name, staged.manifest.version) != (name, version):
                raise RepositoryError(
                    f"manifest says {staged.manifest.name}/{staged.manifest.version}, staged {name}/{version}")
            share_tree(staging)  # the service may run as another user: the exporter's umask (077) would hide them
            fsync_tree(staging)  # the files first: the manifest below must never name truncated ones after a crash
            _write_json_atomic(staging / MANIFEST_FILE, staged.manifest.model_dump(mode="json"))
            if overwrite and final.exists():
                with self.lock(name, version, lock_timeout_s,
                               waiting=f"{name}/{version} is locked (an engine being built for it?): the overwrite "
                                       f"waits for it, up to {lock_timeout_s:.0f} s"):
                    os.replace(final, paths.old)
                    os.replace(staging, final)  # should this fail, finish_write puts the old version back
            else:
                _publish_new(staging, final)
            try:
                fsync_folder(folder)  # the rename itself
            except OSError as err:  # published already: an error now would say the export failed when it did not
                logger.warning("%s/%s is published, but syncing its folder failed (%s): the rename may not survive a "
                               "power cut", name, version, err)
        finally:
            try:
                finish_write(paths)
            finally:
                os.close(lock_fd)  # releases the lock, after the folders it guards are gone (or on an error)

    @contextmanager
    def lock(self, name: str, version: int, timeout_s: float, waiting: str | None = None) -> Iterator[None]:
        """Hold the version's exclusive lock (flock on `<version>/.lock`), across processes and replicas.

        Processes sharing the repository (replicas on one volume) take it around find-or-build and add_artifact,
        so one builds and the others then find its engine; an overwrite takes it to swap the version folder. The lock
        dies with its process: no stale lock to clear. `waiting` is logged (a warning) when another process holds it.
        """
        path = self.root / name / str(version) / LOCK_FILE
        if not path.parent.is_dir():
            raise RepositoryError(f"{name}/{version} does not exist in {self.root}")
        log_wait = (lambda: logger.warning("%s", waiting)) if waiting is not None else (lambda: None)
        try:
            fd = wait_for_lock(path, timeout_s, LOCK_POLL_S, on_wait=log_wait)
        except LockBusy:
            raise RepositoryError(
                f"waited {timeout_s:.0f} s for the lock {path}: another process (a replica building an engine?) "
                "still holds it; let it finish, then try again") from None
        except OSError as err:  # it cannot be created, or the volume has no locks
            raise _lock_error(path, err) from None
        try:
            yield
        finally:
            os.close(fd)  # releases the lock

    def add_artifact(self, name: str, version: int, source_file: Path, artifact: Artifact,
                     based_on: Manifest | None = None) -> ModelVersion:
        """Add a file (e.g. a TensorRT engine built on first start) to an existing version, atomically.

        Callers that may race (replicas building engines) hold `lock(name, version)` around it. `based_on`: the
        manifest the file was made from; a version whose manifest is no longer that one (replaced meanwhile by an
        overwrite that did not take the lock: an older release's) is refused, not given a file made from another.
        """
        current = self.load(name, version, verify_files=False)
        if based_on is not None and current.manifest != based_on:
            raise RepositoryError(
                f"{name}/{version} was replaced while {artifact.file} was made from it (manifest created "
                f"{based_on.created_at.isoformat()}, now {current.manifest.created_at.isoformat()}: an export "
                "--overwrite?); the file is not added: run again to make it from the version as it is now")
        target = current.path / artifact.file
        make_folders(target.parent)  # engines/, readable by the service whoever adds the first engine
        with open(source_file, "rb") as source:
            replace_atomic(target, lambda file: shutil.copyfileobj(source, file))
        others = tuple(a for a in current.manifest.artifacts if a.file != artifact.file)
        manifest = current.manifest.model_copy(update={"artifacts": others + (artifact,)})
        Manifest.model_validate(manifest.model_dump())  # re-validate the whole manifest
        _write_json_atomic(current.path / MANIFEST_FILE, manifest.model_dump(mode="json"))
        return ModelVersion(manifest, current.path)
