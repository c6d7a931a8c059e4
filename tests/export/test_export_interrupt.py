"""Ctrl-C during `python -m export onnx` says truthfully whether the version was written: after its rename into place
it is published and complete, before it nothing was (an overwritten version is back in place)."""
from __future__ import annotations

import pytest

import runtime.repository
import runtime.repository_writes
from export.__main__ import main
from runtime.repository import ModelRepository

EXPORT = ["onnx", "--model", "convnext_atto", "--num-classes", "3", "--input-size", "32", "--name", "a", "--quiet"]


def _ctrl_c(*args, **kwargs):
    """Stands for the user's Ctrl-C arriving while the export calls the function it replaces."""
    raise KeyboardInterrupt


def _export(root, *extra: str) -> int:
    return main([*EXPORT, "--repository", str(root), *extra])


@pytest.mark.parametrize(("module", "function", "overwrite"),
                         [(runtime.repository, "fsync_folder", False),
                          (runtime.repository_writes, "remove_tree", True)],
                         ids=["syncing-the-rename", "removing-the-overwritten-version"])
def test_ctrl_c_after_the_rename_into_place_says_the_version_was_published(tmp_path, monkeypatch, capsys, module,
                                                                           function, overwrite):
    extra = ("--version", "1", "--overwrite") if overwrite else ()
    if overwrite:
        assert _export(tmp_path) == 0
        replaced = ModelRepository(tmp_path).load("a", 1).manifest
    monkeypatch.setattr(module, function, _ctrl_c)
    assert _export(tmp_path, *extra) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"python -m export: interrupted after the version was published: {tmp_path}/a/1 is "
                                    "complete")
    published = ModelRepository(tmp_path).load("a", 1)  # every file there, every sha256 matching
    assert not overwrite or published.manifest != replaced


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_ctrl_c_before_the_rename_says_no_version_was_written(tmp_path, monkeypatch, capsys, overwrite):
    extra = ("--version", "1", "--overwrite") if overwrite else ()
    if overwrite:
        assert _export(tmp_path) == 0
        kept = ModelRepository(tmp_path).load("a", 1).manifest
    monkeypatch.setattr(runtime.repository, "fsync_tree", _ctrl_c)  # syncing the staged files, before the manifest
    assert _export(tmp_path, *extra) == 130
    monkeypatch.undo()
    assert capsys.readouterr().err.splitlines()[-1] == "python -m export: interrupted; no version was written"
    if overwrite:
        assert ModelRepository(tmp_path).load("a", 1).manifest == kept  # the version it was to replace, back
    else:
        assert ModelRepository(tmp_path).versions("a") == []
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")] == []
