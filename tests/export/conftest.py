"""Export fixtures: one small convnext_atto version (fp32, fp16, int8) built once per session."""
from __future__ import annotations

import pytest

SIZE_PX = 64  # small input keeps the exports fast; the graph is the same as at 224


@pytest.fixture(scope="session")
def photo_folder(real_photos):
    return real_photos[0].parent


@pytest.fixture(scope="session")
def atto_module():
    """The module `exported` exports: the same seeded random weights, layer-scale gammas near 1 included."""
    from export.source import load_source

    return load_source("convnext_atto", None, input_size=SIZE_PX).module


@pytest.fixture(scope="session")
def exported(tmp_path_factory, photo_folder):
    """convnext_atto, random init, exported with every ONNX precision and verified on the real photos."""
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("repository")
    return export_onnx_version(
        root, "atto", "convnext_atto", version=1, precisions=("fp32", "fp16", "int8"), input_size=SIZE_PX,
        verify_images=photo_folder,
    )
