"""Fast decoding (decode_mode "fast"): large JPEGs decode at 1/2-1/8 scale (short side >= twice the resize target),
then the same resize + crop (its geometry the declared size's, whatever the size and EXIF orientation), within a
bounded pixel difference of exact decoding on real photos; everything else decodes exactly as before."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from runtime.decode import fast_decode_min_short_side, reduced_picture
from runtime.preprocess import decode_image, eval_transform, preprocess
from runtime.repository import ModelRepository, Preprocess

# ConvNeXt-T's evaluation transform: 224 crop of a 256 short side, ImageNet mean/std.
SPEC = Preprocess(resize_px=256, crop_px=224, crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225))
MAX_PIXELS = 10**8
FAST_MIN_SHORT_PX = fast_decode_min_short_side(SPEC.resize_px)  # 512
# Bounds on the 0..255 pixels after resize + crop; on these photos the mean is <= 0.6 (<= 3.2 with only 1x headroom).
MEAN_ABS_BOUND, P99_ABS_BOUND = 1.0, 6.0
# Sizes that are not a multiple of the DCT scale: the reduced picture's last row and column hold a partial block.
ODD_SIZES = [(4001, 3001), (4003, 3003), (3000, 2049), (2049, 1537)]


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}) | options)
    return buffer.getvalue()


def pixels(tensor: np.ndarray) -> np.ndarray:
    """A normalized (3, H, W) tensor back to 0..255 pixels, so bounds read in grey levels."""
    mean = np.asarray(SPEC.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(SPEC.std, dtype=np.float32)[:, None, None]
    return (tensor * std + mean) * 255.0


def assert_close_to_exact(data: bytes, spec: Preprocess = SPEC) -> None:
    exact, fast = preprocess(data, spec, MAX_PIXELS, "exact"), preprocess(data, spec, MAX_PIXELS, "fast")
    assert fast.shape == exact.shape == (3, spec.crop_px, spec.crop_px) and fast.dtype == np.float32
    difference = np.abs(pixels(fast) - pixels(exact))
    assert difference.mean() < MEAN_ABS_BOUND
    assert np.percentile(difference, 99) < P99_ABS_BOUND


@pytest.fixture(scope="module")
def photos(real_photos) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in real_photos]


@pytest.mark.parametrize("size, decoded", [((4000, 3000), (1000, 750)), ((2048, 1536), (1024, 768)),
                                           ((1536, 2048), (768, 1024)), ((1100, 1024), (550, 512)),
                                           ((8000, 4096), (1000, 512))])
def test_fast_decode_scales_in_the_dct_and_keeps_the_short_side_at_or_above_twice_the_target(photos, size, decoded):
    data = encode(photos[0].resize(size, Image.Resampling.BILINEAR))
    assert decode_image(data, MAX_PIXELS).size == size
    fast = decode_image(data, MAX_PIXELS, FAST_MIN_SHORT_PX)
    assert fast.size == decoded and fast.mode == "RGB"
    assert min(fast.size) >= FAST_MIN_SHORT_PX == 2 * SPEC.resize_px


def turned_jpeg(upright: Image.Image, orientation: int) -> bytes:
    """A JPEG stored as a camera in `orientation` writes it: turning it by its EXIF gives `upright` back."""
    stored = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_270}.get(orientation)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(upright if stored is None else upright.transpose(stored), exif=exif)


@pytest.mark.parametrize("size", [(4000, 3000), (1920, 1440), (1024, 768), (700, 520), *ODD_SIZES])
def test_fast_tensor_is_within_bounds_of_exact_on_every_real_photo(photos, size):
    """Odd sizes too: the reduced picture's partial last block is not counted as a whole source block (the crop's
    region was shifted and stretched by up to half a block: mean 2.5 and p99 20 grey levels at 4001x3001)."""
    for photo in photos:
        assert_close_to_exact(encode(photo.resize(size, Image.Resampling.BICUBIC)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_of_an_odd_sized_jpeg_is_within_bounds_of_exact(photos, orientation):
    """A turn that runs an axis backwards moves the partial block to its start: the geometry follows it."""
    for photo in photos[:2]:
        data = turned_jpeg(photo.resize((2049, 1537), Image.Resampling.BICUBIC), orientation)
        assert decode_image(data, MAX_PIXELS, FAST_MIN_SHORT_PX).size == (1025, 769)  # upright, at 1/2
        assert_close_to_exact(data)


@pytest.mark.parametrize("crop_pct, orientation", [(1.0, 1), (0.875, 1), (1.0, 7)])
def test_squash_is_within_bounds_of_exact_on_odd_sizes(photos, crop_pct, orientation):
    """Squash resizes the whole source: the part of the reduced picture that holds it, not its partial last block."""
    spec = Preprocess(resize_px=int(224 / crop_pct), crop_px=224, crop_pct=crop_pct, mean=SPEC.mean, std=SPEC.std,
                      crop_mode="squash")
    for photo in photos:
        assert_close_to_exact(turned_jpeg(photo.resize((4001, 3001), Image.Resampling.BICUBIC), orientation), spec)


def test_nearest_is_within_its_own_wider_bounds_of_exact(photos):
    """A nearest pick from a DCT-scaled picture reads a block's average where exact reads one pixel (README: mean 1.7,
    worst photo 3.6, p99 28 grey levels on 12-MP photos); the partial block is accounted for as for bicubic."""
    spec = SPEC.model_copy(update={"interpolation": "nearest"})
    for photo in photos:
        data = encode(photo.resize((2049, 1537), Image.Resampling.BICUBIC))
        difference = np.abs(pixels(preprocess(data, spec, MAX_PIXELS, "fast")) -
                            pixels(preprocess(data, spec, MAX_PIXELS, "exact")))
        assert difference.mean() < 5.0 and np.percentile(difference, 99) < 40.0


def test_nearest_takes_exact_modes_two_steps_on_the_reduced_picture(photos):
    """Nearest picks one source pixel per output pixel: resampling only the crop's region moves its coordinates by a
    rounding, enough to pick a neighbour (up to 180 grey levels apart); fast mode keeps exact's resize-then-crop."""
    spec = Preprocess(resize_px=256, crop_px=224, crop_pct=0.875, interpolation="nearest", mean=SPEC.mean,
                      std=SPEC.std)
    data = encode(photos[0].resize((4000, 3000), Image.Resampling.BICUBIC))
    reduced = decode_image(data, MAX_PIXELS, FAST_MIN_SHORT_PX)
    assert reduced.size == (1000, 750)  # aligned: the whole picture is the source
    np.testing.assert_array_equal(preprocess(data, spec, MAX_PIXELS, "fast"), eval_transform(reduced, spec))


