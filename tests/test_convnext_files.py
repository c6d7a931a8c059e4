"""The shared file helpers: sha256 and its sidecar line, atomic replacement that leaves the old file on failure."""
import hashlib
import os
import stat

import pytest

from convnext_files import fsync_tree, replace_atomic, sha256_file, sidecar_path, write_bytes_atomic, write_sidecar


def test_sha256_file_and_its_sidecar_line(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"x" * (3 << 20))  # several read chunks
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == digest
    write_sidecar(path, digest)
    assert sidecar_path(path) == tmp_path / "model.pth.sha256"
    assert sidecar_path(path).read_text() == f"{digest}  model.pth\n"  # what `sha256sum -c` reads


def test_atomic_write_replaces_the_file_readable_by_others_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "manifest.json"
    write_bytes_atomic(path, b"old")
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600: the service may be another user
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "engine.plan"
    write_bytes_atomic(path, b"old")

    def fail_half_way(file):
        file.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomic(path, fail_half_way)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]


def test_fsync_tree_syncs_every_file_and_folder_under_it_and_follows_no_link(tmp_path, monkeypatch):
    """What a version's manifest names is on disk before the manifest is (runtime/repository.py new_version)."""
    version = tmp_path / "1"
    (version / "engines").mkdir(parents=True)
    for name in ("model.onnx", "engines/model.engine"):
        (version / name).write_bytes(b"weights")
    (tmp_path / "outside").write_bytes(b"not ours")
    (version / "link").symlink_to(tmp_path / "outside")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    fsync_tree(version)
    assert sorted(synced) == sorted(str(p) for p in (version / "model.onnx", version / "engines" / "model.engine",
                                                     version / "engines", version))
