"""Decode memory: the peak each image's decode holds (estimated from its header, measured in a fresh process), the
budget that bounds it across decode threads (decode_memory_mb), alpha composited a strip at a time with the very
pixels of a whole-picture composite, and the sliver whose resize alone would take gigabytes refused from its header."""
from __future__ import annotations

import io
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, PngImagePlugin

from runtime.decode_memory import decode_peak_bytes, decoder_bytes, gif_peak_bytes, resized_size
from runtime.gif_frames import gif_first_frame
from runtime.metadata_limits import MAX_METADATA_BYTES, png_text_limited
from runtime.preprocess import ImageError, eval_transform, opened_image, preprocess, to_rgb
from runtime.repository import Preprocess
from runtime.transparency import alpha_strip_rows
from service.decode_budget import MIB, DecodeAbandoned, DecodeBudget, DecodeWaitTimeout
from service.settings import Settings
from tests.service.conftest import metric

REPO = Path(__file__).resolve().parents[2]
SPEC = Preprocess(resize_px=256, crop_px=224, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def composited_whole(image: Image.Image) -> np.ndarray:
    """The reference: the whole picture converted to RGBA and composited on a white picture of its size."""
    rgba = image.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB"))


COLOUR_KEYS = {"P": 5, "P-bytes": bytes(range(0, 256, 4)), "L-key": 7, "RGB-key": (7, 8, 9), "1-key": 0}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", *COLOUR_KEYS])
def test_alpha_on_white_a_strip_at_a_time_equals_the_whole_composite(mode):
    rng = np.random.default_rng(7)
    height = 2 * alpha_strip_rows(1301) + 37  # two whole strips and a short one
    rgba = Image.fromarray(rng.integers(0, 256, (height, 1301, 4), dtype=np.uint8), "RGBA")
    if mode.startswith("P"):
        image = rgba.convert("RGB").quantize(64)
    else:
        image = rgba.convert(mode.removesuffix("-key"))
    if mode in COLOUR_KEYS:
        image.info["transparency"] = COLOUR_KEYS[mode]
        image.putpixel((3, 5), COLOUR_KEYS[mode] if mode.endswith("key") else 5)  # at least one transparent pixel
    assert np.array_equal(np.asarray(to_rgb(image)), composited_whole(image))


def test_a_sliver_whose_resize_would_take_gigabytes_is_refused_from_its_header():
    """4 x 100000 pixels (2.6 KB as PNG) resize to 256 x 6400000: 6.5 GB. Refused before decoding, in both modes."""
    data = encoded(Image.new("RGB", (4, 100_000), (1, 2, 3)), "PNG")
    for mode in ("exact", "fast"):
        with pytest.raises(ImageError) as refused:
            preprocess(data, SPEC, 40_000_000, mode)
        assert refused.value.code == "too_many_pixels"
        assert "256x6400000 = 1638400000 pixels, over the limit of 40000000" in refused.value.message
    # Squashed to 256 x 256, the same picture is no bomb.
    assert preprocess(data, SPEC.model_copy(update={"crop_mode": "squash"}), 40_000_000).shape == (3, 224, 224)


def test_an_orientation_that_only_the_decode_reveals_is_still_applied():
    """A PNG whose eXIf chunk (no Orientation) precedes its pixels and whose XMP (tiff:Orientation 6) follows them:
    estimating the decode's memory reads the header only, and must not leave PIL's EXIF cache without the turn."""
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x010F] = "maker"
    png = encoded(picture, "PNG", exif=exif)
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    body = b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp
    chunk = struct.pack(">I", len(body)) + b"iTXt" + body + struct.pack(">I", zlib.crc32(b"iTXt" + body))
    end = png.rindex(b"IEND") - 4
    data = png[:end] + chunk + png[end:]
    reference = Image.open(io.BytesIO(data))
    reference.load()
    upright = ImageOps.exif_transpose(reference)
    assert upright.size == (300, 500)  # turned
    assert np.array_equal(preprocess(data, SPEC, 10**8), eval_transform(upright.convert("RGB"), SPEC))


