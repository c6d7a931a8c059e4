"""How many scans a JPEG's primary image has, read from its marker structure before anything is decoded.

libjpeg walks every block of a scan's components once per scan, and a scan can be a dozen bytes (a progressive
refinement, or a baseline scan with no coded data, which libjpeg fills with zeros after a warning Pillow ignores):
20 MB of repeated scans decode for an hour. Encoders write 1-4 scans (baseline) or about 10-18 (progressive), so
MAX_JPEG_SCANS refuses nothing real.

A JPEG is segments (FF, a marker byte, a two-byte length, the payload), and after each SOS (FF DA) segment the
scan's entropy-coded data, in which an FF is followed by 00 (a stuffed byte) or a restart marker (D0-D7) and any
other byte starts the next segment. Counting FF DA in the raw bytes also counts those bytes inside APP and COM
payloads (an ICC profile, EXIF) and after the end-of-image marker (a motion photo's appended video), where they are
arbitrary: that count is an upper bound, and only a file over the bound there is walked (payloads skipped by their
lengths, junk between segments skipped to the next marker as libjpeg does, stopping at EOI). Every search is a
regular expression without backtracking, so the walk stays linear in the file's size.
"""
from __future__ import annotations

import re

MAX_JPEG_SCANS = 100
SOS, EOI = 0xDA, 0xD9
# Read without a length: TEM, the restart markers, and the reserved 02-BF. libjpeg fails on a reserved one between
# segments; inside a scan with a restart interval it steps over its two bytes and reads on (jdmarker.c,
# jpeg_resync_to_restart: "invalid marker"), so a made-up length after it must not hide what follows.
STANDALONE = frozenset({*range(0x01, 0xC0), *range(0xD0, 0xD8)})
# Real files have a few dozen segments outside their scans' data; a walk that meets far more is refused as over.
MAX_MARKERS = 64 * MAX_JPEG_SCANS
# A marker: the last FF of a run (fill bytes) and a byte that is neither 00 (a stuffed FF) nor another FF. Searched
# from wherever the walk stands, it skips junk bytes as libjpeg's next_marker does (with a warning there).
MARKER = re.compile(rb"\xff[^\x00\xff]")
# The end of a scan's entropy-coded data: a marker that is not a restart marker (those belong to the scan).
CODED_DATA_END = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")


def walked_scans(data: bytes, limit: int) -> int:
    """The primary image's SOS segments, walked in file order up to its EOI or the data's end, counted up to
    limit + 1; past MAX_MARKERS markers, limit + 1 (the file counts as over the bound)."""
    scans, pos = 0, 2  # past SOI
    for _ in range(MAX_MARKERS):
        found = MARKER.search(data, pos)
        if found is None:
            return scans
        pos = found.start()
        marker = data[pos + 1]
        if marker == EOI:
            return scans
        if marker in STANDALONE:
            pos += 2
            continue
        # A length under 2 covers nothing past itself: libjpeg reads on after the two length bytes.
        pos += 2 + max(int.from_bytes(data[pos + 2:pos + 4], "big"), 2)
        if marker == SOS:
            scans += 1
            if scans > limit:
                return scans
            coded_end = CODED_DATA_END.search(data, pos)
            if coded_end is None:
                return scans
            pos = coded_end.start()
    return limit + 1


def scan_count(data: bytes, limit: int = MAX_JPEG_SCANS) -> int:
    """The primary image's scans, counted up to limit + 1 (enough to refuse it); within the limit, the number of
    FF DA pairs in the file (an upper bound, at C speed)."""
    upper_bound = data.count(b"\xff\xda")
    return upper_bound if upper_bound <= limit else walked_scans(data, limit)
