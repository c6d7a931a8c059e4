"""`python -m export list` lists every version: one whose manifest cannot be read is shown as invalid, with the
reason, and hides none of the others; the listing then ends in one error line naming it, status 1."""
from __future__ import annotations

from export.__main__ import main
from tests.export.repository_write_worker import NAME, write_version


def test_a_malformed_manifest_is_listed_as_invalid_and_the_other_versions_still_are(tmp_path, capsys):
    write_version(tmp_path, 1, "fp32 weights")
    write_version(tmp_path, 3, "fp32 weights")
    broken = tmp_path / NAME / "2"
    broken.mkdir()
    (broken / "manifest.json").write_text('{"schema_version": 2}')
    other = tmp_path / "aaa" / "1"  # sorted first: the listing goes on past it
    other.mkdir(parents=True)
    (other / "manifest.json").write_text("not json")

    status = main(["list", "--repository", str(tmp_path)])

    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert status == 1
    assert lines[0].startswith("aaa/1: invalid (") and "is not a valid manifest" in lines[0]
    assert [line.split(":")[0] for line in lines if not line.startswith(" ")] == ["aaa/1", f"{NAME}/1", f"{NAME}/2",
                                                                                 f"{NAME}/3"]
    assert f"{NAME}/1: convnext_atto (gelu), 2 classes, 32px" in out and f"{NAME}/3: convnext_atto (gelu)" in out
    assert f"{NAME}/2: invalid (" in out and "schema_version" in out
    artifact_lines = [line for line in lines if line.lstrip().startswith("model.onnx")]
    assert len(artifact_lines) == 2  # the readable versions' artifacts
    # Manifests from before artifacts recorded their opset: model.onnx's is the version's onnx_opset.
    assert all(" opset 18 " in line for line in artifact_lines)
    assert err.splitlines() == [f"python -m export: error: 2 versions in {tmp_path} cannot be read: aaa/1, {NAME}/2 "
                                "(listed above with the reason); fix or remove their manifest.json, or export again"]


def test_a_repository_whose_manifests_all_read_lists_with_status_0(tmp_path, capsys):
    write_version(tmp_path, 1, "fp32 weights")
    assert main(["list", "--repository", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{NAME}/1: convnext_atto") and err == ""