def test_the_resize_bound_counts_the_resized_picture_not_the_source():
    assert resized_size((4000, 3000), SPEC, crop_region_only=False) == (341, 256)
    assert resized_size((100, 20_000), SPEC, crop_region_only=False) == (256, 51_200)
    assert resized_size((4000, 3000), SPEC, crop_region_only=True) == (224, 224)


# Pictures of ~7.5 MP in each mode the decoders produce; (name, PIL mode or recipe, format, options: save options,
# and "fast", "squash", "size", "loose"). A PNG counts as EXIF-turned (its eXIf chunk may follow the pixels): an RGB
# one is estimated at twice its peak.
PEAK_CASES = {
    "jpeg": ("RGB", "JPEG", {}),
    "jpeg-rotated": ("RGB", "JPEG", {"orientation": 6}),
    "jpeg-cmyk": ("CMYK", "JPEG", {}),
    "jpeg-fast": ("RGB", "JPEG", {"fast": True}),
    "png-rgb": ("RGB", "PNG", {"loose": 2.0}),
    "png-grey": ("L", "PNG", {}),
    "png-rgba": ("RGBA", "PNG", {}),
    "png-palette-transparent": ("P", "PNG", {"transparency": 3}),
    "png-rgb-colour-key": ("RGB", "PNG", {"transparency": (0, 0, 0)}),  # tRNS: composited on white as alpha is
    "png-grey-colour-key": ("L", "PNG", {"transparency": 0}),
    "png-16-bit": ("I;16", "PNG", {}),
    "png-tall": ("RGB", "PNG", {"size": (150, 40_000)}),  # the resize (256 x 68266) is the larger peak
    # Squashed to 256 x 256, PIL's filter weights for a 2,000,000-pixel row: 64 MB (1.3 GB for 40,000,000).
    "png-sliver-squashed": ("RGB", "PNG", {"size": (2_000_000, 1), "squash": True}),
    "jpeg-progressive": ("RGB", "JPEG", {"progressive": True}),  # libjpeg keeps every coefficient: 2 bytes each
    "jpeg-progressive-444-fast": ("RGB", "JPEG", {"progressive": True, "subsampling": 0, "fast": True}),
    "jpeg-progressive-cmyk": ("CMYK", "JPEG", {"progressive": True}),
    "webp": ("RGB", "WEBP", {"lossless": True}),  # libwebp's frame buffers stay with the picture
    "webp-rgba": ("RGBA", "WEBP", {}),
    "tiff-deflate-one-strip": ("RGB", "TIFF", {"compression": "tiff_adobe_deflate", "tiffinfo": {278: 2500}}),
    "gif": ("P", "GIF", {}),
    # Pillow fills the frame's area (1 byte a pixel) while it opens the file, and keeps it through the decode.
    "gif-restore-background": ("P", "GIF", {"disposal": 2, "transparency": 3, "size": (4000, 3500)}),
}
MEASURE = r"""
import sys
from contextlib import nullcontext
from runtime.preprocess import preprocess
from runtime.repository import Preprocess
spec = Preprocess.model_validate_json(sys.argv[1])
data = open(sys.argv[2], "rb").read()
reserved = []
def reserve(nbytes):  # what the service's decode budget is asked to hold
    reserved.append(nbytes)
    return nullcontext()
def rss(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = rss("VmRSS:")
preprocess(data, spec, 10**9, sys.argv[3], reserve=reserve)
print(rss("VmHWM:") - before, *reserved)
"""


