"""Checkpoints carry a sha256 sidecar; truncated, tampered and code-carrying files are refused, never unpickled."""
import hashlib
import os
import pickle
import shlex

import pytest
import torch

from convnext_files import sidecar_path
from model.checkpoints import CheckpointError, read_checkpoint
from training.checkpoint import save_atomic


class WritesAMarker:
    """A pickle payload that runs a shell command when unpickled: what a booby-trapped checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture()
def saved(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    save_atomic({"model": {"w": torch.arange(4096.0)}, "epoch": 3}, path)
    return path


def test_save_writes_a_sha256sum_sidecar_that_load_verifies(saved):
    line = sidecar_path(saved).read_text()
    assert line == f"{hashlib.sha256(saved.read_bytes()).hexdigest()}  checkpoint_last.pth\n"
    assert read_checkpoint(saved)["epoch"] == 3


def test_a_tampered_checkpoint_is_refused_naming_the_file(saved):
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data: still a valid zip
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its recorded sha256") as error:
        read_checkpoint(saved)
    assert str(saved) in str(error.value) and "resume from an earlier checkpoint" in str(error.value)


def test_a_swapped_in_code_pickle_is_refused_by_the_hash_before_unpickling(saved, tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": WritesAMarker(marker)}, saved)  # replaced behind the sidecar's back
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(saved)
    assert not marker.exists()


def test_a_code_carrying_checkpoint_without_sidecar_is_refused_and_never_runs(tmp_path):
    marker, proof = tmp_path / "marker", tmp_path / "proof"
    pickle.loads(pickle.dumps(WritesAMarker(proof)))
    assert proof.exists(), "the payload must really run when unpickled, or this test proves nothing"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "hook": WritesAMarker(marker)}, path)
    with pytest.raises(CheckpointError, match="refused unexecuted") as error:
        read_checkpoint(path)
    assert str(path) in str(error.value)
    assert "unsupported GLOBAL posix.system" in str(error.value)  # what it holds (its __reduce__), not torch's advice
    assert "weights_only" not in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("keep_sidecar", [True, False], ids=["with-sidecar", "without-sidecar"])
def test_a_truncated_checkpoint_gives_a_clear_error_not_a_zip_traceback(saved, keep_sidecar):
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    if not keep_sidecar:
        sidecar_path(saved).unlink()
    with pytest.raises(CheckpointError, match="sha256" if keep_sidecar else "truncated") as error:
        read_checkpoint(saved)
    assert str(saved) in str(error.value) and "earlier checkpoint" in str(error.value)


def test_an_empty_file_is_refused_clearly(tmp_path):
    path = tmp_path / "checkpoint_last.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(path)


def test_a_checkpoint_without_sidecar_loads_like_an_official_file(tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(3)}}, path)  # an older run or a downloaded checkpoint
    assert torch.equal(read_checkpoint(path)["model"]["w"], torch.ones(3))


def test_a_garbled_sidecar_is_reported_with_what_to_do(saved):
    sidecar_path(saved).write_text("not-a-hash\n")
    with pytest.raises(CheckpointError, match="delete it"):
        read_checkpoint(saved)


def test_saving_again_replaces_checkpoint_and_sidecar_together(saved):
    save_atomic({"model": {"w": torch.zeros(1)}, "epoch": 4}, saved)
    assert read_checkpoint(saved)["epoch"] == 4
    assert sorted(p.name for p in saved.parent.iterdir()) == ["checkpoint_last.pth", "checkpoint_last.pth.sha256"]


def test_training_cli_refuses_a_tampered_resume_with_a_message_not_a_traceback(saved, tmp_path, capsys):
    from training.__main__ import main

    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 0xFF
    saved.write_bytes(bytes(data))
    assert main(["--preset", "demo", "--output", str(tmp_path / "run"), "--resume", str(saved)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m training: error: ") and "sha256" in err and "Traceback" not in err
