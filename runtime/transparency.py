"""Transparency as the service reads it: which pictures are composited on white (alpha, or a transparent colour: a
PNG's tRNS key, a GIF's transparent index), the key matched to the depth Pillow reads the pixels in, and the
composite itself, a strip of rows at a time (runtime.decode_memory counts its strips; runtime.preprocess.to_rgb calls
it). Training's ImageFolder loader does none of this (convert("RGB") drops alpha): README, decode_mode."""
from __future__ import annotations

from PIL import Image, ImageFile

# Alpha is composited this many pixels at a time (on_white).
ALPHA_STRIP_PIXELS = 1 << 18
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Modes transparent where a pixel is info["transparency"] (a PNG's tRNS, a GIF's transparent index), composited alike.
COLOUR_KEY_MODES = frozenset({"1", "L", "P", "RGB"})
# A PNG's raw depth (its tile's rawmode) -> what Pillow multiplies its samples by to make them 8-bit: its tRNS key is
# kept raw (PngImagePlugin), and compared with the 8-bit pixels. A 1-bit key is already 0 or 255; 16-bit RGB
# ("RGB;16B") is missing: Pillow keeps each sample's high byte, so no 8-bit value stands for its key.
PNG_KEY_SCALE = {"L": 1, "L;2": 85, "L;4": 17, "RGB": 1}


def composited_on_white(image: Image.Image) -> bool:
    """Whether runtime.preprocess.to_rgb composites the picture on white a strip at a time: it has an alpha channel, or
    a transparent colour (Pillow's convert("RGBA") honours it)."""
    return image.mode in ALPHA_MODES or (image.mode in COLOUR_KEY_MODES and "transparency" in image.info)


def match_colour_key_to_pixels(image: ImageFile.ImageFile) -> None:
    """Make an opened PNG's transparent colour (its tRNS key, info["transparency"]) the 8-bit value its pixels hold as
    Pillow reads them, which is what convert("RGBA") compares it with: a 2- or 4-bit grey key scaled as the pixels
    are (x85, x17; kept raw, it matched other pixels or none). A key no 8-bit pixel stands for is dropped, the picture
    opaque, as training's convert("RGB") reads it: 16-bit RGB, whose pixels Pillow cuts to their high bytes and whose
    key it compared by its low byte (whitening pixels of another colour), and a key beyond the depth's values.
    Called before the decode estimate, so composited_on_white says what to_rgb does; 16-bit grey keeps its raw key
    (runtime.preprocess.scaled_to_8_bits compares it at 16 bits)."""
    key = image.info.get("transparency")
    if image.format != "PNG" or image.mode not in ("L", "RGB") or key is None or not image.tile:
        return
    rawmode = image.tile[0].args  # the zip decoder's argument: the depth the PNG stores
    scale = PNG_KEY_SCALE.get(rawmode) if isinstance(rawmode, str) else None
    samples = key if isinstance(key, tuple) else (key,)
    if scale is None or not all(isinstance(v, int) and 0 <= v * scale <= 255 for v in samples):
        del image.info["transparency"]
    elif scale != 1:
        image.info["transparency"] = key * scale


def alpha_strip_rows(width: int) -> int:
    """Rows composited at a time (on_white): about ALPHA_STRIP_PIXELS, at least one."""
    return max(1, ALPHA_STRIP_PIXELS // width)


def on_white(image: Image.Image) -> Image.Image:
    """A picture with alpha (or a transparent colour) composited on white, as RGB: the same pixels as
    Image.alpha_composite over the whole picture, made a strip of rows at a time, so only the source and the RGB
    result are held whole (an RGBA copy, a white picture and their composite of a 40-MP PNG were 480 MB more)."""
    width, height = image.size
    rows = alpha_strip_rows(width)
    rgb = Image.new("RGB", image.size)
    white = Image.new("RGBA", (width, min(rows, height)), (255, 255, 255, 255))
    for top in range(0, height, rows):
        strip = as_rgba(image.crop((0, top, width, min(top + rows, height))))
        background = white if strip.height == white.height else white.crop((0, 0, width, strip.height))
        rgb.paste(Image.alpha_composite(background, strip).convert("RGB"), (0, top))
    return rgb


def as_rgba(strip: Image.Image) -> Image.Image:
    """A strip as RGBA, its alpha un-premultiplied: Pillow converts premultiplied grey (La, a TIFF's associated alpha)
    to LA only."""
    return (strip.convert("LA") if strip.mode == "La" else strip).convert("RGBA")