def peak_case_file(tmp_path, name: str):
    mode, kind, options = PEAK_CASES[name]
    size = options.get("size", (3000, 2500))
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 4), dtype=np.uint8)  # compresses, still not flat
    picture = Image.fromarray(noise, "RGBA").resize(size, Image.Resampling.NEAREST)
    if mode == "I;16":
        picture = Image.fromarray(np.asarray(picture.convert("L"), dtype=np.uint16) * 257)
    elif mode == "P":
        picture = picture.convert("RGB").quantize(16)
    else:
        picture = picture.convert(mode)
    save = {key: options[key] for key in ("transparency", "progressive", "subsampling", "lossless", "compression",
                                          "tiffinfo", "disposal") if key in options}
    if "orientation" in options:
        exif = Image.Exif()
        exif[0x0112] = options["orientation"]
        save["exif"] = exif
    path = tmp_path / f"{name}.{kind.lower()}"
    picture.save(path, kind, **save)
    return path, options.get("fast", False)


@pytest.mark.parametrize("name", list(PEAK_CASES))
def test_the_estimated_peak_covers_the_measured_one(tmp_path, name):
    """In a fresh process, the peak RSS growth of preprocessing each kind of picture (Linux's VmHWM, reset just before)
    stays within what preprocess reserves from the budget, plus 8 MiB (the interpreter, the codecs' own buffers); and
    that estimate is not so loose it would starve concurrency (under 1.5x the measured peak, but an RGB PNG's)."""
    path, fast = peak_case_file(tmp_path, name)
    spec = SPEC.model_copy(update={"crop_mode": "squash"}) if PEAK_CASES[name][2].get("squash") else SPEC
    command = [sys.executable, "-c", MEASURE, spec.model_dump_json(), str(path), "fast" if fast else "exact"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    measured, estimate = map(int, run.stdout.split())
    figures = f"{name}: measured {measured / MIB:.1f} MiB, estimated {estimate / MIB:.1f}"
    print(figures)
    assert measured <= estimate + 8 * MIB, figures
    assert estimate <= PEAK_CASES[name][2].get("loose", 1.5) * measured + 8 * MIB, figures


def test_a_picture_over_the_whole_budget_is_refused_before_decoding():
    budget = DecodeBudget(8 * MIB)
    with pytest.raises(ImageError) as refused, budget.reserved(9 * MIB, time.monotonic() + 5, threading.Event()):
        pass
    assert refused.value.code == "too_many_pixels"
    assert "9 MiB, over the decode memory budget of 8 MiB (decode_memory_mb)" in refused.value.message
    assert budget.reserved_bytes == 0


def test_waiters_are_served_first_come_first_served():
    """A large picture waiting for memory is not overtaken by a small one that arrived after it."""
    budget, order = DecodeBudget(10), []
    holding = budget.reserved(8, time.monotonic() + 5, threading.Event())
    holding.__enter__()

    def decode(name: str, nbytes: int) -> None:
        with budget.reserved(nbytes, time.monotonic() + 5, threading.Event()):
            order.append(name)

    large = threading.Thread(target=decode, args=("large", 10))
    large.start()
    while not budget._waiting:
        time.sleep(0.001)
    small = threading.Thread(target=decode, args=("small", 1))  # 2 bytes are free, but the large one is first
    small.start()
    time.sleep(0.05)
    assert order == []
    holding.__exit__(None, None, None)
    large.join(5)
    small.join(5)
    assert order == ["large", "small"]
    assert budget.reserved_bytes == 0


def test_a_waiter_gives_up_at_its_deadline_or_once_abandoned():
    budget = DecodeBudget(10)
    with budget.reserved(10, time.monotonic() + 5, threading.Event()):
        started = time.monotonic()
        with pytest.raises(DecodeWaitTimeout), budget.reserved(1, started + 0.1, threading.Event()):
            pass
        assert 0.09 <= time.monotonic() - started < 2
        abandoned, outcome = threading.Event(), []

        def wait() -> None:
            try:
                with budget.reserved(1, time.monotonic() + 30, abandoned):
                    outcome.append("decoded")
            except DecodeAbandoned:
                outcome.append("abandoned")

        waiter = threading.Thread(target=wait)
        waiter.start()
        while not budget._waiting:
            time.sleep(0.001)
        abandoned.set()
        budget.wake()
        waiter.join(5)
        assert outcome == ["abandoned"]
        assert not budget._waiting
    assert budget.reserved_bytes == 0


def test_the_budget_must_hold_the_largest_allowed_picture():
    with pytest.raises(ValueError, match=r"decode_memory_mb \(100\) is under 311: a PNG with alpha or a rotated JPEG "
                                         r"of max_pixels \(40000000\) could never be decoded"):
        Settings(decode_memory_mb=100)
    assert Settings(decode_memory_mb=100, max_pixels=10_000_000).decode_memory_mb == 100


def png_of(mode: str, size: tuple[int, int]) -> bytes:
    return encoded(Image.new(mode, size, 200 if mode in ("L", "I;16") else (200, 100, 50, 128)), "PNG")


def test_the_png_text_limit_lasts_as_long_as_the_service(launch, model_repository):
    """Pillow's limit on a PNG's text is a module global: the service lowers it while it runs, and gives Pillow's own
    back when it stops (it stayed lowered for the rest of the process, training's and export's tests included)."""
    pillows_own = 64 * ImageFile.SAFEBLOCK
    assert PngImagePlugin.MAX_TEXT_MEMORY == pillows_own  # no service runs in this process before this test
    with launch(model_repository):
        assert PngImagePlugin.MAX_TEXT_MEMORY == MAX_METADATA_BYTES
    assert PngImagePlugin.MAX_TEXT_MEMORY == pillows_own


def test_the_service_bounds_decode_memory(launch, model_repository):
    """Over HTTP: a picture that fits the budget is classified and gives its share back (the gauge reads 0 after); one
    whose decode needs more than all of it gets 413; one that waits for memory past its deadline gets 504, and the
    next one is classified once the memory is free."""
    rgba = png_of("RGBA", (1000, 1000))  # decoding holds 12.6 MiB: 4 B/px for the RGBA picture, 4 for its RGB, strips
    floats = encoded(Image.new("F", (1000, 1000), 0.5), "TIFF")  # 13.4 MiB: 4 + 4 (NumPy's) + 2 (8-bit) + 4 (RGB)
    # request_timeout_ms also bounds the posts that must succeed (decode and inference): 3 s leaves room for a pause.
    with launch(model_repository, max_pixels=1_000_000, decode_memory_mb=13, request_timeout_ms=3000) as url:
        def post(data: bytes) -> httpx.Response:
            return httpx.post(f"{url}/classify", content=data, timeout=30,
                              headers={"content-type": "image/tiff" if data.startswith(b"II") else "image/png"})

        assert post(rgba).status_code == 200
        refused = post(floats)
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"]["code"] == "too_many_pixels"
        assert "over the decode memory budget of 13 MiB" in refused.json()["error"]["message"]
        budget = url.app.state.service.decode_budget
        holding = budget.reserved(4 * MIB, time.monotonic() + 30, threading.Event())
        holding.__enter__()  # 4 MiB held elsewhere (for 30 s): the 12.6 MiB decode waits, past its 3 s deadline
        try:
            waited = post(rgba)
            assert waited.status_code == 504, waited.text
            assert waited.json()["error"]["code"] == "deadline"
        finally:
            holding.__exit__(None, None, None)
        assert post(rgba).status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert "convnext_decode_memory_bytes 0.0" in metrics
        assert budget.reserved_bytes == 0 and not budget._waiting


def test_preprocess_time_is_decode_and_transform_and_the_wait_for_decode_memory_is_reported_apart(
        launch, model_repository, real_photos):
    """An image held up 0.5 s by another request's decode memory: its preprocess_ms and convnext_preprocess_seconds
    are its own decode + transform (they were over 500 ms, the wait included); the wait is in
    convnext_decode_memory_wait_seconds."""
    with launch(model_repository) as url:
        budget = url.app.state.service.decode_budget
        held = threading.Event()

        def hold_the_budget() -> None:  # another request's decode holding all of decode_memory_mb
            with budget.reserved(budget.limit_bytes, time.monotonic() + 10, threading.Event()):
                held.set()
                give_up = time.monotonic() + 10
                while not budget._waiting and time.monotonic() < give_up:
                    time.sleep(0.001)
                time.sleep(0.5)  # from the moment the image waits

        holder = threading.Thread(target=hold_the_budget)
        holder.start()
        assert held.wait(5)
        answer = httpx.post(f"{url}/classify", content=real_photos[0].read_bytes(),
                            headers={"content-type": "image/jpeg"}, timeout=30)
        holder.join()
        assert answer.status_code == 200, answer.text
        timings = answer.json()["results"][0]["timings"]
        assert timings["preprocess_ms"] < 400 and timings["total_ms"] >= 500  # the wait is still in the total
        assert metric(url, "convnext_preprocess_seconds_sum") < 0.4
        assert metric(url, "convnext_decode_memory_wait_seconds_count") == 2  # the holder's (0 s) and the image's
        assert metric(url, "convnext_decode_memory_wait_seconds_sum") >= 0.5


def test_every_wait_for_decode_memory_is_reported_however_it_ends():
    """Fitted at once (0), given the memory after a wait, or ended by the deadline or by the request leaving: each is
    reported once; a picture over the whole budget never waited and is not."""
    waits: list[float] = []
    budget = DecodeBudget(10, observe_wait=waits.append)
    with pytest.raises(ImageError), budget.reserved(11, time.monotonic() + 5, threading.Event()):
        pass
    assert waits == []
    with budget.reserved(10, time.monotonic() + 5, threading.Event()) as waited_s:
        assert waits == [waited_s] and waited_s < 0.1
        with pytest.raises(DecodeWaitTimeout), budget.reserved(1, time.monotonic() + 0.1, threading.Event()):
            pass
        abandoned = threading.Event()
        threading.Timer(0.1, lambda: (abandoned.set(), budget.wake())).start()
        with pytest.raises(DecodeAbandoned), budget.reserved(1, time.monotonic() + 30, abandoned):
            pass
    assert len(waits) == 3 and all(0.09 <= w < 2 for w in waits[1:])
    holding = budget.reserved(10, time.monotonic() + 5, threading.Event())
    holding.__enter__()
    threading.Timer(0.1, holding.__exit__, (None, None, None)).start()
    with budget.reserved(1, time.monotonic() + 5, threading.Event()) as waited_s:
        assert 0.09 <= waited_s < 2
    assert len(waits) == 5 and waits[-1] == waited_s


def test_a_gifs_first_frame_is_filled_within_its_reservation(service_url, monkeypatch):
    """Pillow fills a GIF's first frame's area while it opens the file when the frame's disposal restores the
    background (1 byte a pixel: 38 MiB for a 37-byte GIF at the default max_pixels), and keeps it through the decode.
    That was filled before the decode memory was reserved (and held while the image waited for it), and never counted.
    The GIF's peak, the fill included, is known from its bytes and reserved before Pillow opens it."""
    frame = (2000, 1500)
    data = encoded(Image.new("P", frame, 3), "GIF", disposal=2)
    service = service_url.app.state.service
    spec = service.version.manifest.preprocess
    peak = gif_peak_bytes(gif_first_frame(data), resized_size(frame, spec, False), spec.interpolation)
    assert peak >= (1 + 4 + 1) * frame[0] * frame[1]  # the picture, its RGB and the fill
    fills, fill = [], Image.core.fill

    def recorded_fill(mode, size, *color):
        fills.append((size, service.decode_budget.reserved_bytes))
        return fill(mode, size, *color)

    monkeypatch.setattr(Image.core, "fill", recorded_fill)
    response = httpx.post(f"{service_url}/classify", content=data, headers={"content-type": "image/gif"}, timeout=30)
    assert response.status_code == 200, response.text
    # Filled once, while the GIF's peak was held (Pillow's first Image.open in a process also fills a 1 x 256 picture
    # as it loads its plugins).
    assert [(size, reserved) for size, reserved in fills if size == frame] == [(frame, peak)]


def png_with_text(chunks: int, text_bytes: int) -> bytes:
    """A 1x1 PNG with `chunks` zTXt chunks before its pixels, each decompressing to text_bytes (1 MiB: a 1 KB chunk)."""
    plain = encoded(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG")
    text = zlib.compress(b"a" * text_bytes, 9)
    extra = b"".join(struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
                     for body in (b"k%d\x00\x00" % i + text for i in range(chunks)))
    return plain[:33] + extra + plain[33:]  # after the signature and IHDR


def test_a_png_may_hold_half_a_mib_of_text_in_the_service(service_url):
    """Pillow decompresses a PNG's text chunks into memory while it reads the header, before the decode budget is
    reserved, and allowed 64 MiB of them an image: 63 zTXt chunks of 1 MiB (a 66 KB file) were held uncounted, in each
    decode thread. The service allows 512 KiB of text an image: more is 400 corrupt_image."""
    def post(data: bytes) -> httpx.Response:
        return httpx.post(f"{service_url}/classify", content=data, headers={"content-type": "image/png"}, timeout=30)

    for chunks, text_bytes in ((63, MIB - 64), (1, MIB - 64), (2, 300_000)):
        refused = post(png_with_text(chunks, text_bytes))
        assert refused.status_code == 400, (chunks, refused.text)
        assert refused.json()["error"]["code"] == "corrupt_image"
    assert post(png_with_text(4, 120_000)).status_code == 200


def test_a_png_with_a_large_icc_profile_decodes_in_the_service(service_url):
    """Pillow decompresses an iCCP chunk with MAX_TEXT_CHUNK as its limit: the service's text cap lowered it to 512 KiB
    as well, so a valid PNG with a 700 KiB profile (a LUT-heavy one) was 400 corrupt_image."""
    profile = np.random.default_rng(0).integers(0, 256, 700 * 1024, dtype=np.uint8).tobytes()
    data = encoded(Image.new("RGB", (64, 48), (10, 120, 200)), "PNG", icc_profile=profile)
    assert Image.open(io.BytesIO(data)).info["icc_profile"] == profile
    response = httpx.post(f"{service_url}/classify", content=data, headers={"content-type": "image/png"}, timeout=30)
    assert response.status_code == 200, response.text


def test_the_estimate_reads_the_header_only():
    """opened_image decodes no pixel: the estimate of a 40-MP PNG is known while the process holds a few MB."""
    data = png_of("RGBA", (8000, 5000))
    image, declared, _ = opened_image(data, 10**9, None)
    assert decode_peak_bytes(image, declared, resized_size(image.size, SPEC, False), "bicubic") >= 8 * 40_000_000
    assert image.tile  # still to be decoded


def test_a_client_that_leaves_while_its_image_waits_for_memory_stops_waiting(launch, model_repository):
    """The wait ends when the client does (not at the request's deadline): its decode thread and its place at the
    head of the line are given back, and the image is never decoded."""
    data = png_of("RGBA", (1000, 1000))
    with launch(model_repository, max_pixels=1_000_000, decode_memory_mb=13, request_timeout_ms=20_000) as url:
        budget = url.app.state.service.decode_budget
        holding = budget.reserved(4 * MIB, time.monotonic() + 60, threading.Event())
        holding.__enter__()
        try:
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port))) as client:
                client.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                deadline = time.monotonic() + 10
                while not budget._waiting:
                    assert time.monotonic() < deadline, "the image never waited for memory"
                    time.sleep(0.01)
            left = time.monotonic()  # the client has closed its connection
            while budget._waiting:
                assert time.monotonic() - left < 5, "the image still waits for memory after its client left"
                time.sleep(0.01)
        finally:
            holding.__exit__(None, None, None)
        assert budget.reserved_bytes == 0
        assert 'convnext_rejected_total{reason="client_disconnected"} 1.0' in httpx.get(f"{url}/metrics").text


