"""JPEG decoding at reduced size ("fast" mode): the decoder's DCT scaling (1/2, 1/4, 1/8) for pictures far above the
model's resize target, keeping the decoded short side >= a headroom (default twice) x that target; the same resize +
crop follows, its geometry that of the declared size (exact mode's), mapped into the reduced picture (ReducedPicture),
with only the crop's region resampled (runtime.preprocess.resize_crop_region)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from runtime.orientation import REVERSES_X, REVERSES_Y, SWAPS_AXES

Box = tuple[float, float, float, float]  # left, top, right, bottom, as PIL's resize box

DECODE_MODES = ("exact", "fast")
DRAFT_FORMATS = frozenset({"JPEG", "MPO"})  # the formats whose decoder can scale in the DCT (libjpeg's scale_denom)
# The decoded short side stays >= this x resize_px. Measured with EfficientNet-Lite0 on 380 real-photo JPEGs
# (scripts/decode_accuracy.py, README "Fast decoding"): at 1x, top-1 agreement with exact decoding was 88.7% (83.2%
# when the decode lands just above the target, where the resize barely filters); at 2x, 97.9% and a max |logit|
# difference of 1.5 instead of 8.5. 12-MP photos then decode at 1/4 scale instead of 1/8. The service's
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


def reduce_jpeg_decode(image: Image.Image, min_short_side_px: int) -> int:
    """Before load(): let a JPEG decode at 1/2, 1/4 or 1/8 scale, its short side staying >= min_short_side_px.
    The scale's denominator s (source pixels per decoded pixel); 1 when it decodes at full size.

    Other formats, and JPEGs under twice the target (no scale would apply), decode as they are. PIL's draft picks
    the largest s in (8, 4, 2) with s <= short // min_short_side_px, so ceil(short / s) >= min_short_side_px.
    """
    if image.format not in DRAFT_FORMATS or min(image.size) < 2 * min_short_side_px:
        return 1
    declared_width = image.width
    # Same mode: CMYK and L stay what they are. draft's box is the source in decoded pixels: (0, 0, W/s, H/s).
    drafted = image.draft(image.mode, (min_short_side_px, min_short_side_px))
    return 1 if drafted is None else round(declared_width / drafted[1][2])


@dataclass(frozen=True)
class ReducedPicture:
    """Where the source lies in a picture the JPEG decoder scaled by 1/scale, then turned upright by its EXIF
    orientation. Decoded pixel i covers source pixels [i * scale, (i + 1) * scale) (libjpeg's DCT scaling), so a side
    of W pixels, W not a multiple of the scale, decodes to ceil(W / scale) pixels whose last one holds only the
    source's W / scale - floor(W / scale): the source spans W / scale of them (draft's box), not all. A turn that
    runs an axis backwards moves that partial pixel to the axis's start: the source then begins at an offset."""

    upright_size: tuple[int, int]  # the declared size, turned upright: what exact mode resizes
    scale: int
    offset: tuple[float, float]  # where the source's first column and row begin in the picture

    def box(self, region: Box) -> Box:
        """A region of the upright source (exact mode's pixel coordinates) in the picture's coordinates."""
        left, top, right, bottom = region
        (offset_x, offset_y), scale = self.offset, self.scale
        return offset_x + left / scale, offset_y + top / scale, offset_x + right / scale, offset_y + bottom / scale

    def source_box(self) -> Box:
        """The part of the picture that holds the whole source."""
        return self.box((0, 0, *self.upright_size))


def reduced_picture(declared: tuple[int, int], scale: int, orientation: int) -> ReducedPicture:
    """The geometry of a JPEG declared `declared` (as stored), decoded at 1/scale and turned by `orientation`."""
    width, height = (declared[1], declared[0]) if orientation in SWAPS_AXES else declared
    # An axis run backwards starts with the partial pixel: ceil(W / s) decoded pixels hold W / s of source.
    offset_x = -(-width // scale) - width / scale if orientation in REVERSES_X else 0.0
    offset_y = -(-height // scale) - height / scale if orientation in REVERSES_Y else 0.0
    return ReducedPicture((width, height), scale, (offset_x, offset_y))
