"""Limits on the metadata Pillow reads into memory while it opens an image, before the decode budget is reserved
(runtime.decode_memory counts pixels): a PNG's text chunks, and a GIF's extension blocks before its first frame
(runtime/gif_frames.py)."""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from PIL import PngImagePlugin

# The text (XMP, comments) a PNG may hold, all its chunks together, decompressed (png_text_limited). One chunk
# may still take up to Pillow's MAX_TEXT_CHUNK (1 MiB) while it decompresses: that limit also bounds an embedded ICC
# profile (iCCP), and real ones reach it. A GIF's extension blocks before its first frame (comments, XMP), which
# Pillow reads while opening it, are held to the same (runtime/gif_frames.py).
MAX_METADATA_BYTES = 512 * 1024


@dataclass
class ServicesRunning:
    """Services running in this process: the first to start lowers Pillow's PNG text limit, the last to stop gives
    Pillow's own back (png_text_limited)."""

    services: int = 0
    pillows_own: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_PNG_TEXT = ServicesRunning()


@contextmanager
def png_text_limited() -> Iterator[None]:
    """Pillow's limit on a PNG's text lowered to the service's policy while the service runs (its lifespan), and
    Pillow's own again after: it is a module global, and training and export may share this interpreter (the tests
    do) and keep Pillow's.

    A PNG's text chunks are decompressed into image.info while its header is read, before the decode budget is
    reserved (runtime.decode_memory counts pixels): Pillow lets an image hold 64 MiB of them, which a 66 KB file fills.
    The service reads only an XMP orientation from them: MAX_METADATA_BYTES in all, beyond it a 400 corrupt_image. A
    single chunk keeps Pillow's own limit (MAX_TEXT_CHUNK, 1 MiB), which is also an ICC profile's (a 700 KiB one is
    valid)."""
    with _PNG_TEXT.lock:  # services may start and stop in threads of one process (the tests' do)
        if _PNG_TEXT.services == 0:
            _PNG_TEXT.pillows_own = PngImagePlugin.MAX_TEXT_MEMORY
            PngImagePlugin.MAX_TEXT_MEMORY = MAX_METADATA_BYTES
        _PNG_TEXT.services += 1
    try:
        yield
    finally:
        with _PNG_TEXT.lock:
            _PNG_TEXT.services -= 1
            if _PNG_TEXT.services == 0:
                PngImagePlugin.MAX_TEXT_MEMORY = _PNG_TEXT.pillows_own