def deflate_grey_tiff(*extra: tuple, strip: bytes = bytes(64), size: tuple[int, int] = (16, 16)) -> bytes:
    """An 8-bit grey deflate TIFF of one strip, with `extra` (tag, type, count, value: an int or <= 4 inline bytes)
    entries; decoded by libtiff, as every compressed TIFF is."""
    width, height = size
    entries = sorted([(256, 3, 1, width), (257, 3, 1, height), (258, 3, 1, 8), (259, 3, 1, 8), (262, 3, 1, 1),
                      (277, 3, 1, 1), (278, 3, 1, height), (279, 4, 1, len(strip)), *extra])
    if not any(tag in (273, 324) for tag, *_ in extra):
        entries = sorted([*entries, (273, 4, 1, None)])  # the strip's offset: after the directory
    data_offset = 8 + 2 + 12 * len(entries) + 4
    directory = b"".join(struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0") if isinstance(value, bytes)
                         else struct.pack("<HHII", tag, kind, count, data_offset if value is None else value)
                         for tag, kind, count, value in entries)
    return b"II*\x00" + struct.pack("<IH", 8, len(entries)) + directory + bytes(4) + strip


@pytest.mark.parametrize("kind, entry", [("ascii", (2, 4, b"AAA\0")), ("byte", (1, 4, b"\1\2\3\4")),
                                         ("undefined", (7, 4, b"\1\2\3\4"))])