def test_exif_orientation_is_applied_after_a_reduced_decode(photos):
    upright = photos[0].resize((1600, 1200), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; the viewer turns it 90 degrees clockwise
    data = encode(upright.transpose(Image.Transpose.ROTATE_90), exif=exif)
    assert decode_image(data, MAX_PIXELS, FAST_MIN_SHORT_PX).size == (800, 600)  # upright, scaled by 2
    assert_close_to_exact(data)
    exact_upright = preprocess(encode(upright), SPEC, MAX_PIXELS, "exact")
    fast = preprocess(data, SPEC, MAX_PIXELS, "fast")
    assert np.abs(pixels(fast) - pixels(exact_upright)).mean() < MEAN_ABS_BOUND


@pytest.mark.parametrize("kind", ["cmyk", "progressive", "grayscale", "subsampling_444"])
def test_cmyk_progressive_and_grayscale_jpegs_decode_reduced_and_close_to_exact(photos, kind):
    big = photos[1].resize((2048, 1536), Image.Resampling.BICUBIC)
    data = {"cmyk": lambda: encode(big.convert("CMYK")), "progressive": lambda: encode(big, progressive=True),
            "grayscale": lambda: encode(big.convert("L")),
            "subsampling_444": lambda: encode(big, subsampling=0)}[kind]()
    fast = decode_image(data, MAX_PIXELS, FAST_MIN_SHORT_PX)
    assert fast.size == (1024, 768) and fast.mode == "RGB"
    assert_close_to_exact(data)


@pytest.mark.parametrize("size", [(500, 375), (1365, 1023), (1024, 768)])
def test_jpegs_under_twice_the_fast_target_decode_exactly(photos, size):
    data = encode(photos[2].resize(size, Image.Resampling.BICUBIC))
    assert np.array_equal(preprocess(data, SPEC, MAX_PIXELS, "fast"), preprocess(data, SPEC, MAX_PIXELS, "exact"))


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("WEBP", {"quality": 90}), ("WEBP", {"lossless": True})])
def test_png_and_webp_are_unaffected(photos, fmt, options):
    data = encode(photos[3].resize((1600, 1200), Image.Resampling.BICUBIC), fmt, **options)
    assert np.array_equal(preprocess(data, SPEC, MAX_PIXELS, "fast"), preprocess(data, SPEC, MAX_PIXELS, "exact"))


