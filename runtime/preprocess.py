"""Image bytes -> RGB picture -> the manifest's evaluation transform, in PIL and NumPy (no torch).

The transform reproduces torchvision's Resize(int) (Resize((size, size)) in squash mode) -> CenterCrop -> ToTensor ->
Normalize on PIL images, which is what training evaluates with; tests/service/test_preprocess_parity.py proves the
two agree.
"""
from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import PIL
from PIL import Image, UnidentifiedImageError

from runtime.decode import (
    FAST_DECODE_HEADROOM,
    Box,
    ReducedPicture,
    fast_decode_min_short_side,
    reduce_jpeg_decode,
    reduced_picture,
)
from runtime.decode_memory import (
    TIFF_BITS_PER_SAMPLE,
    decode_peak_bytes,
    first_tiff_value,
    gif_peak_bytes,
    resized_size,
)
from runtime.gif_frames import GIF_SIGNATURES, ExtensionsTooLarge, GifFirstFrame, gif_first_frame
from runtime.jpeg_scans import MAX_JPEG_SCANS, scan_count
from runtime.metadata_limits import MAX_METADATA_BYTES
from runtime.orientation import exif_orientation, turned_upright
from runtime.repository import Preprocess
from runtime.transparency import composited_on_white, match_colour_key_to_pixels, on_white

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
# Image.open tries only these plugins, in order (an MPO file opens through JPEG's, which returns it as MPO).
OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
STRIP_ROWS = 256  # rows scaled at a time when a 16/32-bit picture becomes 8-bit (to_rgb)
RGB_CHANNELS = 3  # every picture becomes RGB: the tensor is (3, crop_px, crop_px) whatever the manifest says
PILLOW_PACKAGE = Path(PIL.__file__).resolve().parent
HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})  # scaled to 8 bits by to_rgb
TIFF_SAMPLE_FORMAT, TIFF_SIGNED_INTEGER = 339, 2
# PIL.Image.MAX_IMAGE_PIXELS's default (1 GiB / 4 / 3): Pillow warns above it, raises above twice it.
PILLOW_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# Entered with the bytes an image's decode will hold at its peak, held while it decodes (the service's budget).
Reserve = Callable[[int], AbstractContextManager[object]]
RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ImageError(ValueError):
    """The bytes are not an image this service can classify; `code` is the machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def decode_image(data: bytes, max_pixels: int, min_short_side_px: int | None = None) -> Image.Image:
    """Decode to an RGB picture, upright per EXIF; refuse non-images, truncation and decompression bombs.

    min_short_side_px (fast mode): a large JPEG may decode at reduced size, its short side >= this (runtime.decode).
    """
    return decode_image_scaled(data, max_pixels, min_short_side_px)[0]


def decode_image_scaled(data: bytes, max_pixels: int,
                        min_short_side_px: int | None) -> tuple[Image.Image, ReducedPicture | None]:
    """decode_image, and where the source lies in it when the JPEG decoder scaled it down (fast mode only)."""
    image, declared, dct_scale = opened_image(data, max_pixels, min_short_side_px)
    picture, orientation = loaded_rgb(image)
    return picture, reduced_picture(declared, dct_scale, orientation) if dct_scale > 1 else None


@contextmanager
def image_errors() -> Iterator[None]:
    """Pillow's exceptions while reading an image -> ImageError with the reason's code."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too_many_pixels", f"the image declares too many pixels: {err}") from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image",
                         "the body is not a recognised image (JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("corrupt_image", f"the image could not be decoded: {err}") from None
    except (ArithmeticError, TypeError) as err:  # Pillow's plugins on hostile headers raise these too (a TIFF
        if not raised_in_pillow(err):           # palette's overflow, an IFDRational where an integer belongs); ours
            raise                                # are bugs: a 500, logged, not a client's corrupt image
        raise ImageError("corrupt_image", f"the image could not be decoded: {err}") from None


