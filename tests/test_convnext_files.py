"""The shared file helpers: sha256 and its sidecar line, atomic replacement that leaves the old file on failure."""
import hashlib
import stat

import pytest

from convnext_files import replace_atomic, sha256_file, sidecar_path, write_bytes_atomic, write_sidecar


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
