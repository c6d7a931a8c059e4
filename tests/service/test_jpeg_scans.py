"""A JPEG's scans are counted from its marker structure before it is decoded (runtime/jpeg_scans.py): one of
thousands of few-byte scans, each a pass over the whole image, is refused, baseline or progressive, however its
segments are arranged; real files, and bytes that only look like scan markers, are not."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from runtime.jpeg_scans import MAX_JPEG_SCANS, scan_count
from runtime.preprocess import ImageError, preprocess
from runtime.repository import Preprocess

SPEC = Preprocess(resize_px=256, crop_px=224, crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225))
MAX_PIXELS = 10**8
# A baseline scan of component 1 with no coded data (Ns 1, Cs 1, tables 0, Ss 0, Se 63, Ah/Al 0): libjpeg warns,
# fills the component with zeros and walks every block of it again.
EMPTY_SCAN = bytes.fromhex("ffda0008010100003f00")


def jpeg(photo: Path, **options) -> bytes:
    buffer = io.BytesIO()
    Image.open(photo).convert("RGB").resize((1200, 900), Image.Resampling.BICUBIC).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def before_eoi(data: bytes, inserted: bytes) -> bytes:
    end = data.rfind(b"\xff\xd9")
    return data[:end] + inserted + data[end:]


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


@pytest.fixture(scope="module")
def photo(real_photos) -> Path:
    return real_photos[1]


@pytest.mark.parametrize("options,scans", [({}, 1), ({"progressive": True}, 10)], ids=["baseline", "progressive"])
def test_a_real_jpeg_is_counted_as_its_encoder_wrote_it_and_decodes(photo, options, scans):
    data = jpeg(photo, **options)
    assert scan_count(data) == scans
    assert preprocess(data, SPEC, MAX_PIXELS, "fast").shape == (3, 224, 224)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_repeated_progressive_scans_are_refused_before_decoding(photo, mode):
    data = jpeg(photo, progressive=True)
    last_scan = data[data.rfind(b"\xff\xda"):data.rfind(b"\xff\xd9")]
    with pytest.raises(ImageError, match=r"a JPEG of more than 100 scans") as refused:
        preprocess(before_eoi(data, last_scan * MAX_JPEG_SCANS), SPEC, MAX_PIXELS, mode)
    assert refused.value.code == "corrupt_image"


def test_empty_baseline_scans_are_refused_too(photo):
    """Pillow calls this file baseline (not progressive): its extra scans carry no coded data at all."""
    bomb = before_eoi(jpeg(photo), EMPTY_SCAN * (MAX_JPEG_SCANS + 1))
    assert not Image.open(io.BytesIO(bomb)).info.get("progressive")
    assert scan_count(bomb) == MAX_JPEG_SCANS + 1  # counted up to one past the bound: enough to refuse it
    with pytest.raises(ImageError, match="more than 100 scans"):
        preprocess(bomb, SPEC, MAX_PIXELS, "exact")


def test_a_comment_holding_an_end_of_image_marker_does_not_cut_the_count_short(photo):
    data = jpeg(photo)
    hiding = segment(0xFE, b"\xff\xd9" * 8)  # a COM segment between scans: its payload is skipped by its length
    bomb = before_eoi(data, hiding + EMPTY_SCAN * (MAX_JPEG_SCANS + 1))
    assert scan_count(bomb) == MAX_JPEG_SCANS + 1


def test_scan_markers_inside_metadata_or_after_the_image_are_not_scans(photo):
    """An APP segment (an ICC profile, EXIF) or a motion photo's appended video may hold FF DA anywhere."""
    data = jpeg(photo, progressive=True)
    look_alikes = b"\xff\xda" * (2 * MAX_JPEG_SCANS)
    with_metadata = data[:2] + segment(0xEF, look_alikes) + data[2:]
    with_video = data + look_alikes
    for accepted in (with_metadata, with_video):
        assert scan_count(accepted) == 10
        assert preprocess(accepted, SPEC, MAX_PIXELS, "exact").shape == (3, 224, 224)


def app0_end(data: bytes) -> int:
    assert data[2:4] == b"\xff\xe0"  # Pillow writes JFIF's APP0 first
    return 4 + int.from_bytes(data[4:6], "big")


@pytest.mark.parametrize("junk", [b"\x00", bytes.fromhex("fffe0000")], ids=["junk-byte", "zero-length-comment"])
def test_junk_between_segments_does_not_stop_the_count(photo, junk):
    """libjpeg skips junk to the next marker (a warning) and reads on after a length under 2: the walk does too, or
    one stray byte after APP0 would hide every scan."""
    data = jpeg(photo, progressive=True)
    bomb = before_eoi(data[:app0_end(data)] + junk + data[app0_end(data):], EMPTY_SCAN * MAX_JPEG_SCANS)
    assert scan_count(bomb) == MAX_JPEG_SCANS + 1
    with pytest.raises(ImageError, match="more than 100 scans"):
        preprocess(bomb, SPEC, MAX_PIXELS, "exact")


def test_the_walk_is_linear_in_runs_of_fill_bytes_and_ends_cleanly_on_them(photo):
    """A run of FF bytes ended by 00 inside coded data made a backtracking pattern quadratic (a 20 MB run: days); a
    file ending in fill bytes made the walk read past its end."""
    data = jpeg(photo)
    first_scan_end = data.index(b"\xff\xda") + 2 + int.from_bytes(data[data.index(b"\xff\xda") + 2:][:2], "big")
    runs = data[:first_scan_end] + (b"\xff" * 200_000 + b"\x00") + data[first_scan_end:] + b"\xff\xda" * 101
    assert scan_count(runs) == 1  # finishes (at once: linear), the look-alikes after EOI not counted
    assert scan_count(data[:first_scan_end] + b"\xff" * 50 + b"\xff\xda" * 101 + b"\xff" * 9) >= 1


def test_a_reserved_marker_with_a_made_up_length_hides_no_scans(photo):
    """With a restart interval, libjpeg steps over a reserved marker (02-BF) inside a scan's data and reads on; a walk
    that skipped the length after it would miss every scan hidden there."""
    data = jpeg(photo, progressive=True, restart_marker_blocks=1)
    first_scan = data.index(b"\xff\xda")
    scan_data = first_scan + 2 + int.from_bytes(data[first_scan + 2:first_scan + 4], "big")
    hidden = EMPTY_SCAN * (MAX_JPEG_SCANS + 1)
    bomb = data[:scan_data] + b"\xff\x02" + (len(hidden) + 2).to_bytes(2, "big") + hidden + data[scan_data:]
    assert scan_count(bomb) == MAX_JPEG_SCANS + 1
    with pytest.raises(ImageError, match="more than 100 scans"):
        preprocess(bomb, SPEC, MAX_PIXELS, "exact")


def test_a_walk_through_thousands_of_markers_stops_and_counts_the_file_as_over(photo):
    data = jpeg(photo)
    markers = b"\xff\x01" * 100_000 + b"\xff\xda" * (MAX_JPEG_SCANS + 1)  # TEM markers, then look-alikes
    assert scan_count(data[:2] + markers + data[2:]) == MAX_JPEG_SCANS + 1