def raised_in_pillow(err: BaseException) -> bool:
    """Whether err was raised while Pillow's code ran (a frame of its traceback is Pillow's: once Pillow has returned,
    its frames are gone, so an error of ours is not counted as Pillow's)."""
    frame = err.__traceback__
    while frame is not None:
        if PILLOW_PACKAGE in Path(frame.tb_frame.f_code.co_filename).resolve().parents:
            return True
        frame = frame.tb_next
    return False


class OpenedImage(NamedTuple):
    image: Image.Image  # its header read, not a pixel decoded yet
    declared: tuple[int, int]  # the size its header declares
    dct_scale: int  # 1, or the s of a JPEG that decodes at 1/s (fast mode): image.size is then ceil(declared / s)


def opened_image(data: bytes, max_pixels: int, min_short_side_px: int | None) -> OpenedImage:
    """The image's header read, its size and format checked, not a pixel decoded yet; and the size its header
    declares: a large JPEG in fast mode (min_short_side_px) decodes at reduced size, image.size then smaller."""
    if data[:6] in GIF_SIGNATURES:
        checked_gif_first_frame(data, max_pixels)
    return opened_header(data, max_pixels, min_short_side_px)


def checked_gif_first_frame(data: bytes, max_pixels: int) -> GifFirstFrame:
    """A GIF's first frame as Pillow will open it, read from its bytes: Pillow grows the picture to cover it and may
    fill its area while opening the file, whatever its size, and keeps a comment's every sub-block (413 beyond
    max_pixels, 400 beyond MAX_METADATA_BYTES of extensions)."""
    try:
        frame = gif_first_frame(data, MAX_METADATA_BYTES)
    except ExtensionsTooLarge as err:
        raise ImageError("corrupt_image", f"{err}: not an image this service reads") from None
    check_pixels(frame.size, max_pixels)
    return frame


def opened_header(data: bytes, max_pixels: int, min_short_side_px: int | None) -> OpenedImage:
    """opened_image, a GIF's first frame already checked."""
    if not data:
        raise ImageError("empty_body", "the image is empty (0 bytes)")
    with image_errors():
        # formats: only these plugins look at the bytes (not every format Pillow can parse a header of).
        image = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
        if image.format not in ALLOWED_FORMATS:
            raise ImageError("unsupported_format", f"image format {image.format} is not accepted")
        width, height = image.size
        check_pixels(image.size, max_pixels)
        if image.format in ("JPEG", "MPO"):
            _check_scan_count(data)
        image.seek(0)  # GIF / multi-page TIFF: the first frame
        match_colour_key_to_pixels(image)
        dct_scale = 1 if min_short_side_px is None else reduce_jpeg_decode(image, min_short_side_px)
    return OpenedImage(image, (width, height), dct_scale)


def check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """413 too_many_pixels for a picture of more than max_pixels (never more than Pillow's own limit, so the service
    refuses, with its own answer, whatever Pillow would only warn about: no process-wide warning filter is needed)."""
    width, height = size
    if width * height > max_pixels:
        raise ImageError("too_many_pixels", f"image is {width}x{height} = {width * height} pixels, "
                         f"over the limit of {max_pixels}")


def _check_scan_count(data: bytes) -> None:
    """Refuse a JPEG of more than MAX_JPEG_SCANS scans before decoding it: each scan is a pass over the whole image
    (runtime/jpeg_scans.py)."""
    scans = scan_count(data)
    if scans > MAX_JPEG_SCANS:
        raise ImageError("corrupt_image", f"a JPEG of more than {MAX_JPEG_SCANS} scans (encoders write 1-18): each "
                         "scan is a pass over the whole image, so it is refused before decoding")


