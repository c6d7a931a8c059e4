"""Fuzzing the decode path: mutated real images either become a finite float32 tensor or raise ImageError."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from pydantic import ValidationError

from runtime.gif_frames import gif_first_frame
from runtime.metadata_limits import MAX_METADATA_BYTES
from runtime.preprocess import PILLOW_MAX_PIXELS, ImageError, image_errors, opened_image, preprocess
from runtime.repository import Preprocess
from service.settings import Settings

SPEC = Preprocess(resize_px=73, crop_px=64, crop_pct=0.875, interpolation="bicubic",
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
MAX_PIXELS = 4_000_000
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@pytest.fixture(scope="module")
def seeds(real_photos) -> list[bytes]:
    """Each real photo re-encoded at 64x48 in every accepted format: small, valid starting points to mutate."""
    out = []
    for photo in real_photos:
        small = Image.open(photo).convert("RGB").resize((64, 48))
        for fmt in FORMATS:
            buffer = io.BytesIO()
            small.save(buffer, format=fmt)
            out.append(buffer.getvalue())
    return out


@st.composite
def mutations(draw, seed_count: int):
    """(seed index, list of byte edits): flips, inserts, deletes, truncation and header splices."""
    index = draw(st.integers(0, seed_count - 1))
    edits = draw(st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]),
                                    st.floats(0, 1), st.binary(min_size=1, max_size=8)), min_size=1, max_size=4))
    return index, edits


def mutate(data: bytes, edits) -> bytes:
    for kind, where, payload in edits:
        at = int(where * len(data)) if kind != "splice" else int(where * min(len(data), 64))
        if kind == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ payload[0]]) + data[at + 1:]
        elif kind == "insert":
            data = data[:at] + payload + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + len(payload):]
        elif kind == "truncate":
            data = data[:at]
        elif kind == "splice":  # overwrite header fields (sizes, offsets, flags) near the start
            data = data[:at] + payload + data[at + len(payload):]
    return data


def check(data: bytes) -> None:
    try:
        tensor = preprocess(data, SPEC, MAX_PIXELS)
    except ImageError as err:
        assert err.code in {"empty_body", "not_an_image", "unsupported_format", "too_many_pixels", "corrupt_image"}
        return
    assert tensor.dtype == np.float32
    assert tensor.shape == (3, SPEC.crop_px, SPEC.crop_px)
    assert np.isfinite(tensor).all()


def test_mutated_real_images_decode_or_raise_image_error(seeds):
    # No per-example deadline: a decode is ms, and one stalled by the machine (CPU steal, a collection) is no finding.
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(mutations(len(seeds)))
    def run(case):
        index, edits = case
        check(mutate(seeds[index], edits))

    run()


def test_unmutated_seeds_all_decode(seeds):
    for data in seeds:
        assert preprocess(data, SPEC, MAX_PIXELS).shape == (3, 64, 64)


def png_header_claiming(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = b"IDAT" + zlib.compress(b"\0" * 64)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat)))


def gif_header_claiming(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00\x3b")


@pytest.mark.parametrize("header", [png_header_claiming, gif_header_claiming], ids=["png", "gif"])
@pytest.mark.parametrize("width, height", [(5000, 5000), (65535, 65535)], ids=["25-mp", "4-gp"])
def test_declared_huge_image_is_refused_before_allocation(header, width, height, monkeypatch):
    """A header claiming more than max_pixels is refused from the header alone: no decoder ever allocates its pixels.

    5000x5000 (25 MP, 75 MB RGB) is over max_pixels (4 MP) but under Pillow's own decompression-bomb limit (89 MP,
    which preprocess also answers with too_many_pixels): only the max_pixels check refuses it; without it, Pillow
    would allocate the picture and find its data truncated (corrupt_image). 65535x65535 is over both.
    """
    def no_pixels(image, *args, **kwargs):
        raise AssertionError(f"{image.format} {image.size[0]}x{image.size[1]}: pixel memory allocated by load()")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_pixels)  # where every file plugin allocates and decodes
    with pytest.raises(ImageError) as caught:
        preprocess(header(width, height), SPEC, MAX_PIXELS)
    assert caught.value.code == "too_many_pixels"


def jpeg_declaring(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header declares width x height: opened_image reads only the header."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_max_pixels_goes_up_to_pillows_own_limit_and_no_further():
    """Pillow refuses more than 89,478,485 pixels itself (in the service): a larger max_pixels was capped silently, a
    108-MP photo answered with Pillow's limit; it is refused when the settings are read."""
    assert PILLOW_MAX_PIXELS == Image.MAX_IMAGE_PIXELS
    assert Settings(max_pixels=PILLOW_MAX_PIXELS).max_pixels == PILLOW_MAX_PIXELS
    with pytest.raises(ValidationError, match="max_pixels"):
        Settings(max_pixels=PILLOW_MAX_PIXELS + 1)
    assert opened_image(jpeg_declaring(9000, 9000), PILLOW_MAX_PIXELS, None).declared == (9000, 9000)
    with pytest.raises(ImageError) as refused, pytest.warns(Image.DecompressionBombWarning):  # Pillow only warns
        opened_image(jpeg_declaring(12000, 9000), PILLOW_MAX_PIXELS, None)
    assert refused.value.code == "too_many_pixels"


