"""How many bytes turning an image into the model's input holds at its peak, known from the header before a pixel is
decoded: what the service's decode budget (decode_memory_mb) reserves for it, and what refuses a picture whose resize
alone would be a memory bomb (a 2.6 KB PNG of 4 x 100000 pixels resizes to 256 x 6400000: 6.5 GB).

PIL keeps a picture of 1 band in 1 byte a pixel (2 for 16-bit, 4 for 32-bit and float) and one of 2-4 bands in 4.
The two peaks (tests/service/test_decode_memory.py measures them in a fresh process per mode):
- decoding: the decoded picture, and, for any mode but RGB, the RGB picture it becomes (runtime.preprocess.to_rgb:
  alpha is composited a strip at a time; 16/32-bit pictures pass through an 8-bit copy and a NumPy view of theirs);
  an EXIF rotation holds the picture twice for a moment.
- resizing: the RGB picture, PIL's horizontal pass (output width x the rows it reads), the output and the filter
  weights.
The decoder's own buffers come on top while it decodes (decoder_bytes), and for a GIF the area of its first frame that
Pillow fills while it opens the file (runtime.gif_frames): gif_peak_bytes, known from the bytes, before Pillow opens it.
"""
from __future__ import annotations

import math

from PIL import Image

from runtime.gif_frames import GifFirstFrame
from runtime.orientation import EXIF_ORIENTATION, TURNS, UNREADABLE_EXIF
from runtime.repository import Preprocess
from runtime.transparency import ALPHA_STRIP_PIXELS, alpha_strip_rows, composited_on_white