def loaded_rgb(image: Image.Image) -> tuple[Image.Image, int]:
    """The opened image decoded, upright per EXIF (an EXIF block that does not parse counts as upright: the pixels are
    what training's loader, which ignores EXIF, classifies), as 8-bit RGB; and the orientation it was turned by. A
    turned image's stored picture is closed."""
    with image_errors():
        image.load()
    orientation = exif_orientation(image)
    white = white_level(image) if image.mode in HIGH_DEPTH_MODES else None  # before a turn drops the TIFF tags
    with image_errors():  # a conversion Pillow lacks for a mode a file may declare is the file's problem, a 400
        return to_rgb(turned_upright(image, orientation), white), orientation


def white_level(image: Image.Image) -> float:
    """The sample value that is white in a 16/32-bit or float picture, from what the file declares, never from its
    pixels (a guess from their maximum made a 32-bit picture of 0..255 white and one of 1..256 near black): the
    largest value its samples' bits hold (a TIFF's BitsPerSample and SampleFormat: 4095 for 12 bits, 32767 for
    signed 16, 2**31 - 1 for signed 32; else 65535 for I;16, 2**31 - 1 for PIL's 32-bit I), and 1.0 for floating
    point (the 0..1 convention of float images). Training's loader (convert("RGB")) clips them to 0..255 instead."""
    if image.mode == "F":
        return 1.0
    default = 65535 if image.mode.startswith("I;16") else 2**31 - 1
    tags = getattr(image, "tag_v2", None)
    if tags is None or tags.get(TIFF_BITS_PER_SAMPLE) is None:
        return default
    # The first sample's, as PIL decodes with (a hostile tag may list more values, or huge ones: 2**(2**32) held the
    # GIL for half a minute); a depth PIL would not decode into this mode is not believed.
    bits = first_tiff_value(tags[TIFF_BITS_PER_SAMPLE])
    sample_format = first_tiff_value(tags.get(TIFF_SAMPLE_FORMAT, 1))
    if isinstance(bits, bool) or bits not in range(2, 33):  # by equality, as PIL matches it (a RATIONAL 16/1 is 16)
        return default
    bits = int(bits)
    return 2 ** (bits - 1) - 1 if sample_format == TIFF_SIGNED_INTEGER else 2**bits - 1


