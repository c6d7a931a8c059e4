"""JPEG decoding at reduced size ("fast" mode): the decoder's DCT scaling (1/2, 1/4, 1/8) for pictures far above the
model's resize target, keeping the decoded short side >= that target so the usual resize + crop follows."""
from __future__ import annotations

from PIL import Image

DECODE_MODES = ("exact", "fast")
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})  # the formats whose decoder can scale in the DCT (libjpeg's scale_denom)


def reduce_jpeg_decode(image: Image.Image, min_short_side_px: int) -> None:
    """Before load(): let a JPEG decode at 1/2, 1/4 or 1/8 scale, its short side staying >= min_short_side_px.

    Other formats, and JPEGs under twice the target (no scale would apply), decode as they are. PIL's draft picks
    the largest scale s in (8, 4, 2) with s <= short // min_short_side_px, so ceil(short / s) >= min_short_side_px.
    """
    if image.format not in DRAFT_FORMATS or min(image.size) < 2 * min_short_side_px:
        return
    image.draft(image.mode, (min_short_side_px, min_short_side_px))  # same mode: CMYK and L stay what they are
