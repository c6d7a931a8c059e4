"""Atomic versions and manifest validation: a failed export leaves nothing; tampering is refused on load."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from convnext_files import sha256_file
from export.onnx import export_onnx_version
from runtime.preprocess import ImageError
from runtime.repository import LOCK_FILE, MANIFEST_FILE, Artifact, ModelRepository, RepositoryError
from runtime.repository_writes import hold_write_lock
from tests.export.conftest import SIZE_PX

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def repository_copy(exported, tmp_path):
    shutil.copytree(exported.path, tmp_path / "atto" / "1")
    return ModelRepository(tmp_path)


def test_failure_mid_export_leaves_no_version_and_no_partial_files(tmp_path, photo_folder):
    broken = tmp_path / "calibration"
    broken.mkdir()
    (broken / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    root = tmp_path / "repo"
    # fp32 is exported and verified inside the staging folder; int8 calibration then fails on the broken image.
    with pytest.raises(ImageError, match=f"^{broken / 'truncated.jpg'}: "):  # which of the folder's files
        export_onnx_version(
            root, "atto", "convnext_atto", precisions=("fp32", "int8"), input_size=SIZE_PX,
            verify_images=photo_folder, calibration_images=broken,
        )
    assert ModelRepository(root).versions("atto") == []
    assert list((root / "atto").iterdir()) == []


def test_existing_version_is_refused_unless_overwrite(exported, photo_folder):
    root = exported.path.parent.parent
    with pytest.raises(RepositoryError, match="already exists"):
        export_onnx_version(root, "atto", "convnext_atto", version=1, input_size=SIZE_PX, verify_images=photo_folder)
    assert ModelRepository(root).load("atto", 1).manifest == exported.manifest


def test_overwrite_replaces_a_version(tmp_path, photo_folder):
    first = export_onnx_version(tmp_path, "relu", "convnext_atto", input_size=SIZE_PX, activation="relu",
                                verify_images=photo_folder)
    second = export_onnx_version(tmp_path, "relu", "convnext_atto", version=first.manifest.version,
                                 overwrite=True, input_size=SIZE_PX, activation="relu", verify_images=photo_folder,
                                 init_seed=1)
    assert first.manifest.activation == second.manifest.activation == "relu"
    assert ModelRepository(tmp_path).versions("relu") == [1]
    assert first.manifest.artifacts[0].sha256 != second.manifest.artifacts[0].sha256  # other random weights
    assert [p.name for p in (tmp_path / "relu").iterdir()] == ["1"]


def test_tampered_artifact_is_refused(repository_copy):
    path = repository_copy.root / "atto" / "1" / "model.int8.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(RepositoryError, match="does not match its sha256"):
        repository_copy.load("atto", 1)


def test_missing_artifact_is_refused(repository_copy):
    (repository_copy.root / "atto" / "1" / "model.fp16.onnx").unlink()
    with pytest.raises(RepositoryError, match="model.fp16.onnx is missing"):
        repository_copy.load("atto", 1)


def test_an_artifact_linking_outside_its_version_and_a_name_outside_the_repository_are_refused(repository_copy):
    version = repository_copy.root / "atto" / "1"
    outside = repository_copy.root.parent / f"outside-{repository_copy.root.name}.onnx"
    (version / "model.fp16.onnx").rename(outside)  # the same bytes: the sha256 alone would pass
    (version / "model.fp16.onnx").symlink_to(outside)
    with pytest.raises(RepositoryError, match="model.fp16.onnx links outside the version's folder"):
        repository_copy.load("atto", 1)
    with pytest.raises(RepositoryError, match="model name '../models/atto' must match"):
        repository_copy.load("../models/atto", 1)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: m.update(num_classes=999),  # labels no longer match the class count
        lambda m: m.update(onnx_opset=13),  # below the LayerNormalization opset
        lambda m: m["artifacts"][0].update(file="../escape.onnx"),
        lambda m: m.update(unexpected_field=1),
        lambda m: m.update(activation="swish"),  # not one the models have (model/registry.py ACTIVATIONS)
    ],
    ids=["labels-count", "old-opset", "path-escape", "extra-field", "activation"],
)
def test_bad_manifest_is_refused(repository_copy, tamper):
    path = repository_copy.root / "atto" / "1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    tamper(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(RepositoryError, match="is not a valid manifest"):
        repository_copy.load("atto", 1)


def test_a_manifests_activations_are_the_models():
    from typing import get_args

    from model.registry import ACTIVATIONS
    from runtime.repository import Manifest

    assert get_args(Manifest.model_fields["activation"].annotation) == ACTIVATIONS


def test_version_is_readable_by_another_user(tmp_path):
    """The service container may run as another user than the exporter, whose umask may be 077: every file of the
    version is 0644 and every folder it creates 0755; a folder that was there keeps the mode its owner gave it."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    shared.chmod(0o750)
    command = [sys.executable, "-m", "export", "onnx", "--model", "convnext_atto", "--num-classes", "3",
               "--input-size", "32", "--precisions", "fp32,fp16", "--name", "atto", "--quiet"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    for root in (tmp_path / "models", shared / "models"):
        subprocess.run([*command, "--repository", str(root)], env=env, umask=0o077, check=True, timeout=300,
                       capture_output=True)
        version = root / "atto" / "1"
        assert sorted(p.name for p in version.iterdir()) == [MANIFEST_FILE, "model.fp16.onnx", "model.onnx"]
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in (root, root / "atto", version, *version.iterdir())}
        assert modes == {p: 0o644 if p.is_file() else 0o755 for p in modes}
    assert stat.S_IMODE(shared.stat().st_mode) == 0o750


