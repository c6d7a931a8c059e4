"""Every accepted format and pixel mode, each a real file made with PIL from a real photo, over HTTP and in decode."""
from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from runtime.preprocess import ImageError, decode_image, image_errors, opened_image, preprocess, scaled_to_8_bits
from runtime.repository import Preprocess
from runtime.transparency import composited_on_white


@pytest.fixture(scope="module")
def photo(real_photos) -> Image.Image:
    """The cat photo, downsized so each encoded variant stays small."""
    image = Image.open(next(p for p in real_photos if p.name == "chelsea.png")).convert("RGB")
    return image.resize((160, 120), Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def variants(photo: Image.Image) -> dict[str, tuple[bytes, np.ndarray | None]]:
    """name -> (file bytes, the RGB pixels decoding must give, or None where the codec is lossy)."""
    rgb = np.asarray(photo)
    gray = photo.convert("L")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    rgba = photo.convert("RGBA")
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :40] = 0  # left strip fully transparent -> white
    rgba.putalpha(Image.fromarray(alpha))
    rgba_expected = rgb.copy()
    rgba_expected[:, :40] = 255
    sixteen = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # 16-bit grayscale, I;16
    rotated = photo.transpose(Image.Transpose.ROTATE_270)  # stored sideways; EXIF 8 says turn it back
    exif = Image.Exif()
    exif[0x0112] = 8  # orientation 8: the viewer turns it 90 degrees counter-clockwise
    frames = [photo.quantize(64), photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).quantize(64)]
    return {
        "jpeg": (encode(photo, "JPEG", quality=95), None),
        "png": (encode(photo, "PNG"), rgb),
        "webp_lossless": (encode(photo, "WEBP", lossless=True), rgb),
        "webp_lossy": (encode(photo, "WEBP", quality=90), None),
        "bmp": (encode(photo, "BMP"), rgb),
        "tiff": (encode(photo, "TIFF"), rgb),
        "gif_first_frame": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
                            np.asarray(frames[0].convert("RGB"))),
        "grayscale": (encode(gray, "PNG"), np.repeat(np.asarray(gray)[..., None], 3, axis=2)),
        "palette": (encode(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "rgba_on_white": (encode(rgba, "PNG"), rgba_expected),
        "cmyk_jpeg": (encode(photo.convert("CMYK"), "JPEG", quality=95), None),
        "png_16bit": (encode(sixteen, "PNG"), np.repeat(np.asarray(gray)[..., None], 3, axis=2)),
        "exif_orientation": (encode(rotated, "PNG", exif=exif), rgb),
    }


NAMES = ["jpeg", "png", "webp_lossless", "webp_lossy", "bmp", "tiff", "gif_first_frame", "grayscale", "palette",
         "rgba_on_white", "cmyk_jpeg", "png_16bit", "exif_orientation"]


@pytest.mark.parametrize("name", NAMES)
def test_decode_gives_upright_rgb_pixels(photo, name):
    data, expected = variants(photo)[name]
    image = decode_image(data, max_pixels=10**7)
    assert image.mode == "RGB"
    assert image.size == (160, 120)
    pixels = np.asarray(image).astype(int)
    if expected is not None:
        np.testing.assert_array_equal(pixels, expected)
    else:  # lossy codecs: close to the photo on average
        assert np.abs(pixels - np.asarray(photo).astype(int)).mean() < 8


def test_every_format_classifies_over_http(service_url, photo):
    for name, (data, _) in variants(photo).items():
        response = httpx.post(f"{service_url}/classify", content=data, headers={"content-type": "image/*"})
        assert response.status_code == 200, (name, response.text)
        assert len(response.json()["results"][0]["top_k"]) == 5


def test_a_transparent_colour_is_composited_on_white_as_alpha_is():
    """A dark square on a transparent background, its transparency kept as a colour key (a PNG's tRNS in RGB, grey
    and 16-bit grey pictures; a grey GIF, which PIL opens as L with a transparent index): served as the RGBA PNG of
    the same picture is, the background white; the key's own colour (black) was served."""
    square = np.zeros((48, 64), np.uint8)
    square[12:36, 16:48] = 90
    alpha = np.where(square > 0, 255, 0).astype(np.uint8)
    grey = Image.fromarray(square)
    reference = np.asarray(decode_image(encode(Image.merge("LA", (grey, Image.fromarray(alpha))), "PNG"), 10**7))
    assert (reference[0, 0] == 255).all() and (reference[20, 20] == 90).all()
    files = {"RGB tRNS PNG": encode(grey.convert("RGB"), "PNG", transparency=(0, 0, 0)),
             "grey tRNS PNG": encode(grey, "PNG", transparency=0),
             "16-bit grey tRNS PNG": encode(Image.fromarray(square.astype(np.uint16) * 257), "PNG", transparency=0),
             "grey GIF": encode(grey, "GIF", transparency=0, optimize=False)}
    for name, data in files.items():
        opened = Image.open(io.BytesIO(data))
        assert opened.mode in ("RGB", "L", "I;16") and "transparency" in opened.info, name
        np.testing.assert_array_equal(np.asarray(decode_image(data, 10**7)), reference, err_msg=name)


def png_with_key(size: tuple[int, int], depth: int, colour: int, rows: list[bytes], key: bytes) -> bytes:
    """A PNG written chunk by chunk (PIL saves no 16-bit RGB) with a tRNS colour key: colour 0 grey, 2 RGB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", *size, depth, colour, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + row for row in rows))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tRNS", key) + chunk(b"IDAT", pixels)
            + chunk(b"IEND", b""))


def test_a_transparent_colour_is_matched_at_the_depth_pillow_reads_the_pixels():
    """Pillow scales 2- and 4-bit grey pixels to 8 bits (x85, x17) but keeps their tRNS key raw: the key's pixels were
    served as their grey, and others whitened. It cuts 16-bit RGB pixels to their high bytes and compared the key's
    low byte: a 16-bit RGB PNG is served opaque, as training's convert("RGB") reads it (its shadows were whitened).
    The decode estimate counts the composite exactly where to_rgb makes one."""
    grey = {4: [0, 5, 15, 5, 9, 0], 2: [0, 1, 3, 1, 2, 0]}  # raw samples; the key is 5 (4-bit) or 1 (2-bit)
    for bits, samples in grey.items():
        key, scale = samples[1], 255 // (2**bits - 1)
        row = np.packbits(np.unpackbits(np.asarray(samples, np.uint8)[:, None], axis=1)[:, 8 - bits:]).tobytes()
        data = png_with_key((len(samples), 1), bits, 0, [row], struct.pack(">H", key))
        expected = [255 if v == key else v * scale for v in samples]
        assert np.asarray(decode_image(data, 10**7))[0, :, 0].tolist() == expected, bits
        assert composited_on_white(opened_image(data, 10**7, None).image), bits
    # 16-bit RGB, key black: a shadow (high bytes 0) and the key itself stay dark; 0x0140 matched 0x40xx pixels.
    for key, pixels in (((0, 0, 0), [(0, 0, 0), (200, 100, 50), (32768,) * 3]),
                        ((0x0140,) * 3, [(0x0140,) * 3, (0x4040,) * 3, (0x4041, 0x4000, 0x40FF)])):
        row = b"".join(struct.pack(">HHH", *pixel) for pixel in pixels)
        data = png_with_key((3, 1), 16, 2, [row], struct.pack(">HHH", *key))
        assert Image.open(io.BytesIO(data)).info["transparency"] == key
        training = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(decode_image(data, 10**7)), training)
        assert not composited_on_white(opened_image(data, 10**7, None).image)


def test_16_and_32_bit_pictures_scale_like_the_float_formula_in_bounded_memory():
    """Every 16-bit value rounds as round(v * 255 / 65535) did in float64, and a small file declaring a large 16-bit
    picture decodes with a few bytes of scratch per pixel (float64 took 24: ~860 MB for this 84 KB PNG)."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    expected = np.clip(values.astype(np.float64) * (255.0 / 65535) + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(scaled_to_8_bits(values, 65535), expected)
    floats = np.linspace(-10, 300, 1000, dtype=np.float32).reshape(10, 100)
    np.testing.assert_array_equal(scaled_to_8_bits(floats, 255), np.clip(floats + 0.5, 0, 255).astype(np.uint8))

    sixteen = Image.fromarray(np.tile(np.arange(6000, dtype=np.uint16) * 10, (6000, 1)))  # 36 MP, I;16
    data = encode(sixteen, "PNG")
    tracemalloc.start()
    try:
        image = decode_image(data, max_pixels=10**8)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.size == (6000, 6000) and len(data) < 100_000
    assert peak_bytes < 6 * 6000 * 6000, f"{peak_bytes / 1e6:.0f} MB traced"


def grey_tiff(samples: bytes, size: tuple[int, int], bits: int, sample_format: int, alpha: int | None = None) -> bytes:
    """A one-strip, uncompressed, little-endian grey TIFF of packed samples: what PIL cannot write (12-bit, signed
    16-bit, premultiplied alpha) but cameras and scientific software do. alpha: the ExtraSamples value of a second
    sample a pixel (1: premultiplied, 2: straight)."""
    width, height = size
    tags = [(256, width), (257, height), (258, bits), (259, 1), (262, 1), (273, 0), (277, 1 if alpha is None else 2),
            (278, height), (279, len(samples)), *([] if alpha is None else [(338, alpha)]), (339, sample_format)]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    directory = b"".join(struct.pack("<HHII", tag, 4 if tag in (273, 279) else 3, 1,
                                     data_offset if tag == 273 else value) for tag, value in tags)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + directory + bytes(4) + samples


def grey_levels(data: bytes) -> np.ndarray:
    rgb = np.asarray(decode_image(data, max_pixels=10**7)).astype(int)
    assert (rgb == rgb[..., :1]).all()
    return rgb[..., 0]


def test_deep_pictures_scale_by_the_depth_they_declare_never_by_their_pixels():
    """White is the largest value the samples' declared bits hold (float: 1.0). A guess from the pixels' maximum made
    a 32-bit picture of 0..255 white and one of 1..256 near black, and a float picture of 0..1 black."""
    ramp = np.arange(256, dtype=np.int64).reshape(16, 16)

    def expected(values: np.ndarray, white: float) -> np.ndarray:
        return np.clip(np.floor(values * 255.0 / white + 0.5), 0, 255).astype(int)

    full = (ramp * (2**31 - 1)) // 255  # signed 32-bit (PIL's I, written as SampleFormat 2)
    np.testing.assert_array_equal(grey_levels(encode(Image.fromarray(full.astype(np.int32), "I"), "TIFF")),
                                  expected(full, 2**31 - 1))
    small = grey_levels(encode(Image.fromarray(ramp.astype(np.int32), "I"), "TIFF"))
    one_brighter = ramp.copy()
    one_brighter[0, 0] = 256
    brighter = grey_levels(encode(Image.fromarray(one_brighter.astype(np.int32), "I"), "TIFF"))
    np.testing.assert_array_equal(small[1:], brighter[1:])  # one pixel over 255 changes no other pixel
    np.testing.assert_array_equal(small, np.zeros_like(small))  # 0..255 of 2**31 - 1: black, as declared

    floats = (ramp / 255).astype(np.float32)
    np.testing.assert_array_equal(grey_levels(encode(Image.fromarray(floats, "F"), "TIFF")), ramp)

    twelve = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    pairs = twelve.reshape(-1, 2).astype(np.uint32)
    packed = np.stack([pairs[:, 0] >> 4, ((pairs[:, 0] & 15) << 4) | (pairs[:, 1] >> 8), pairs[:, 1] & 255], axis=1)
    data = grey_tiff(packed.astype(np.uint8).tobytes(), (64, 64), 12, 1)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    np.testing.assert_array_equal(grey_levels(data), expected(twelve, 4095))

    signed = np.linspace(-1000, 32767, 256).astype(np.int16).reshape(16, 16)
    data = grey_tiff(signed.tobytes(), (16, 16), 16, 2)
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(grey_levels(data), expected(signed.astype(np.int64), 32767))


def tiff_listing_bits(bits: tuple[int, ...], samples: bytes, size: tuple[int, int]) -> bytes:
    """A one-sample grey TIFF whose BitsPerSample lists `bits` (LONGs, out of line): PIL decodes with the first."""
    width, height = size
    inline = [(256, 3, width), (257, 3, height), (259, 3, 1), (262, 3, 1), (277, 3, 1), (278, 3, height),
              (279, 4, len(samples))]
    count = len(inline) + 2
    bits_offset = 8 + 2 + 12 * count + 4
    out_of_line = struct.pack(f"<{len(bits)}I", *bits) if len(bits) > 1 else b""  # one LONG sits in its entry
    entries = sorted([*inline, (258, 4, bits[0] if len(bits) == 1 else bits_offset),
                      (273, 4, bits_offset + len(out_of_line))])
    directory = b"".join(struct.pack("<HHII", tag, kind, len(bits) if tag == 258 else 1, value)
                         for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", count) + directory + bytes(4) + out_of_line + samples


@pytest.mark.parametrize("extra", [255, 65535, 2**32 - 1])
def test_a_bits_per_sample_tag_listing_more_values_than_samples_scales_by_the_decoded_depth(extra):
    """Only the first value is the depth PIL decodes with: the largest listed one made a 16-bit picture black, raised
    OverflowError (a 500), or, at 2**32 - 1, computed 2**(2**32) for half a minute with the GIL held."""
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    expected = grey_levels(tiff_listing_bits((16,), ramp.tobytes(), (16, 16)))
    np.testing.assert_array_equal(expected, np.arange(256).reshape(16, 16))
    np.testing.assert_array_equal(grey_levels(tiff_listing_bits((16, extra), ramp.tobytes(), (16, 16))), expected)


def test_a_progressive_jpeg_whose_sampling_factors_are_zero_is_a_corrupt_image(photo):
    """The decode-memory estimate divided by the largest sampling factor: ZeroDivisionError, a 500."""
    data = bytearray(encode(photo, "JPEG", progressive=True))
    frame = data.index(b"\xff\xc2") + 2  # SOF2: length, precision, height, width, components, then 3 bytes each
    for component in range(data[frame + 7]):
        data[frame + 8 + 3 * component + 1] = 0  # its sampling factors, horizontal and vertical
    spec = Preprocess(resize_px=73, crop_px=64, crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ImageError) as refused:
        preprocess(bytes(data), spec, 10**7, "exact")
    assert refused.value.code == "corrupt_image"


def test_premultiplied_grey_alpha_is_composited_on_white(photo, service_url):
    """A grey TIFF with associated alpha opens as PIL's La, which Pillow converts to RGBA only through LA: the
    conversion raised ValueError outside the decode's error mapping, a 500. Premultiplied grey g over white is
    g + 255 - alpha (within the rounding of un-premultiplying)."""
    grey = np.asarray(photo.convert("L"), dtype=np.int64)
    alpha = np.tile(np.linspace(0, 255, grey.shape[1]).astype(np.int64), (grey.shape[0], 1))
    premultiplied = (grey * alpha + 127) // 255
    samples = np.stack([premultiplied, alpha], axis=2).astype(np.uint8).tobytes()
    data = grey_tiff(samples, photo.size, 8, 1, alpha=1)
    assert Image.open(io.BytesIO(data)).mode == "La"
    rgb = np.asarray(decode_image(data, max_pixels=10**7)).astype(int)
    assert np.abs(rgb - (premultiplied + 255 - alpha)[..., None]).max() <= 2
    response = httpx.post(f"{service_url}/classify", content=data, headers={"content-type": "image/tiff"})
    assert response.status_code == 200, response.text


def test_an_unsigned_32_bit_picture_keeps_its_upper_half():
    """PIL holds an unsigned 32-bit TIFF as signed int32 (mode I): values of 2**31 and up came out negative, black."""
    ramp = (np.arange(256, dtype=np.uint64) * (2**32 - 1) // 255).astype(np.uint32).reshape(16, 16)
    data = grey_tiff(ramp.tobytes(), (16, 16), 32, 1)
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(grey_levels(data), np.arange(256).reshape(16, 16))


def test_only_pillows_own_type_and_arithmetic_errors_are_a_corrupt_image():
    """A hostile header makes Pillow raise TypeError or OverflowError (400 corrupt_image); the same raised by the
    service's own code is a bug, a 500 that is logged, not a client's bad image."""
    with pytest.raises(ImageError) as mapped, image_errors():
        Image.new("L", (4, 4)).resize("a size")  # TypeError inside Pillow
    assert mapped.value.code == "corrupt_image"
    with pytest.raises(ZeroDivisionError), image_errors():
        _ = 1 // 0  # noqa: B018 - ours