def test_pixel_limit_is_checked_on_the_declared_size_not_the_reduced_one(photos):
    from runtime.preprocess import ImageError

    data = encode(photos[0].resize((2000, 1500), Image.Resampling.BILINEAR))
    with pytest.raises(ImageError) as err:
        decode_image(data, 2_999_999, FAST_MIN_SHORT_PX)
    assert err.value.code == "too_many_pixels"


def test_fast_is_the_exact_path_for_small_model_inputs_on_real_files(real_photos):
    """The real photo files as shipped (300-640 px), for the 64-px test model (fast decodes at 1/2 at most)."""
    spec = Preprocess(resize_px=73, crop_px=64, crop_pct=0.875, interpolation="bicubic", mean=SPEC.mean, std=SPEC.std)
    for photo in real_photos:
        data = photo.read_bytes()
        fast = decode_image(data, MAX_PIXELS, fast_decode_min_short_side(spec.resize_px))
        assert min(fast.size) >= 2 * spec.resize_px
        assert preprocess(data, spec, MAX_PIXELS, "fast").shape == (3, 64, 64)


def test_the_service_decodes_fast_when_its_setting_says_so(launch, model_repository, photos):
    """decode_mode and fast_decode_headroom reach the decode pool: each answer is its own mode's tensor's, measurably
    not the others'."""
    import httpx

    from runtime.engines.onnxruntime import OnnxRuntimeEngine

    version = ModelRepository(model_repository).load("atto")
    spec = version.manifest.preprocess
    engine = OnnxRuntimeEngine(version.artifact_path(version.manifest.find("onnx", "fp32")), (3, 64, 64))
    engine.load()
    # Short side 1000 for a 73-px resize: headroom 2 decodes at 1/4 (250), headroom 1 at 1/8 (125).
    data = encode(photos[0].resize((1333, 1000), Image.Resampling.BICUBIC))

    def probabilities(mode: str, headroom: float) -> np.ndarray:
        logits = engine.run(preprocess(data, spec, MAX_PIXELS, mode, headroom)[None])[0]
        return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()

    modes = [("fast", 2.0), ("fast", 1.0), ("exact", 2.0)]
    expected = {mode: probabilities(*mode) for mode in modes}
    for one, other in ((modes[0], modes[1]), (modes[0], modes[2]), (modes[1], modes[2])):
        assert np.abs(expected[one] - expected[other]).max() > 1e-5  # the modes are told apart by this check
    for mode, headroom in modes:
        with launch(model_repository, decode_mode=mode, fast_decode_headroom=headroom) as url:
            answer = httpx.post(f"{url}/classify?top_k=1", content=data, headers={"content-type": "image/jpeg"},
                                timeout=30)
            assert answer.status_code == 200, answer.text
            (best,) = answer.json()["results"][0]["top_k"]
        assert best["index"] == int(np.argmax(expected[mode, headroom]))
        assert best["probability"] == pytest.approx(float(expected[mode, headroom].max()), abs=1e-6)


