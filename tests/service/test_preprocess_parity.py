"""The service's preprocessing, through its entry point (runtime.preprocess.preprocess, exact mode), equals training's
evaluation transform (torchvision, on ImageFolder's PIL open + convert("RGB")) bit for bit on 8-bit opaque images:
real photos, and files of every accepted format and 8-bit mode at sizes from 1x1 to 33x2000 under each kind of
preprocess spec; and the same top-1 through the engine."""
from __future__ import annotations

import functools
import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from model.registry import DataConfig
from runtime.preprocess import decode_image, eval_transform, preprocess
from runtime.repository import ModelRepository, Preprocess
from training.transforms import eval_transform as torchvision_eval_transform

MAX_PIXELS = 10**8
# The spec kinds: the ImageNet default, small ones per interpolation, squash with and without a crop, another crop_pct.
SPECS = {
    "224": DataConfig(),
    "32-bicubic": DataConfig(input_size=32),
    "32-bilinear": DataConfig(input_size=32, interpolation="bilinear"),
    "32-nearest": DataConfig(input_size=32, interpolation="nearest"),
    "squash": DataConfig(input_size=32, crop_pct=1.0, crop_mode="squash"),
    "squash-crop": DataConfig(input_size=32, crop_pct=0.875, crop_mode="squash"),
    "pct95": DataConfig(input_size=40, crop_pct=0.95),
}
# Every accepted format with the 8-bit modes it stores (WebP stores RGB; GIF a palette or grey).
FORMAT_MODES = [("PNG", "RGB"), ("PNG", "L"), ("PNG", "1"), ("PNG", "P"), ("JPEG", "RGB"), ("JPEG", "L"),
                ("JPEG", "CMYK"), ("BMP", "RGB"), ("BMP", "L"), ("BMP", "1"), ("BMP", "P"), ("GIF", "P"), ("GIF", "L"),
                ("TIFF", "RGB"), ("TIFF", "L"), ("TIFF", "1"), ("TIFF", "P"), ("TIFF", "CMYK"), ("WEBP", "RGB")]


def preprocess_spec(data: DataConfig) -> Preprocess:
    return Preprocess(resize_px=data.resize_px, crop_px=data.input_size, crop_pct=data.crop_pct,
                      interpolation=data.interpolation, mean=data.mean, std=data.std, crop_mode=data.crop_mode)


def data_config(spec: Preprocess) -> DataConfig:
    """A manifest's preprocess as training's DataConfig: every field, so the reference is the manifest's transform."""
    data = DataConfig(input_size=spec.crop_px, crop_pct=spec.crop_pct, interpolation=spec.interpolation,
                      mean=spec.mean, std=spec.std, crop_mode=spec.crop_mode)
    assert data.resize_px == spec.resize_px
    return data


def sizes_for(data: DataConfig) -> list[tuple[int, int]]:
    """1x1, smaller than the crop, short side == the resize (both ways), and for the small specs slivers, just over
    the resize, a downscale and an extreme aspect (at 224 a 33x2000 picture would resize to 256 x 15515: seconds)."""
    crop, resize = data.input_size, data.resize_px
    sizes = [(1, 1), (crop - 1, crop + 1), (resize, resize + 9), (resize + 9, resize)]
    if resize > 100:
        return sizes
    return sizes + [(1, 7), (7, 1), (resize + 1, resize + 1), (2 * resize + 3, 3 * resize - 5), (33, 2000), (2000, 33)]


@functools.cache
def noise_file(fmt: str, mode: str, size: tuple[int, int], **options) -> bytes:
    """A file of random pixels (no smoothing: every resampling weight shows) in this format and mode."""
    width, height = size
    rng = np.random.default_rng(width * 7919 + height)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    picture = rgb.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else rgb.convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The reference's tensors are small: on two busy cores torch's two threads made each ToTensor + Normalize of a
    224 crop take ~40 ms instead of ~0.5 (the 224 matrix 4.6 s instead of 1.4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_as_training(data: bytes, config: DataConfig, what: str) -> None:
    ours = preprocess(data, preprocess_spec(config), MAX_PIXELS, "exact")
    theirs = torchvision_eval_transform(config)(Image.open(io.BytesIO(data)).convert("RGB")).numpy()
    assert ours.shape == theirs.shape == (3, config.input_size, config.input_size), what
    np.testing.assert_array_equal(ours, theirs, err_msg=what)  # bit for bit, not merely close


@pytest.mark.parametrize("name", list(SPECS))
def test_every_format_mode_and_size_is_training_bit_for_bit(name):
    config = SPECS[name]
    for size in sizes_for(config):
        for fmt, mode in FORMAT_MODES:
            assert_as_training(noise_file(fmt, mode, size), config, f"{name} {fmt} {mode} {size}")


def opaque_files(size: tuple[int, int]) -> dict[str, bytes]:
    """Pictures with an alpha channel or a transparent palette entry that no pixel uses: opaque all the same."""
    rng = np.random.default_rng(size[0])
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert("RGBA")
    palette = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=200)  # indices 200.. unused

    def encode(picture: Image.Image, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        return buffer.getvalue()

    return {"RGBA PNG": encode(rgba, "PNG"), "LA PNG": encode(rgba.convert("LA"), "PNG"),
            "RGBA TIFF": encode(rgba, "TIFF"), "RGBA WebP": encode(rgba, "WEBP", lossless=True),
            "P tRNS PNG": encode(palette, "PNG", transparency=250), "P tRNS GIF": encode(palette, "GIF",
                                                                                       transparency=250)}


@pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")  # training's convert("RGB")
@pytest.mark.parametrize("name", list(SPECS))
def test_opaque_alpha_and_unused_transparency_are_training_bit_for_bit(name):
    config = SPECS[name]
    for size in [(1, 1), (config.input_size - 1, config.input_size + 3), (config.resize_px + 5, 2 * config.resize_px)]:
        for kind, data in opaque_files(size).items():
            assert Image.open(io.BytesIO(data)).mode in ("RGBA", "LA", "P", "RGB"), kind
            assert_as_training(data, config, f"{name} {kind} {size}")


@pytest.mark.parametrize("data", [DataConfig(), DataConfig(input_size=64), DataConfig(interpolation="bilinear"),
                                  DataConfig(input_size=288, crop_pct=1.0),
                                  DataConfig(input_size=384, crop_pct=1.0, crop_mode="squash"),
                                  DataConfig(input_size=64, crop_pct=0.875, crop_mode="squash")],
                         ids=["224", "64", "bilinear", "288", "squash-384", "squash-64-crop"])
def test_service_tensor_equals_torchvision_on_real_photos(real_photos, data):
    for photo in real_photos:
        assert_as_training(photo.read_bytes(), data, photo.name)


def test_same_top1_through_the_engine(model_repository, real_photos):
    """The manifest's whole preprocess (interpolation, mean/std, crop_mode too) is the reference's."""
    version = ModelRepository(model_repository).load("atto")
    spec = version.manifest.preprocess
    reference = torchvision_eval_transform(data_config(spec))
    session = ort.InferenceSession(str(version.path / version.manifest.artifacts[0].file))
    name = session.get_inputs()[0].name
    for photo in real_photos:
        ours = preprocess(photo.read_bytes(), spec, MAX_PIXELS, "exact")
        theirs = reference(Image.open(photo).convert("RGB")).numpy()
        np.testing.assert_array_equal(ours, theirs)
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
