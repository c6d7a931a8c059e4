"""The service's NumPy transform equals training's torchvision eval_transform on real photos, and the same top-1."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from export.repository import ModelRepository, Preprocess
from model.registry import DataConfig
from service.preprocess import decode_image, eval_transform
from training.transforms import eval_transform as torchvision_eval_transform


def preprocess_spec(data: DataConfig) -> Preprocess:
    return Preprocess(resize_px=data.resize_px, crop_px=data.input_size, crop_pct=data.crop_pct,
                      interpolation=data.interpolation, mean=data.mean, std=data.std)


@pytest.mark.parametrize("data", [DataConfig(), DataConfig(input_size=64), DataConfig(interpolation="bilinear"),
                                  DataConfig(input_size=288, crop_pct=1.0)], ids=["224", "64", "bilinear", "288"])
def test_service_tensor_equals_torchvision_on_real_photos(real_photos, data):
    reference = torchvision_eval_transform(data)
    for photo in real_photos:
        ours = eval_transform(decode_image(photo.read_bytes(), 10**8), preprocess_spec(data))
        theirs = reference(Image.open(photo).convert("RGB")).numpy()
        assert ours.shape == theirs.shape == (3, data.input_size, data.input_size)
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_same_top1_through_the_engine(model_repository, real_photos):
    version = ModelRepository(model_repository).load("atto")
    spec = version.manifest.preprocess
    reference = torchvision_eval_transform(DataConfig(input_size=spec.crop_px, crop_pct=spec.crop_pct))
    session = ort.InferenceSession(str(version.path / version.manifest.artifacts[0].file))
    name = session.get_inputs()[0].name
    for photo in real_photos:
        ours = eval_transform(decode_image(photo.read_bytes(), 10**8), spec)
        theirs = reference(Image.open(photo).convert("RGB")).numpy()
        assert session.run(None, {name: ours[None]})[0].argmax() == session.run(None, {name: theirs[None]})[0].argmax()