def test_tile_tags_in_text_or_bytes_are_refused_not_multiplied(kind, entry):
    """A TileWidth of text times the TileLength is Python repeating the text (210 bytes asked for gigabytes); libtiff,
    which decodes such a file, refuses it too."""
    image = Image.open(io.BytesIO(deflate_grey_tiff((322, *entry), (323, 4, 1, 2**22))))
    assert not isinstance(image.tag_v2[322], int)
    with pytest.raises(ValueError, match="not a count"):
        decoder_bytes(image, image.size)


def test_tile_sizes_count_without_tile_offsets_as_libtiff_decodes_them():
    """libtiff calls a file tiled when it has a tile size, whatever holds its offsets: a 65 KB file of 16 x 16 pixels
    in one 16 x 2**22 tile makes it hold 64 MiB, which the estimate must reserve."""
    image = Image.open(io.BytesIO(deflate_grey_tiff((322, 4, 1, 16), (323, 4, 1, 2**22))))
    assert 324 not in image.tag_v2
    assert decoder_bytes(image, image.size) == 16 * 2**22


def test_strip_offsets_stored_as_tile_offsets_count_as_strips():
    """No tile size: libtiff reads tag 324 as the strip offsets, and holds a strip."""
    image = Image.open(io.BytesIO(deflate_grey_tiff((324, 4, 1, None), size=(1000, 2000))))
    assert decoder_bytes(image, image.size) == 1000 * 2000


def test_the_png_text_limit_holds_until_the_last_of_overlapping_services_stops():
    """Two services in one process (tests run them on threads) that stop in the order they started: the limit stays
    while the second runs, and Pillow's own comes back once both have stopped (saving and restoring a value per
    service left the limit lowered for good)."""
    pillows_own = PngImagePlugin.MAX_TEXT_MEMORY
    first, second = png_text_limited(), png_text_limited()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert PngImagePlugin.MAX_TEXT_MEMORY == MAX_METADATA_BYTES  # the second still runs
    second.__exit__(None, None, None)
    assert PngImagePlugin.MAX_TEXT_MEMORY == pillows_own
