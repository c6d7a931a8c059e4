"""EXIF orientation: read from a decoded image's metadata (an unreadable EXIF block counts as upright), the picture
turned upright by it, and which of the upright picture's axes run backwards through the stored one (what fast mode's
crop geometry follows, runtime.decode)."""
from __future__ import annotations

import struct

from PIL import Image

EXIF_ORIENTATION = 0x0112
UPRIGHT = 1
# What PIL raises on an EXIF block it cannot parse: b"Exif\0\0" and zeros, junk, a TIFF header cut short ("not a TIFF
# file" is a SyntaxError; a truncated directory a struct.error).
UNREADABLE_EXIF = (SyntaxError, ValueError, OSError, struct.error)
# The transpose that turns a picture stored in each orientation upright (PIL's ImageOps.exif_transpose's table).
TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# EXIF 2.32, Orientation: where the stored rows and columns go. 5-8 store the picture on its side (the upright x runs
# along the stored y); in 2, 3, 6 and 7 the upright x runs from the stored axis's end to its start, in 3, 4, 7 and 8
# the upright y does.
SWAPS_AXES = frozenset({5, 6, 7, 8})
REVERSES_X = frozenset({2, 3, 6, 7})
REVERSES_Y = frozenset({3, 4, 7, 8})


def exif_orientation(image: Image.Image) -> int:
    """The loaded image's EXIF (or XMP, or TIFF tag) orientation, 1..8; upright (1) when there is none, when it is not
    one of the eight, or when the EXIF block does not parse: training's loader ignores EXIF, so such a picture is
    classified as it is stored, and its pixels decode."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, UPRIGHT)
    except UNREADABLE_EXIF:
        return UPRIGHT
    try:  # as exif_transpose looks it up: a RATIONAL 6/1 or a FLOAT 6.0 is 6, an unhashable value none of the eight
        return int(orientation) if orientation in TURNS else UPRIGHT
    except TypeError:
        return UPRIGHT


def turned_upright(image: Image.Image, orientation: int) -> Image.Image:
    """The picture turned upright: itself when it is, else a turned copy, the stored picture's memory released (the
    caller's reference to it is closed). Not ImageOps.exif_transpose: besides turning, it rewrites the EXIF block
    without the orientation, and that raises on blocks PIL reads but cannot write back (TypeError, struct.error)."""
    turn = TURNS.get(orientation)
    if turn is None:
        return image
    turned = image.transpose(turn)
    image.close()  # releases the stored pixels now: the picture is held twice only for the turn, as in place
    return turned
