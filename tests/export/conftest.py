"""Export fixtures: one small convnext_atto version (fp32, fp16, int8) built once per session."""
from __future__ import annotations

import pytest

SIZE_PX = 64  # small input keeps the exports fast; the graph is the same as at 224


@pytest.fixture(scope="session")
def photo_folder(real_photos):
    return real_photos[0].parent


@pytest.fixture(scope="session")
def atto_module():
    import torch

    import model

    torch.manual_seed(0)  # the same seed as `exported`, so both hold the same random weights
    return model.create_model("convnext_atto").eval()


@pytest.fixture(scope="session")
def exported(tmp_path_factory, photo_folder):
    """convnext_atto, random init, exported with every ONNX precision and verified on the real photos."""
    import torch

    from export.onnx import export_onnx_version

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("repository")
    return export_onnx_version(
        root, "atto", "convnext_atto", version=1, precisions=("fp32", "fp16", "int8"), input_size=SIZE_PX,
        verify_images=photo_folder,
    )
