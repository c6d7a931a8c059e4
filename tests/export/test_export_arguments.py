"""Numbers an export cannot use are refused before anything is built or staged, through the Python API as on the
command line (tests/cli/test_cli_errors.py): a class count under 1, an input smaller than the model's total stride, a
version number under 1."""
from __future__ import annotations

import pytest

from export.onnx import export_onnx_version
from export.source import ExportError, load_source
from runtime.repository import ModelRepository, RepositoryError


@pytest.mark.parametrize(("model_name", "input_size", "smallest"),
                         [("convnext_atto", 31, 32), ("convnext_atto", 0, 32), ("resnet50", 16, 32),
                          ("convnext_isotropic_small", 15, 16)])
def test_an_input_smaller_than_the_total_stride_is_refused_before_the_model_is_built(model_name, input_size,
                                                                                      smallest, monkeypatch):
    import model

    monkeypatch.setattr(model, "create_model", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ExportError, match=f"--input-size {input_size} is too small for {model_name}, which "
                                          f"downsamples its input {smallest}x: pass --input-size {smallest} or more"):
        load_source(model_name, None, input_size=input_size)


def test_the_smallest_input_the_model_runs_on_exports():
    source = load_source("convnext_atto", None, input_size=32, num_classes=3)
    assert (source.preprocess.crop_px, source.num_classes) == (32, 3)


@pytest.mark.parametrize("num_classes", [0, -1])
def test_a_class_count_under_one_is_refused(num_classes):
    with pytest.raises(ExportError, match=f"--num-classes {num_classes}: a classifier needs at least 1 class"):
        load_source("convnext_atto", None, num_classes=num_classes, input_size=32)


@pytest.mark.parametrize("version", [0, -3])
def test_a_version_number_under_one_is_refused_before_anything_is_staged(tmp_path, version):
    """A negative number once left a `.staging--3-*` folder that no later write recognised as its own to remove."""
    with pytest.raises(RepositoryError, match=f"version {version}: versions are numbered from 1"):
        with ModelRepository(tmp_path).new_version("tiny", version):
            pytest.fail("staged")
    assert not (tmp_path / "tiny").exists()


def test_an_export_to_a_version_under_one_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    import model

    monkeypatch.setattr(model, "create_model", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ExportError, match="version 0: versions are numbered from 1"):
        export_onnx_version(tmp_path, "atto", "convnext_atto", version=0, input_size=32)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_image_folder_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    import model

    monkeypatch.setattr(model, "create_model", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(FileNotFoundError, match=f"--verify-images {tmp_path / 'nosuch'} does not exist"):
        export_onnx_version(tmp_path, "atto", "convnext_atto", input_size=32, verify_images=tmp_path / "nosuch")
    with pytest.raises(FileNotFoundError, match=f"--calibration-images {tmp_path / 'nosuch'} does not exist"):
        export_onnx_version(tmp_path, "atto", "convnext_atto", input_size=32, precisions=("fp32", "int8"),
                            calibration_images=tmp_path / "nosuch")
    assert list(tmp_path.iterdir()) == []


def test_calibration_images_are_read_by_int8_only(tmp_path, caplog):
    """fp16 and bf16 never calibrate: their export neither lists the calibration folder nor fails on it."""
    with caplog.at_level("WARNING", logger="export.onnx"):
        version = export_onnx_version(tmp_path, "atto", "convnext_atto", num_classes=3, input_size=32,
                                      precisions=("fp32", "fp16"), calibration_images=tmp_path / "nosuch",
                                      verify_images=[])
    assert [a.precision for a in version.manifest.artifacts] == ["fp32", "fp16"]
    assert "calibration images are not used: only int8 calibrates, and the precisions fp32,fp16 leave it out" \
        in caplog.text