def test_a_file_added_to_a_version_under_umask_077_is_readable_by_another_user(repository_copy, tmp_path):
    """`python -m export tensorrt` run by the exporter adds the first engine, and with it the engines/ folder."""
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"an engine's bytes")
    artifact = Artifact(file="engines/model.fp16.engine-like.onnx", format="onnx", precision="fp16",
                        sha256=sha256_file(engine), size_bytes=engine.stat().st_size)
    umask = os.umask(0o077)
    try:
        added = repository_copy.add_artifact("atto", 1, engine, artifact)
    finally:
        os.umask(umask)
    assert stat.S_IMODE((added.path / "engines").stat().st_mode) == 0o755
    assert stat.S_IMODE((added.path / artifact.file).stat().st_mode) == 0o644


def test_lock_files_made_under_umask_077_can_be_locked_by_another_user(repository_copy, tmp_path):
    """A version's .lock (python -m export tensorrt takes it to add an engine) and a write's staging lock: the service
    (another user) opens them read-only to flock, which a 0600 file refuses."""
    umask = os.umask(0o077)
    try:
        with repository_copy.lock("atto", 1, timeout_s=5):
            pass
        fd, paths = hold_write_lock(repository_copy.root / "atto", 7)
        staging_lock_mode = stat.S_IMODE(paths.lock.stat().st_mode)
        os.close(fd)
        paths.lock.unlink()
    finally:
        os.umask(umask)
    assert stat.S_IMODE((repository_copy.root / "atto" / "1" / LOCK_FILE).stat().st_mode) == 0o644
    assert staging_lock_mode == 0o644


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite-without-version"])
def test_an_export_that_finishes_second_never_replaces_the_version_the_first_published(repository_copy, overwrite):
    """Two exports staged the same next version (each takes minutes): the one finishing second is refused instead
    of silently swapping its files in under a version that may already be served; --overwrite without --version
    too (it names no version of its own to replace)."""
    original = repository_copy.load("atto", 1)

    def fill(staged, who: str) -> None:
        for artifact in original.manifest.artifacts:
            shutil.copy(original.artifact_path(artifact), staged.path / artifact.file)
        (staged.path / "who").write_text(who)
        staged.manifest = original.manifest.model_copy(update={"version": staged.version})

    with pytest.raises(RepositoryError, match="published by another export while this one ran"):
        with repository_copy.new_version("atto", overwrite=overwrite) as late:
            fill(late, "late")
            with repository_copy.new_version("atto") as early:
                fill(early, "early")
    assert (late.version, early.version) == (2, 2)
    assert (repository_copy.root / "atto" / "2" / "who").read_text() == "early"
    assert repository_copy.load("atto", 2).manifest.version == 2  # intact, every hash checked
    assert [p.name for p in (repository_copy.root / "atto").iterdir() if p.name.startswith(".")] == []


def test_only_plain_ascii_numbers_are_version_folders(repository_copy):
    """str.isdigit() took "²" (int() refused it: /models answered 500 and `python -m service` failed its start with a
    traceback) and "١" (read as version 1 a second time); "01" was version 1 again too. Such folders are not versions
    now: the listing, the latest version and a load see version 1 alone."""
    version_1 = repository_copy.root / "atto" / "1"
    for name in ("²", "١", "01", "0", "1.0"):
        shutil.copytree(version_1, version_1.parent / name)
    assert repository_copy.versions("atto") == [1]
    assert repository_copy.models() == ["atto"] and repository_copy.latest_version("atto") == 1
    assert repository_copy.load("atto").manifest.version == 1


def test_a_version_number_the_listing_would_not_see_is_refused_before_any_folder(repository_copy):
    """10**18 has 19 digits: its folder would be no version to the listing (VERSION_PATTERN): nothing could load it."""
    before = sorted(p.name for p in (repository_copy.root / "atto").iterdir())
    with pytest.raises(RepositoryError, match="at most 18 digits"):
        with repository_copy.new_version("atto", 10**18):
            pass
    assert sorted(p.name for p in (repository_copy.root / "atto").iterdir()) == before
