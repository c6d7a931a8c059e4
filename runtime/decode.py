"""JPEG decoding at reduced size ("fast" mode): the decoder's DCT scaling (1/2, 1/4, 1/8) for pictures far above the
model's resize target, keeping the decoded short side >= a headroom (default twice) x that target; the same resize +
crop follows, with only the crop's region resampled (runtime.preprocess.resize_crop_region)."""
from __future__ import annotations

import math

from PIL import Image

DECODE_MODES = ("exact", "fast")
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})  # the formats whose decoder can scale in the DCT (libjpeg's scale_denom)
# The decoded short side stays >= this x resize_px. Measured with EfficientNet-Lite0 on 380 real-photo JPEGs
# (scripts/decode_accuracy.py, README "Fast decoding"): at 1x, top-1 agreement with exact decoding was 85.8% (71.6%
# when the decode lands just above the target, where the resize barely filters); at 2x, 97.9% and a max |logit|
# difference of 1.5 instead of 18.9. 12-MP photos then decode at 1/4 scale instead of 1/8. The service's
# fast_decode_headroom setting chooses another (1: the least decoding work, 12-MP photos at 1/8).
FAST_DECODE_HEADROOM = 2.0
# Below 1 the decode would land under the resize target; above 8 a JPEG's short side would need 16x the target
# (4096 px for a 256 resize) before even the 1/2 scale applied: fast mode would be exact mode.
HEADROOM_RANGE = (1.0, 8.0)


def fast_decode_min_short_side(resize_px: int, headroom: float = FAST_DECODE_HEADROOM) -> int:
    """The smallest short side a fast decode may produce for a model that resizes to resize_px."""
    low, high = HEADROOM_RANGE
    if not low <= headroom <= high:
        raise ValueError(f"fast decode headroom {headroom:g} is outside {low:g}..{high:g}")
    return math.ceil(headroom * resize_px)


def reduce_jpeg_decode(image: Image.Image, min_short_side_px: int) -> bool:
    """Before load(): let a JPEG decode at 1/2, 1/4 or 1/8 scale, its short side staying >= min_short_side_px.
    True when it will (the picture then has its reduced size).

    Other formats, and JPEGs under twice the target (no scale would apply), decode as they are. PIL's draft picks
    the largest scale s in (8, 4, 2) with s <= short // min_short_side_px, so ceil(short / s) >= min_short_side_px.
    """
    if image.format not in DRAFT_FORMATS or min(image.size) < 2 * min_short_side_px:
        return False
    declared = image.size
    image.draft(image.mode, (min_short_side_px, min_short_side_px))  # same mode: CMYK and L stay what they are
    return image.size != declared
