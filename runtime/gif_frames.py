"""What Pillow makes of a GIF's first frame once it has read its image descriptor, found before Image.open: the size,
the area it fills, the transparent index.

Pillow grows a GIF to cover a first frame that reaches beyond its logical screen, and with a disposal method that
restores the background fills the frame's area (1 byte a pixel, kept with the picture), while it opens the file
(GifImagePlugin._seek(0)): before its size can be checked against max_pixels (a 37-byte GIF whose frame covers
12000 x 12000 had 140 MB filled) or its decode memory reserved (runtime.decode_memory.gif_peak_bytes counts the fill).
Pillow's own check there only warns below twice its limit. The walk follows _seek(0) block by block (its quirks
included: after an extension other than a comment it reads sub-blocks up to an empty one, even when the first was
empty; a NETSCAPE2.0 block's next one is read inside), so it finds the descriptor Pillow finds.

Pillow also keeps every sub-block of a comment before the first frame as its own bytes object while it opens the
file: 20 MB of one-byte sub-blocks held ~840 MB and seconds of CPU, outside the decode budget. So the extension
blocks before the first frame may take at most `max_extension_bytes` of the file (the service: its PNG text limit);
beyond it the walk stops and raises ExtensionsTooLarge, before Pillow sees the file.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
SCREEN_BYTES = 13  # signature, logical screen width and height, flags, background, aspect
EXTENSION, IMAGE, TRAILER = 0x21, 0x2C, 0x3B
GRAPHIC_CONTROL, COMMENT, APPLICATION = 0xF9, 0xFE, 0xFF
RESTORE_BACKGROUND = 2  # a graphic control's disposal method; 3 and above restore the previous frame


class GifFirstFrame(NamedTuple):
    size: tuple[int, int]  # the logical screen, grown to cover the frame: Pillow's image.size
    filled_pixels: int  # the frame's area where Pillow fills it while opening the file, else 0
    transparent: bool  # a graphic control gives a transparent index: the picture is composited on white


class ExtensionsTooLarge(ValueError):
    """The extension blocks before a GIF's first frame take more of the file than allowed."""


def gif_first_frame(data: bytes, max_extension_bytes: int | None = None) -> GifFirstFrame:
    """What Pillow makes of the GIF's first frame once it has read its descriptor; the screen's size, nothing filled,
    where no descriptor is found (Pillow then fails to open it). ExtensionsTooLarge when the extension blocks before
    that descriptor pass max_extension_bytes (None: no limit)."""
    if len(data) < SCREEN_BYTES:
        return GifFirstFrame((0, 0), 0, False)
    width, height = struct.unpack_from("<HH", data, 6)
    flags = data[10]
    pos = SCREEN_BYTES + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # past the global colour table
    extension_bytes, disposal, transparent = 0, 0, False
    while pos < len(data) and data[pos] != TRAILER:
        kind, pos = data[pos], pos + 1
        if kind == IMAGE:
            if pos + 9 > len(data):
                break
            left, top, frame_width, frame_height = struct.unpack_from("<HHHH", data, pos)
            # Pillow fills the area to restore the background, or (with nothing decoded yet) the previous frame when a
            # transparent index stands for it.
            filled = disposal == RESTORE_BACKGROUND or (disposal > RESTORE_BACKGROUND and transparent)
            return GifFirstFrame((max(left + frame_width, width), max(top + frame_height, height)),
                                 frame_width * frame_height if filled else 0, transparent)
        if kind == EXTENSION:
            if pos < len(data) and data[pos] == GRAPHIC_CONTROL:
                block, _ = sub_block(data, pos + 1)
                if block:  # as Pillow: a disposal of 0 (unspecified) keeps an earlier one, a transparent index stays
                    disposal = (block[0] >> 2) & 7 or disposal
                    transparent = transparent or bool(block[0] & 1)
            start, pos = pos, past_extension(data, pos, max_extension_bytes)
            extension_bytes += pos - start
            if max_extension_bytes is not None and extension_bytes > max_extension_bytes:
                raise ExtensionsTooLarge(f"the GIF's extension blocks before its first frame are over "
                                         f"{max_extension_bytes} bytes")
    return GifFirstFrame((width, height), 0, False)


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
