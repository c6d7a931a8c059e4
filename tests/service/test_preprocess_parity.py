"""The service's NumPy transform equals training's torchvision eval_transform on real photos, and the same top-1."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from model.registry import DataConfig
from runtime.preprocess import decode_image, eval_transform
from runtime.repository import ModelRepository, Preprocess
from training.transforms import eval_transform as torchvision_eval_transform


def preprocess_spec(data: DataConfig) -> Preprocess:
    return Preprocess(resize_px=data.resize_px, crop_px=data.input_size, crop_pct=data.crop_pct,
                      interpolation=data.interpolation, mean=data.mean, std=data.std, crop_mode=data.crop_mode)


@pytest.mark.parametrize("data", [DataConfig(), DataConfig(input_size=64), DataConfig(interpolation="bilinear"),
                                  DataConfig(input_size=288, crop_pct=1.0),
                                  DataConfig(input_size=384, crop_pct=1.0, crop_mode="squash"),
                                  DataConfig(input_size=64, crop_pct=0.875, crop_mode="squash")],
                         ids=["224", "64", "bilinear", "288", "squash-384", "squash-64-crop"])
def test_service_tensor_equals_torchvision_on_real_photos(real_photos, data):
    reference = torchvision_eval_transform(data)
    for photo in real_photos:
        ours = eval_transform(decode_image(photo.read_bytes(), 10**8), preprocess_spec(data))
        theirs = reference(Image.open(photo).convert("RGB")).numpy()
        assert ours.shape == theirs.shape == (3, data.input_size, data.input_size)
        np.testing.assert_array_equal(ours, theirs)  # bit for bit, not merely close


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


def test_squash_keeps_the_whole_picture_where_center_crops_it(real_photos):
    """At crop_pct 1.0 squash warps the photo to a square (official 384 evaluation); center crops its long side."""
    photo = next(p for p in real_photos if len(set(Image.open(p).size)) == 2)  # a non-square photo
    picture = decode_image(photo.read_bytes(), 10**8)
    squash = DataConfig(input_size=64, crop_pct=1.0, crop_mode="squash")
    squashed = eval_transform(picture, preprocess_spec(squash))
    centered = eval_transform(picture, preprocess_spec(DataConfig(input_size=64, crop_pct=1.0)))
    assert squashed.shape == centered.shape == (3, 64, 64)
    assert np.abs(squashed - centered).max() > 0.5
    warped = picture.resize((64, 64), Image.Resampling.BICUBIC)  # the whole picture, aspect not kept
    expected = (np.asarray(warped, np.float32) / 255 - np.float32(squash.mean)) / np.float32(squash.std)
    np.testing.assert_allclose(squashed, expected.transpose(2, 0, 1), atol=1e-6, rtol=0)


def test_a_manifest_preprocess_without_crop_mode_means_center():
    fields = {"resize_px": 256, "crop_px": 224, "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocess.model_validate(fields).crop_mode == "center"



@pytest.mark.parametrize("mean, std", [(DataConfig().mean, DataConfig().std), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))],
                         ids=["imagenet", "half"])
def test_normalization_by_table_is_bit_identical_to_the_arithmetic(mean, std):
    """All 256 values in every channel, at the crop size (no resize): the lookup gives ToTensor + Normalize's bits."""
    pixels = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, axis=-1)
    pixels[..., 1] = pixels[..., 1].T  # each channel its own layout
    spec = preprocess_spec(DataConfig(input_size=16, crop_pct=1.0, mean=mean, std=std))
    tensor = eval_transform(Image.fromarray(pixels), spec)
    expected = (pixels.astype(np.float32) / np.float32(255.0) - np.float32(mean)) / np.float32(std)
    assert tensor.dtype == np.float32 and tensor.flags.c_contiguous
    np.testing.assert_array_equal(tensor, expected.transpose(2, 0, 1))
