"""EXIF orientation in the decode: each of the eight turns a picture upright as PIL's exif_transpose does; a block that
does not parse counts as upright (the picture decodes, bit for bit what training's loader gives), and one that PIL
reads but cannot write back still turns the picture; the decode budget's estimate follows the same reading."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from model.registry import DataConfig
from runtime.decode_memory import decode_peak_bytes, may_be_rotated, resized_size
from runtime.preprocess import decode_image, opened_image, preprocess
from runtime.repository import Preprocess
from tests.service.test_formats import encode
from training.transforms import eval_transform as torchvision_eval_transform

DATA = DataConfig(input_size=32)
SPEC = Preprocess(resize_px=DATA.resize_px, crop_px=DATA.input_size, crop_pct=DATA.crop_pct, mean=DATA.mean,
                  std=DATA.std)
MAX_PIXELS = 10**8
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"/></x:xmpmeta>'
# EXIF blocks that are not a TIFF structure: PIL's EXIF reader raises on each (SyntaxError: "not a TIFF file").
UNREADABLE = {"zeros": b"Exif\x00\x00" + bytes(10), "junk": b"Exif\x00\x00junk-not-tiff", "xmp_in_exif": b"Exif\x00\x00"
              + XMP}


@pytest.fixture(scope="module")
def picture(real_photos) -> Image.Image:
    """The cat photo, small and not square (a turn shows)."""
    photo = Image.open(next(p for p in real_photos if p.name == "chelsea.png")).convert("RGB")
    return photo.resize((60, 40), Image.Resampling.BICUBIC)


def training_tensor(data: bytes) -> np.ndarray:
    """What training's ImageFolder loader + evaluation transform make of the file (EXIF ignored)."""
    return torchvision_eval_transform(DATA)(Image.open(io.BytesIO(data)).convert("RGB")).numpy()


@pytest.mark.parametrize("block", list(UNREADABLE))
@pytest.mark.parametrize("fmt, options", [("JPEG", {"quality": 90}), ("WEBP", {"quality": 90}),
                                          ("WEBP", {"lossless": True}), ("PNG", {})],
                         ids=["jpeg", "webp", "webp_lossless", "png"])
def test_an_exif_block_that_does_not_parse_counts_as_upright(picture, fmt, options, block):
    data = encode(picture, fmt, exif=UNREADABLE[block], **options)
    opened = Image.open(io.BytesIO(data))
    opened.load()  # a PNG's eXIf chunk may follow its pixels
    with pytest.raises(SyntaxError):
        Image.Exif().load(opened.info["exif"])  # the block is indeed unreadable to PIL
    np.testing.assert_array_equal(preprocess(data, SPEC, MAX_PIXELS, "exact"), training_tensor(data))
    assert preprocess(data, SPEC, MAX_PIXELS, "fast").shape == (3, 32, 32)
    assert decode_image(data, MAX_PIXELS).size == picture.size  # as stored


def test_an_xmp_segment_beside_the_pixels_changes_nothing(picture):
    data = encode(picture, "JPEG", quality=90, xmp=XMP)
    assert Image.open(io.BytesIO(data)).info["xmp"] == XMP
    np.testing.assert_array_equal(preprocess(data, SPEC, MAX_PIXELS, "exact"), training_tensor(data))


def test_the_decode_budget_reads_an_unreadable_block_as_the_decode_does(picture):
    """The estimate of a JPEG whose EXIF does not parse is that of the same JPEG without EXIF: the decode leaves it as
    stored (no second copy for a turn), so reserving for one would only make other images wait."""
    big = picture.resize((1200, 800))
    with_block, without = encode(big, "JPEG", exif=UNREADABLE["zeros"]), encode(big, "JPEG")
    turned = Image.Exif()
    turned[0x0112] = 6

    def estimate(data: bytes) -> int:
        image, declared, _ = opened_image(data, MAX_PIXELS, None)
        return decode_peak_bytes(image, declared, resized_size(image.size, SPEC, False), SPEC.interpolation)

    assert not may_be_rotated(Image.open(io.BytesIO(with_block)))
    assert estimate(with_block) == estimate(without) < estimate(encode(big, "JPEG", exif=turned))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_orientation_turns_the_picture_as_exif_transpose_does(picture, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(picture, "PNG", exif=exif)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(decode_image(data, MAX_PIXELS)), np.asarray(expected))


def test_a_block_pil_reads_but_cannot_write_back_still_turns_the_picture(picture):
    """YPosition (a RATIONAL) written as text: PIL reads the block, orientation 6 included, but exif_transpose's
    rewrite of it without the orientation raises TypeError (which no image-error mapping caught: a 500)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Maker"
    block = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x1f\x00\x02")  # Make (0x010F) -> YPosition (0x011F)
    data = encode(picture, "PNG", exif=block)
    with pytest.raises(TypeError):
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    upright = picture.transpose(Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(np.asarray(decode_image(data, MAX_PIXELS)), np.asarray(upright))
    np.testing.assert_array_equal(preprocess(data, SPEC, MAX_PIXELS, "exact"),
                                  torchvision_eval_transform(DATA)(upright).numpy())


@pytest.mark.parametrize("stored", ["rational", "float"])
def test_an_orientation_stored_as_a_rational_or_a_float_turns_the_picture_as_exif_transpose_does(picture, stored):
    """exif_transpose looks the value up by equality (6/1 and 6.0 are 6); an isinstance(int) check left them
    stored."""
    # One IFD entry, Orientation: RATIONAL 6/1 (type 5, its 8 bytes after the IFD) or FLOAT 6.0 (type 11, inline).
    entry = struct.pack("<HHII", 0x0112, 5, 1, 26) if stored == "rational" else \
        struct.pack("<HHI", 0x0112, 11, 1) + struct.pack("<f", 6.0)
    value = struct.pack("<II", 6, 1) if stored == "rational" else b""
    block = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 1) + entry + bytes(4) + value
    data = encode(picture, "JPEG", quality=90, exif=block)
    read = Image.open(io.BytesIO(data)).getexif()[0x0112]
    assert not isinstance(read, int) and read == 6
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert expected.size == (40, 60)
    np.testing.assert_array_equal(np.asarray(decode_image(data, MAX_PIXELS)), np.asarray(expected))
