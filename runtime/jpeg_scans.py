"""How many scans a JPEG's primary image has, read from its marker structure before anything is decoded.

libjpeg walks every block of a scan's components once per scan, and a scan can be a dozen bytes (a progressive
refinement, or a baseline scan with no coded data, which libjpeg fills with zeros after a warning Pillow ignores):
20 MB of repeated scans decode for an hour. Encoders write 1-4 scans (baseline) or about 10-18 (progressive), so
MAX_JPEG_SCANS refuses nothing real.

A JPEG is segments (FF, a marker byte, a two-byte length, the payload), and after each SOS (FF DA) segment the
scan's entropy-coded data, in which an FF is followed by 00 (a stuffed byte) or a restart marker (D0-D7) and any
other byte starts the next segment. Counting FF DA in the raw bytes would also count those bytes inside APP and COM
payloads (an ICC profile, EXIF) and after the end-of-image marker (a motion photo's appended video), where they are
arbitrary; the walk below skips payloads by their lengths and stops at EOI (FF D9), as libjpeg does. The plain count
from the first scan on runs first, at C speed: only a file over the bound there is walked scan by scan.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import islice

MAX_JPEG_SCANS = 100
SOS, EOI = 0xDA, 0xD9
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and the restart markers: no length follows
# The end of a scan's entropy-coded data: an FF (and fill FFs) followed by a byte that is not 00 or a restart marker.
NEXT_SEGMENT = re.compile(rb"\xff+[^\x00\xff\xd0-\xd7]")


def scan_offsets(data: bytes) -> Iterator[int]:
    """The offset of each SOS segment of the primary image, in file order, up to its EOI (or where the structure
    ends or breaks: what libjpeg would refuse is its to refuse, not this walk's)."""
    pos, end = 2, len(data)  # past SOI
    while pos + 4 <= end and data[pos] == 0xFF:
        while pos + 1 < end and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker = data[pos + 1]
        if marker == EOI:
            return
        if marker in STANDALONE:
            pos += 2
            continue
        segment = pos
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == SOS:
            yield segment
            coded_end = NEXT_SEGMENT.search(data, pos)
            if coded_end is None:
                return
            pos = coded_end.end() - 2


def scan_count(data: bytes, limit: int = MAX_JPEG_SCANS) -> int:
    """The primary image's scans, counted up to limit + 1 (enough to refuse it)."""
    first = next(scan_offsets(data), None)
    if first is None:
        return 0
    upper_bound = data.count(b"\xff\xda", first)  # also counts APP/COM bytes between scans, and trailing data
    if upper_bound <= limit:
        return upper_bound
    return sum(1 for _ in islice(scan_offsets(data), limit + 1))