@pytest.mark.parametrize("headroom, decoded", [(2.0, (1000, 750)), (1.5, (1000, 750)), (1.0, (500, 375))])
def test_the_headroom_chooses_the_dct_scale_and_the_decode_never_lands_under_the_resize_target(photos, headroom,
                                                                                               decoded):
    """Headroom 1 is the least decoding work (a 12-MP photo at 1/8); its short side still >= the resize target."""
    data = encode(photos[0].resize((4000, 3000), Image.Resampling.BILINEAR))
    min_short_side = fast_decode_min_short_side(SPEC.resize_px, headroom)
    assert min_short_side == math.ceil(headroom * SPEC.resize_px)
    assert decode_image(data, MAX_PIXELS, min_short_side).size == decoded
    tensor = preprocess(data, SPEC, MAX_PIXELS, "fast", headroom)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == np.float32


@pytest.mark.parametrize("headroom", [0.5, 0.99, 8.5])
def test_a_headroom_out_of_range_is_refused_by_the_decoder_and_the_settings(headroom):
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValueError, match="outside 1..8"):
        fast_decode_min_short_side(SPEC.resize_px, headroom)
    with pytest.raises(ValidationError, match="fast_decode_headroom"):
        Settings(fast_decode_headroom=headroom)


@pytest.mark.parametrize("size", [(1000, 750), (750, 1000), (1100, 513), (2000, 2000)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_the_crop_region_resize_is_resize_then_crop_within_one_grey_level(photos, size, interpolation):
    """Fast mode resamples only the crop's region of a DCT-reduced picture: the same source coordinates per output
    pixel as resizing the whole picture and cropping, only the filter weights' rounding differs."""
    from runtime.preprocess import center_crop, resize_crop_region, resize_short_side

    spec = SPEC.model_copy(update={"interpolation": interpolation})
    for photo in photos:
        picture = photo.resize(size, Image.Resampling.BICUBIC)
        two_steps = np.asarray(center_crop(resize_short_side(picture, spec.resize_px, interpolation), spec.crop_px))
        region = np.asarray(resize_crop_region(picture, reduced_picture(picture.size, 1, 1), spec))
        assert region.shape == two_steps.shape == (224, 224, 3)
        assert np.abs(region.astype(int) - two_steps).max() <= 1


def test_a_reduced_jpeg_takes_the_crop_region_path_and_others_do_not(photos, monkeypatch):
    import runtime.preprocess as preprocess_module

    calls = []
    real = preprocess_module.resize_crop_region
    monkeypatch.setattr(preprocess_module, "resize_crop_region", lambda *a: calls.append(a[0].size) or real(*a))
    preprocess(encode(photos[0].resize((4000, 3000), Image.Resampling.BICUBIC)), SPEC, MAX_PIXELS, "fast")
    assert calls == [(1000, 750)]  # decoded at 1/4, then only the crop's region resampled
    preprocess(encode(photos[0].resize((1024, 768), Image.Resampling.BICUBIC)), SPEC, MAX_PIXELS, "fast")
    preprocess(encode(photos[0].resize((4000, 3000), Image.Resampling.BICUBIC), "PNG"), SPEC, MAX_PIXELS, "fast")
    preprocess(encode(photos[0].resize((4000, 3000), Image.Resampling.BICUBIC)), SPEC, MAX_PIXELS, "exact")
    assert calls == [(1000, 750)]  # not reduced, not a JPEG, or exact mode: training's two steps
