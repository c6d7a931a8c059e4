"""/models parses each manifest once while its file is unchanged, and shows a changed or removed one at once."""
from __future__ import annotations

import json
import shutil

import httpx

from runtime.repository import MANIFEST_FILE, Manifest


def test_models_parses_each_manifest_once_while_unchanged_and_a_changed_one_anew(own_repository, launch,
                                                                                 monkeypatch):
    """/models is open and lists every version: every call parsed every manifest (six 21,841-class ones: 12.3 ms of
    CPU a call). Kept now while the file's inode, mtime and size are unchanged; an edit
    (atomically replaced, as export writes) shows at the next call, and a removed version is gone from it."""
    parses = []
    parse = Manifest.model_validate_json.__func__  # type: ignore[attr-defined]  # the classmethod's function

    def counted(cls, data, *args, **kwargs):
        parses.append(len(data))
        return parse(cls, data, *args, **kwargs)

    with launch(own_repository, warmup_runs=0) as url:
        monkeypatch.setattr(Manifest, "model_validate_json", classmethod(counted))
        first = httpx.get(f"{url}/models").json()["models"]
        assert [(m["name"], m["version"]) for m in first] == [("atto", 1), ("atto", 2)] and len(parses) == 2
        assert httpx.get(f"{url}/models").json()["models"] == first and len(parses) == 2  # nothing parsed again

        path = own_repository / "atto" / "2" / MANIFEST_FILE
        edited = json.loads(path.read_text()) | {"architecture": "convnext_atto_edited"}
        path.with_suffix(".tmp").write_text(json.dumps(edited))
        path.with_suffix(".tmp").replace(path)  # another file: as runtime/repository_writes replaces one
        second = httpx.get(f"{url}/models").json()["models"]
        assert [m["architecture"] for m in second] == ["convnext_atto", "convnext_atto_edited"] and len(parses) == 3

        shutil.rmtree(own_repository / "atto" / "2")
        assert [(m["name"], m["version"]) for m in httpx.get(f"{url}/models").json()["models"]] == [("atto", 1)]
        assert len(parses) == 3