RGB_BYTES = 4  # bytes a pixel of an RGB picture (PIL pads it to 4)
ONE_BYTE_MODES = frozenset({"1", "L", "P"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# to_rgb's scratch for pictures it scales to 8 bits: NumPy's copy of the pixels (2 or 4 bytes), the 8-bit array and
# the L picture made from it (1 + 1).
SCALING_SCRATCH = {**dict.fromkeys(SIXTEEN_BIT_MODES, 2 + 2), "I": 4 + 2, "F": 4 + 2}
# A composited strip is held ~5 times at once (the crop, its RGBA conversion, the white strip, their composite,
# its RGB conversion).
ALPHA_STRIP_COPIES = 5
# libwebp's canvas and previous frame, and the decoded frame's bytes, all kept with the picture (measured: 12 bytes).
WEBP_DECODER_BYTES_PER_PIXEL = 12
FILTER_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0, "nearest": 0.0}  # PIL's; nearest resizes without weight tables
TIFF_BITS_PER_SAMPLE, TIFF_COMPRESSION, TIFF_SAMPLES_PER_PIXEL, TIFF_ROWS_PER_STRIP = 258, 259, 277, 278
TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 322, 323


def stored_bytes(mode: str) -> int:
    """Bytes a pixel of a PIL picture in this mode."""
    if mode in ONE_BYTE_MODES:
        return 1
    return 2 if mode in SIXTEEN_BIT_MODES else 4


def common_peak_bytes(max_pixels: int) -> int:
    """The most a picture of max_pixels in a common mode holds (a PNG with alpha, a turned or CMYK JPEG): the least a
    decode budget must hold (16/32-bit ones need up to 14 bytes a pixel)."""
    return max_pixels * 2 * RGB_BYTES + ALPHA_STRIP_COPIES * RGB_BYTES * ALPHA_STRIP_PIXELS


def resized_size(size: tuple[int, int], spec: Preprocess, crop_region_only: bool) -> tuple[int, int]:
    """The size the resize step makes: the whole picture resized (short side to resize_px, or squashed to
    resize_px x resize_px), or only the crop's region (fast mode's resize_crop_region)."""
    if crop_region_only:
        return spec.crop_px, spec.crop_px
    if spec.crop_mode == "squash":
        return spec.resize_px, spec.resize_px
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(spec.resize_px * long / short)
    return (spec.resize_px, new_long) if width <= height else (new_long, spec.resize_px)


def may_be_rotated(image: Image.Image) -> bool:
    """Whether EXIF (or XMP) may turn the picture (runtime.preprocess.loaded_rgb copies it then), read from the header
    without touching the image's own EXIF cache (runtime.orientation reads it after the decode). A PNG's eXIf or XMP
    chunk may follow its pixels (PIL would decode them to look): a PNG counts as turned.

    An EXIF block that does not parse is not turned: the decode parses the same bytes the same way
    (runtime.orientation.exif_orientation) and leaves the picture as stored, so no second copy is ever made."""
    if image.format == "PNG":
        return True
    xmp = image.info.get("xmp") or image.info.get("XML:com.adobe.xmp") or b""
    if b"Orientation" in (xmp.encode() if isinstance(xmp, str) else xmp):
        return True
    if "exif" in image.info:
        exif = Image.Exif()
        try:
            exif.load(image.info["exif"])
        except UNREADABLE_EXIF:
            return False
        return exif.get(EXIF_ORIENTATION) in TURNS
    tags = getattr(image, "tag_v2", None)  # a TIFF's orientation is a tag of its own
    return tags is not None and tags.get(EXIF_ORIENTATION) in TURNS


def decoder_bytes(image: Image.Image, declared: tuple[int, int]) -> int:
    """What the decoder itself holds beside the picture while it decodes: a progressive JPEG's coefficients (2 bytes
    each, for the full declared size even when it decodes at reduced scale), a compressed TIFF's strip or tile, a
    WebP's frame buffers (which stay with the picture)."""
    width, height = declared
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        layers = getattr(image, "layer", [])  # (id, horizontal, vertical sampling, table) per component
        sampling = [h * v for _, h, v, _ in layers] or [1]
        if max(sampling) < 1:  # a sampling factor of 0: not a JPEG libjpeg decodes (it refuses it), nothing held
            raise ValueError("a JPEG component's sampling factor is 0")
        return round(2 * width * height * sum(sampling) / max(sampling))
    if image.format == "WEBP":
        return WEBP_DECODER_BYTES_PER_PIXEL * width * height
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None and tags.get(TIFF_COMPRESSION, 1) != 1:
        samples = tiff_count(tags, TIFF_SAMPLES_PER_PIXEL, 1)
        sample_bytes = -(-tiff_count(tags, TIFF_BITS_PER_SAMPLE, 8) // 8)
        if TIFF_TILE_WIDTH in tags or TIFF_TILE_LENGTH in tags:  # tiled, as libtiff (which decodes these) decides
            return tiff_count(tags, TIFF_TILE_WIDTH, width) * tiff_count(tags, TIFF_TILE_LENGTH, 1) * samples * \
                sample_bytes
        return width * min(height, tiff_count(tags, TIFF_ROWS_PER_STRIP, height)) * samples * sample_bytes
    return 0


def first_tiff_value(value, default=None):
    """A TIFF tag's value, its first where it lists several (PIL decodes with the first sample's), default if none."""
    if isinstance(value, tuple):
        return value[0] if value else default
    return value


def tiff_count(tags, tag: int, default: int) -> int:
    """A TIFF tag's value as a count, its first where it lists several (as PIL decodes with it); one a hostile file
    gives as text or bytes (which Python would repeat, not multiply: 210 bytes asked for gigabytes) is refused."""
    value = first_tiff_value(tags.get(tag, default), default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"the TIFF's tag {tag} is {str(value)[:20]!r}, not a count")
    return value


def resize_bytes(size: tuple[int, int], resized: tuple[int, int], interpolation: str) -> int:
    """What PIL's resize holds besides the picture: its horizontal pass (output width x the rows), the output and
    the two filter-weight tables (8 bytes x output size x taps, where the taps grow with the reduction: a sliver of
    40,000,000 x 1 squashed to 256 x 256 needs 1.3 GB of them)."""
    if resized == size:
        return 0  # resize_short_side / resize_squash return the picture as it is
    (width, height), (new_width, new_height) = size, resized
    support = FILTER_SUPPORT[interpolation]
    tables = 0 if support == 0 else sum(
        8 * out * (2 * math.ceil(support * max(1.0, source / out)) + 1)
        for source, out in ((width, new_width), (height, new_height)))
    return RGB_BYTES * (new_width * height + new_width * new_height) + tables


def decode_peak_bytes(image: Image.Image, declared: tuple[int, int], resized: tuple[int, int],
                      interpolation: str) -> int:
    """The most bytes decoding the opened (not yet loaded) image, converting it to RGB and resizing it to `resized`
    hold at once. declared: its size in the header (a JPEG decoding at reduced scale has a smaller image.size). A GIF's
    is gif_peak_bytes, known before Pillow opens it."""
    width, height = image.size
    decoder = decoder_bytes(image, declared)
    alpha = composited_on_white(image)
    if image.mode == "RGB" and not alpha:
        decoding = width * height * stored_bytes(image.mode) * (2 if may_be_rotated(image) else 1)
    else:  # the rotation's second copy (<= 4 bytes a pixel) is gone before the RGB picture is made
        decoding = converting_bytes(image.size, image.mode, alpha)
    kept = decoder if image.format == "WEBP" else 0  # a WebP's frame buffers stay with the picture, through the resize
    return max(decoding + decoder, resizing_bytes(image.size, resized, interpolation) + kept)


def gif_peak_bytes(frame: GifFirstFrame, resized: tuple[int, int], interpolation: str) -> int:
    """decode_peak_bytes of a GIF, from its bytes (runtime.gif_frames), before Pillow opens it: Pillow reads the first
    frame as P or L (1 byte a pixel, its default loading strategy), composited on white where it has a transparent
    index; the area it fills while opening the file stays with the picture until it is RGB."""
    decoding = converting_bytes(frame.size, "P", frame.transparent) + frame.filled_pixels
    return max(decoding, resizing_bytes(frame.size, resized, interpolation))


def converting_bytes(size: tuple[int, int], mode: str, alpha: bool) -> int:
    """A decoded picture that is not opaque RGB and the RGB picture it becomes (runtime.preprocess.to_rgb), with the
    scratch of its scaling to 8 bits or the strips of its composite on white."""
    width, height = size
    converting = width * height * (stored_bytes(mode) + RGB_BYTES + SCALING_SCRATCH.get(mode, 0))
    if alpha:
        converting += ALPHA_STRIP_COPIES * RGB_BYTES * width * min(height, alpha_strip_rows(width))
    return converting


def resizing_bytes(size: tuple[int, int], resized: tuple[int, int], interpolation: str) -> int:
    """The RGB picture and what PIL's resize of it to `resized` holds besides (resize_bytes)."""
    return RGB_BYTES * size[0] * size[1] + resize_bytes(size, resized, interpolation)