@pytest.mark.parametrize("frame", [(12000, 12000), (3000, 3000)])
def test_a_gif_frame_over_max_pixels_is_refused_before_pillow_fills_it(monkeypatch, frame):
    """A 37-byte GIF whose first frame covers 12000x12000 has Pillow fill that area (140 MB) while it opens the file,
    before max_pixels is checked (Pillow only warns below twice its limit; 3000x3000 is under it): the frame's extent
    is read from the bytes first, whatever the process's warning filters (none is set, or needed: a filter set by the
    service was gone after the first test of a module, pytest restoring the filters around each)."""
    disposal = b"\x21\xf9\x04" + bytes([2 << 2]) + bytes(4)  # graphic control: restore to background
    data = gif_header_claiming(*frame).replace(b"\x2c", disposal + b"\x2c", 1).replace(
        struct.pack("<HH", *frame), struct.pack("<HH", 1, 1), 1)  # a 1x1 screen, the frame beyond it

    fill = Image.core.fill

    def small_fill(mode, size, *color):
        if size[0] * size[1] > MAX_PIXELS:
            raise AssertionError(f"Pillow filled {size[0]}x{size[1]} pixels while reading the header")
        return fill(mode, size, *color)

    monkeypatch.setattr(Image.core, "fill", small_fill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a warning lets Pillow go on
        with pytest.raises(ImageError) as refused:
            preprocess(data, SPEC, MAX_PIXELS)
    assert refused.value.code == "too_many_pixels"


def graphic_control(disposal: int, transparent: bool) -> bytes:
    return b"\x21\xf9\x04" + bytes([disposal << 2 | transparent]) + bytes(4) + b"\x00"


def test_the_gif_walk_finds_the_first_frame_pillow_finds():
    """Extensions before the first frame (graphic control, comments, NETSCAPE loop, an unknown application block,
    an empty one) are stepped over as Pillow steps over them: the size, the area Pillow fills while opening the file
    and the transparent index match Pillow's after it opens it."""
    frames = [Image.new("L", (40, 30), shade) for shade in (0, 90, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], loop=0, duration=100, comment=b"c" * 600,
                   transparency=0, disposal=2)
    animated = buffer.getvalue()
    beyond = gif_header_claiming(50, 40).replace(struct.pack("<HH", 50, 40), struct.pack("<HH", 20, 10), 1)
    extensions = (b"\x21\xff\x0bXMP DataXMP\x03abc\x00"  # an application block that is not NETSCAPE2.0
                  b"\x21\xfe\x00"  # an empty comment
                  b"\x21\x01\x00\x02xy\x00")  # a plain-text extension whose first sub-block is empty
    offset = beyond.replace(struct.pack("<HHHH", 0, 0, 50, 40), struct.pack("<HHHH", 5, 6, 30, 20), 1)
    # Graphic controls: a disposal restoring the background fills the frame; restoring the previous frame fills it
    # only with a transparent index; a later disposal of 0 keeps an earlier one, a transparent index stays.
    controls = [graphic_control(2, False), graphic_control(3, False), graphic_control(3, True),
                graphic_control(7, True), graphic_control(2, False) + graphic_control(0, False),
                graphic_control(0, True) + graphic_control(3, False), b"\x21\xf9\x00\x00" + graphic_control(2, True)]
    for data in (animated, beyond, beyond.replace(b"\x2c", extensions + b"\x2c", 1),
                 *(gif.replace(b"\x2c", control + b"\x2c", 1) for control in controls for gif in (beyond, offset))):
        image = Image.open(io.BytesIO(data))
        filled = image.dispose.size[0] * image.dispose.size[1] if image.dispose is not None else 0
        assert gif_first_frame(data) == (image.size, filled, "transparency" in image.info)


def gif_with_comment(sub_blocks: int, size: int) -> bytes:
    """A 10 x 10 GIF whose comment, before its first frame, is `sub_blocks` sub-blocks of `size` bytes each."""
    buffer = io.BytesIO()
    Image.new("L", (10, 10), 90).save(buffer, "GIF")
    comment = b"\x21\xfe" + (bytes([size]) + b"c" * size) * sub_blocks + b"\x00"
    return buffer.getvalue().replace(b"\x2c", comment + b"\x2c", 1)


def test_a_gif_whose_comment_passes_the_metadata_limit_is_refused_before_pillow_reads_it():
    """Pillow keeps each comment sub-block as its own bytes object while it opens the file, outside the decode budget:
    a 20 MB comment of one-byte sub-blocks held ~840 MB. The walk stops past MAX_METADATA_BYTES and refuses it."""
    flood = gif_with_comment(sub_blocks=MAX_METADATA_BYTES // 2 + 1, size=1)  # just over the limit: 512 KiB + 2 bytes
    with pytest.raises(ImageError) as refused:
        opened_image(flood, 40_000_000, None)
    assert refused.value.code == "corrupt_image" and "extension blocks" in refused.value.message
    fine = gif_with_comment(sub_blocks=400, size=255)  # 100 KB of comment: read as before
    assert opened_image(fine, 40_000_000, None).image.info["comment"] == b"c" * 255 * 400
    assert gif_first_frame(flood).size == (10, 10)  # uncapped, the walk still finds what Pillow finds


def test_decoding_leaves_the_process_warning_filters_alone():
    """A catch_warnings around each decode swapped the process's filters (not thread-safe): one decode thread's exit
    dropped the error filter under another's decode, or left it on for good."""
    before = list(warnings.filters)
    with image_errors():
        assert warnings.filters == before
