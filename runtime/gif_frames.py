"""The size Pillow gives a GIF once it has read its first frame's image descriptor, found before Image.open.

Pillow grows a GIF to cover a first frame that reaches beyond its logical screen, and with a disposal method fills
the frame's area, while it opens the file (GifImagePlugin._seek(0)): before its size can be checked against
max_pixels (a 37-byte GIF whose frame covers 12000 x 12000 had 140 MB filled). Pillow's own check there only warns
below twice its limit. The walk follows _seek(0) block by block (its quirks included: after an extension other than a
comment it reads sub-blocks up to an empty one, even when the first was empty; a NETSCAPE2.0 block's next one is
read inside), so it finds the descriptor Pillow finds.

Pillow also keeps every sub-block of a comment before the first frame as its own bytes object while it opens the
file: 20 MB of one-byte sub-blocks held ~840 MB and seconds of CPU, outside the decode budget. So the extension
blocks before the first frame may take at most `max_extension_bytes` of the file (the service: its PNG text limit);
beyond it the walk stops and raises ExtensionsTooLarge, before Pillow sees the file.
"""
from __future__ import annotations

import struct

GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
SCREEN_BYTES = 13  # signature, logical screen width and height, flags, background, aspect
EXTENSION, IMAGE, TRAILER = 0x21, 0x2C, 0x3B
COMMENT, APPLICATION = 0xFE, 0xFF


class ExtensionsTooLarge(ValueError):
    """The extension blocks before a GIF's first frame take more of the file than allowed."""


def gif_first_frame_size(data: bytes, max_extension_bytes: int | None = None) -> tuple[int, int]:
    """The GIF's size once Pillow has read its first frame's descriptor: the logical screen, grown to cover the
    frame; the screen's where no descriptor is found (Pillow then fails to open it). ExtensionsTooLarge when the
    extension blocks before that descriptor pass max_extension_bytes (None: no limit)."""
    if len(data) < SCREEN_BYTES:
        return 0, 0
    width, height = struct.unpack_from("<HH", data, 6)
    flags = data[10]
    pos = SCREEN_BYTES + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # past the global colour table
    extension_bytes = 0
    while pos < len(data) and data[pos] != TRAILER:
        kind, pos = data[pos], pos + 1
        if kind == IMAGE:
            if pos + 9 > len(data):
                break
            left, top, frame_width, frame_height = struct.unpack_from("<HHHH", data, pos)
            return max(left + frame_width, width), max(top + frame_height, height)
        if kind == EXTENSION:
            start, pos = pos, past_extension(data, pos, max_extension_bytes)
            extension_bytes += pos - start
            if max_extension_bytes is not None and extension_bytes > max_extension_bytes:
                raise ExtensionsTooLarge(f"the GIF's extension blocks before its first frame are over "
                                         f"{max_extension_bytes} bytes")
    return width, height


def past_extension(data: bytes, pos: int, max_bytes: int | None = None) -> int:
    """Where Pillow's reading of the extension whose label is at pos ends (the walk stops early, somewhere past
    pos + max_bytes, once the extension is longer than that)."""
    end = len(data) if max_bytes is None else min(len(data), pos + max_bytes + 1)
    label = data[pos] if pos < len(data) else None
    block, pos = sub_block(data, pos + 1)
    if label == COMMENT:  # read up to an empty sub-block, the first included
        while block and pos < end:
            block, pos = sub_block(data, pos)
        return pos
    if label == APPLICATION and block is not None and block.startswith(b"NETSCAPE2.0"):
        block, pos = sub_block(data, pos)
    while pos < end:  # then on to an empty sub-block, whatever it has read
        block, pos = sub_block(data, pos)
        if not block:
            return pos
    return pos


def sub_block(data: bytes, pos: int) -> tuple[bytes | None, int]:
    """Pillow's GifImageFile.data(): the sub-block at pos (None for a length of 0 or the end), and where it ends."""
    if pos < len(data) and data[pos]:
        return data[pos + 1:pos + 1 + data[pos]], pos + 1 + data[pos]
    return None, pos + 1
