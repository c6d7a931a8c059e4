"""How many bytes turning an image into the model's input holds at its peak, known from the header before a pixel is
decoded: what the service's decode budget (decode_memory_mb) reserves for it, and what refuses a picture whose resize
alone would be a memory bomb (a 2.6 KB PNG of 4 x 100000 pixels resizes to 256 x 6400000: 6.5 GB).

PIL keeps a picture of 1 band in 1 byte a pixel (2 for 16-bit, 4 for 32-bit and float) and one of 2-4 bands in 4.
The two peaks (tests/service/test_decode_memory.py measures them in a fresh process per mode):
- decoding: the decoded picture, and, for any mode but RGB, the RGB picture it becomes (runtime.preprocess.to_rgb:
  alpha is composited a strip at a time; 16/32-bit pictures pass through an 8-bit copy and a NumPy view of theirs);
  an EXIF rotation holds the picture twice for a moment.
- resizing: the RGB picture, PIL's horizontal pass (output width x the rows it reads) and the output.
"""
from __future__ import annotations

from PIL import Image

from runtime.repository import Preprocess

RGB_BYTES = 4  # bytes a pixel of an RGB picture (PIL pads it to 4)
ONE_BYTE_MODES = frozenset({"1", "L", "P"})
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# to_rgb's scratch for pictures it scales to 8 bits: NumPy's copy of the pixels (2 or 4 bytes), the 8-bit array and
# the L picture made from it (1 + 1).
SCALING_SCRATCH = {**dict.fromkeys(SIXTEEN_BIT_MODES, 2 + 2), "I": 4 + 2, "F": 4 + 2}
# Alpha is composited this many pixels at a time; a strip is held ~5 times at once (the crop, its RGBA conversion,
# the white strip, their composite, its RGB conversion).
ALPHA_STRIP_PIXELS = 1 << 18
ALPHA_STRIP_COPIES = 5
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La", "P"})  # P: with a transparent entry (counted alike)
EXIF_ORIENTATION = 0x0112
UPRIGHT = (0, 1)  # no Orientation tag, or "top-left": exif_transpose copies nothing


def stored_bytes(mode: str) -> int:
    """Bytes a pixel of a PIL picture in this mode."""
    if mode in ONE_BYTE_MODES:
        return 1
    return 2 if mode in SIXTEEN_BIT_MODES else 4


def common_peak_bytes(max_pixels: int) -> int:
    """The most a picture of max_pixels in a common mode holds (a PNG with alpha, a turned or CMYK JPEG): the least a
    decode budget must hold (16/32-bit ones need up to 14 bytes a pixel)."""
    return max_pixels * 2 * RGB_BYTES + ALPHA_STRIP_COPIES * RGB_BYTES * ALPHA_STRIP_PIXELS


def alpha_strip_rows(width: int) -> int:
    """Rows composited at a time (runtime.preprocess.on_white): about ALPHA_STRIP_PIXELS, at least one."""
    return max(1, ALPHA_STRIP_PIXELS // width)


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
    """Whether EXIF turns the picture (runtime.preprocess.loaded_rgb copies it then), from the header: a PNG's eXIf
    chunk may follow its pixels (PIL would decode them to look), so a PNG without one before them counts as turned."""
    if image.format == "PNG" and "exif" not in image.info:
        return True
    return image.getexif().get(EXIF_ORIENTATION, 1) not in UPRIGHT


def decode_peak_bytes(image: Image.Image, resized: tuple[int, int]) -> int:
    """The most bytes decoding the opened (not yet loaded) image, converting it to RGB and resizing it to `resized`
    hold at once."""
    width, height = image.size
    pixels, stored = width * height, stored_bytes(image.mode)
    rotated = may_be_rotated(image)
    if image.mode == "RGB":
        decoding = pixels * stored * (2 if rotated else 1)
    else:  # the rotation's second copy (<= 4 bytes a pixel) is gone before the RGB picture is made
        decoding = pixels * (stored + RGB_BYTES + SCALING_SCRATCH.get(image.mode, 0))
        if image.mode in ALPHA_MODES:
            decoding += ALPHA_STRIP_COPIES * RGB_BYTES * width * min(height, alpha_strip_rows(width))
    new_width, new_height = resized
    resizing = RGB_BYTES * (pixels + new_width * height + new_width * new_height)
    return max(decoding, resizing)
