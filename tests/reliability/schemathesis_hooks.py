"""Real image files for the media types /classify accepts, registered with schemathesis (CLI and tests).

A JSON Schema can only say "bytes"; a body of random bytes is schema-valid yet not an image, and /classify rightly
answers 400. These strategies tell schemathesis what a valid body of each media type looks like: a small image
file of random size, mode and pixels in that format, so positive cases reach the model and its 200 answer.
Loaded by the schemathesis CLI through schemathesis.toml (`hooks`), and imported by tests/reliability.
"""
from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF", "image/bmp": "BMP",
           "image/tiff": "TIFF"}
MODES = ("RGB", "L", "RGBA", "P")
MAX_SIDE_PX = 48


@st.composite
def image_files(draw, formats: tuple[str, ...]) -> bytes:
    """An image file: one of `formats`, 1..48 px a side, any of the common modes, noise or one colour."""
    image_format = draw(st.sampled_from(formats))
    width, height = draw(st.integers(1, MAX_SIDE_PX)), draw(st.integers(1, MAX_SIDE_PX))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if draw(st.booleans()):
        pixels[:] = pixels[0, 0]
    image = Image.fromarray(pixels, "RGB")
    mode = draw(st.sampled_from(MODES))
    if image_format == "JPEG" and mode in ("RGBA", "P"):
        mode = "RGB"  # JPEG has no alpha nor palette
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, image_format)
    return buffer.getvalue()


for media_type, image_format in FORMATS.items():
    schemathesis.openapi.media_type(media_type, image_files((image_format,)))
# A body sent as octet-stream, and each file of a multipart form (`format: binary`), is an image file of any
# accepted format: the decoder reads its signature.
schemathesis.openapi.media_type("application/octet-stream", image_files(tuple(FORMATS.values())))
schemathesis.openapi.format("binary", image_files(tuple(FORMATS.values())))