def to_rgb(image: Image.Image, white: float | None = None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: alpha and a transparent colour (a PNG's tRNS, a GIF's transparent index) composited
    on white, 16/32-bit and float scaled (0..white to 0..255; white: white_level(image) unless given), CMYK and
    palettes converted."""
    if image.mode in HIGH_DEPTH_MODES:
        top = white_level(image) if white is None else white
        pixels = np.asarray(image)
        if top > np.iinfo(np.int32).max and pixels.dtype == np.int32:  # unsigned 32-bit: PIL's I holds it as int32
            pixels = pixels.view(np.uint32)
        image = Image.fromarray(scaled_to_8_bits(pixels, top, image.info.get("transparency")), mode="L")
    if composited_on_white(image):
        image = on_white(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def scaled_to_8_bits(pixels: np.ndarray, top: float, transparent: int | None = None) -> np.ndarray:
    """round(v * 255 / top) clipped to 0..255 as uint8, a strip of rows at a time: a few bytes of scratch per pixel
    of a strip, not 24 per pixel of the picture (a 80 KB 16-bit PNG may declare 40 megapixels). Pixels of the
    transparent value (a 16-bit PNG's tRNS) become white, as on_white composites them (Pillow's convert("RGBA") would
    clip the picture to 8 bits, not scale it)."""
    out = np.empty(pixels.shape, dtype=np.uint8)
    for start in range(0, pixels.shape[0], STRIP_ROWS):
        strip = pixels[start:start + STRIP_ROWS]
        wide: np.ndarray
        if strip.dtype.kind == "u" and top == 65535:  # 16-bit: exact, in integers (no float rounding at all)
            wide = strip.astype(np.uint32)
            wide *= 255
            wide += 32767
            wide //= 65535
        else:  # 32-bit integer or float pictures
            wide = strip.astype(np.float32)
            wide *= np.float32(255.0 / top)
            wide += np.float32(0.5)
            np.clip(wide, 0, 255, out=wide)
        out[start:start + STRIP_ROWS] = wide
        if isinstance(transparent, int):
            out[start:start + STRIP_ROWS][strip == transparent] = 255
    return out


def resize_short_side(image: Image.Image, size_px: int, interpolation: str) -> Image.Image:
    """torchvision Resize(int): the short side becomes size_px, the long side int(size_px * long / short)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size_px:
        return image
    new_short, new_long = size_px, int(size_px * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new_size, RESAMPLING[interpolation])


def resize_squash(image: Image.Image, size_px: int, interpolation: str) -> Image.Image:
    """torchvision Resize((size_px, size_px)): both sides become size_px, the aspect ratio is not kept."""
    if image.size == (size_px, size_px):
        return image
    return image.resize((size_px, size_px), RESAMPLING[interpolation])


def center_crop(image: Image.Image, crop_px: int) -> Image.Image:
    """torchvision CenterCrop on a picture at least crop_px on each side."""
    width, height = image.size
    top = int(round((height - crop_px) / 2.0))
    left = int(round((width - crop_px) / 2.0))
    return image.crop((left, top, left + crop_px, top + crop_px))


def crop_region(size: tuple[int, int], spec: Preprocess) -> Box:
    """The region of a picture of `size` that resize_short_side + center_crop keep, in its pixel coordinates."""
    width, height = size
    new_width, new_height = resized_size(size, spec, crop_region_only=False)
    top = int(round((new_height - spec.crop_px) / 2.0))
    left = int(round((new_width - spec.crop_px) / 2.0))
    scale_x, scale_y = width / new_width, height / new_height
    return left * scale_x, top * scale_y, (left + spec.crop_px) * scale_x, (top + spec.crop_px) * scale_y


def resize_crop_region(image: Image.Image, source: ReducedPicture, spec: Preprocess) -> Image.Image:
    """resize_short_side then center_crop of the source, resampling only the crop's region (PIL's resize box): the
    region is computed on the source's (declared, upright) size as exact mode does, then mapped into the reduced
    picture; the same source coordinates per output pixel, within 1 grey level of the two steps (filter weights round
    differently; bicubic: a few values in 100,000 by up to 4), ~40% less resampling. Fast mode only: exact mode
    keeps the two steps, bit for bit training's."""
    box = source.box(crop_region(source.upright_size, spec))
    return image.resize((spec.crop_px, spec.crop_px), RESAMPLING[spec.interpolation], box=box)


def resamples_crop_region_only(spec: Preprocess) -> bool:
    """Whether fast mode resamples only the crop's region of a reduced picture (a center crop), or takes exact mode's
    two steps (squash; and nearest, which picks one source pixel per output pixel: a region's coordinates, off by a
    rounding, pick its neighbour, up to 180 grey levels apart)."""
    return spec.crop_mode == "center" and spec.interpolation != "nearest"


def normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 (channels, 256): ((v / 255) - mean[c]) / std[c] for every 8-bit value v, in ToTensor + Normalize's order.

    The same float32 operations as computing them per pixel, so a lookup gives the same bits in one pass.
    """
    values = np.arange(256, dtype=np.float32) / np.float32(255.0)
    return (values[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


_normalization_tables = functools.lru_cache(maxsize=8)(normalization_table)  # one per served preprocess spec


def eval_transform(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """RGB picture -> float32 (3, crop_px, crop_px), normalized: the training-side evaluation transform."""
    resize = resize_squash if spec.crop_mode == "squash" else resize_short_side
    return normalized_tensor(center_crop(resize(image, spec.resize_px, spec.interpolation), spec.crop_px), spec)


def normalized_tensor(image: Image.Image, spec: Preprocess) -> np.ndarray:
    """The cropped RGB picture -> float32 (3, H, W): ToTensor + Normalize."""
    channels = np.asarray(image).transpose(2, 0, 1)  # (3, H, W) uint8, a view
    table = _normalization_tables(spec.mean, spec.std)
    tensor = np.empty(channels.shape, dtype=np.float32)
    for channel, values in enumerate(channels):  # one lookup pass per channel, straight into (3, H, W)
        tensor[channel] = table[channel][values]
    return tensor


def preprocess(data: bytes, spec: Preprocess, max_pixels: int, decode_mode: str = "exact",
               fast_decode_headroom: float = FAST_DECODE_HEADROOM, reserve: Reserve | None = None) -> np.ndarray:
    """Bytes -> the model's input tensor for one image; raises ImageError for anything unusable.

    decode_mode "exact" is training's transform bit for bit (on 8-bit opaque pictures: decode_image also applies
    EXIF orientation, alpha on white and 16/32-bit scaling, which training's loader does not); "fast" lets large JPEGs
    decode at reduced size, their short side kept >= fast_decode_headroom x the resize target.
    reserve (the service's decode budget) is entered with the bytes the decode will hold at its peak, known before a
    pixel is decoded, and held until the tensor is made: once the header is read; a GIF's from its bytes, before Pillow
    opens it (which fills its first frame's area).
    """
    fast = decode_mode == "fast"
    min_short_side = fast_decode_min_short_side(spec.resize_px, fast_decode_headroom) if fast else None
    opened: OpenedImage | None = None
    if data[:6] in GIF_SIGNATURES:  # opened once its peak is held: Image.open fills the first frame's area
        frame = checked_gif_first_frame(data, max_pixels)
        peak_bytes = gif_peak_bytes(frame, resized_within(frame.size, spec, False, max_pixels), spec.interpolation)
    else:
        opened = opened_header(data, max_pixels, min_short_side)
        resized = resized_within(opened.image.size, spec, opened.dct_scale > 1 and resamples_crop_region_only(spec),
                                 max_pixels)
        with image_errors():  # the estimate reads the EXIF block
            peak_bytes = decode_peak_bytes(opened.image, opened.declared, resized, spec.interpolation)
    with reserve(peak_bytes) if reserve is not None else nullcontext():
        image, declared, dct_scale = opened_header(data, max_pixels, min_short_side) if opened is None else opened
        picture, orientation = loaded_rgb(image)
        del image, opened  # the decoded picture, when to_rgb made another, is not held through the resize
        if dct_scale == 1:
            return eval_transform(picture, spec)
        return fast_transform(picture, reduced_picture(declared, dct_scale, orientation), spec)


def resized_within(size: tuple[int, int], spec: Preprocess, crop_region_only: bool, max_pixels: int) -> tuple[int, int]:
    """resized_size, 413 too_many_pixels beyond max_pixels: a sliver of 4 x 100000 pixels resizes to 256 x 6400000."""
    resized = resized_size(size, spec, crop_region_only)
    if resized[0] * resized[1] > max_pixels:
        raise ImageError("too_many_pixels", f"the image is {size[0]}x{size[1]}: resized to {spec.resize_px} px on its "
                         f"short side it would be {resized[0]}x{resized[1]} = {resized[0] * resized[1]} pixels, over "
                         f"the limit of {max_pixels}")
    return resized


def fast_transform(image: Image.Image, reduced: ReducedPicture | None, spec: Preprocess) -> np.ndarray:
    """Fast mode's transform of a decoded picture: eval_transform's, except on a picture the JPEG decoder scaled
    down (no longer training's pixels anyway): its geometry is the declared size's, mapped into the picture
    (runtime.decode.ReducedPicture), and a center crop resamples only its region."""
    if reduced is None:
        return eval_transform(image, spec)
    if resamples_crop_region_only(spec):
        return normalized_tensor(resize_crop_region(image, reduced, spec), spec)
    # Exact mode's two steps, on the part of the picture that holds the source.
    resized = image.resize(resized_size(reduced.upright_size, spec, crop_region_only=False),
                           RESAMPLING[spec.interpolation], box=reduced.source_box())
    return normalized_tensor(center_crop(resized, spec.crop_px), spec)
