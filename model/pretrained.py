"""The official pretrained ConvNeXt checkpoints (facebookresearch/ConvNeXt README); a verified, resumable download;
and timm's pretrained tags of the ConvNeXts built here, with the evaluation transform each was measured with.

Upstream publishes no sha256 for these files, and none could be pinned here without a trusted copy of each, so
the table's `sha256` is None: the first download is trusted (it comes over HTTPS from dl.fbaipublicfiles.com,
or from a mirror you chose), its hash is recorded in a `.sha256` sidecar, and every later cache hit is checked
against that record. A resumed download only joins bytes the server proves are of the same file (If-Range).
"""
from __future__ import annotations

import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import TextIO

from convnext_files import sha256_file, sidecar_path, write_sidecar, write_text_atomic

from .checkpoints import CheckpointError, recorded_sha256
from .registry import IMAGENET_MEAN, IMAGENET_STD

OFFICIAL_BASE_URL = "https://dl.fbaipublicfiles.com/convnext/"
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PretrainedCheckpoint:
    name: str  # the official file name without .pth
    model_name: str  # a `list_models()` name
    input_size_px: int
    dataset: str  # "in1k", "in22k" (21841 classes) or "in22k->in1k" (pre-trained on 22K, fine-tuned on 1K)
    top1: float | None  # ImageNet-1K top-1 (%) as the README reports it; None for 22K-only heads
    num_classes: int = 1000
    sha256: str | None = None  # not published upstream: the first download is trusted and recorded in a sidecar

    @property
    def filename(self) -> str:
        return f"{self.name}.pth"

    @property
    def url(self) -> str:
        return OFFICIAL_BASE_URL + self.filename


def _table() -> dict[str, PretrainedCheckpoint]:
    rows = [
        # ImageNet-1K trained (EMA weights at 224, as released).
        PretrainedCheckpoint("convnext_tiny_1k_224_ema", "convnext_tiny", 224, "in1k", 82.1),
        PretrainedCheckpoint("convnext_small_1k_224_ema", "convnext_small", 224, "in1k", 83.1),
        PretrainedCheckpoint("convnext_base_1k_224_ema", "convnext_base", 224, "in1k", 83.8),
        PretrainedCheckpoint("convnext_base_1k_384", "convnext_base", 384, "in1k", 85.1),
        PretrainedCheckpoint("convnext_large_1k_224_ema", "convnext_large", 224, "in1k", 84.3),
        PretrainedCheckpoint("convnext_large_1k_384", "convnext_large", 384, "in1k", 85.5),
        # ImageNet-1K trained, isotropic (Table 2).
        PretrainedCheckpoint("convnext_iso_small_1k_224_ema", "convnext_isotropic_small", 224, "in1k", 78.7),
        PretrainedCheckpoint("convnext_iso_base_1k_224_ema", "convnext_isotropic_base", 224, "in1k", 82.0),
        PretrainedCheckpoint("convnext_iso_large_1k_224_ema", "convnext_isotropic_large", 224, "in1k", 82.6),
    ]
    for size in ("tiny", "small", "base", "large", "xlarge"):
        rows.append(PretrainedCheckpoint(f"convnext_{size}_22k_224", f"convnext_{size}", 224, "in22k", None, 21841))
    fine_tuned = {  # ImageNet-22K pre-trained, ImageNet-1K fine-tuned: top-1 at 224 and 384
        "tiny": (82.9, 84.1), "small": (84.6, 85.8), "base": (85.8, 86.8),
        "large": (86.6, 87.5), "xlarge": (87.0, 87.8),
    }
    for size, (top1_224, top1_384) in fine_tuned.items():
        suffix = "_ema" if size == "xlarge" else ""  # only XL's fine-tuned files are the EMA weights
        for px, top1 in ((224, top1_224), (384, top1_384)):
            rows.append(PretrainedCheckpoint(f"convnext_{size}_22k_1k_{px}{suffix}", f"convnext_{size}", px,
                                             "in22k->in1k", top1))
    return {row.name: row for row in rows}


PRETRAINED_CHECKPOINTS: dict[str, PretrainedCheckpoint] = _table()

# OpenAI CLIP's normalisation, which timm's CLIP ConvNeXt weights keep (timm.data OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IN1K, IN12K, IN22K = "ImageNet-1K", "ImageNet-12K", "ImageNet-22K"  # timm's in12k: 11821 classes of ImageNet-22K
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass(frozen=True)
class TimmPretrained:
    """A timm pretrained tag of a ConvNeXt built here and its pretrained_cfg's evaluation fields (timm 1.0.31
    timm/models/convnext.py default_cfgs; the defaults are its _cfg's: 224 px, crop_pct 0.875, bicubic, center)."""

    name: str  # timm's "<model>.<tag>", e.g. "convnext_tiny.in12k_ft_in1k"; <model> is a list_models() name
    dataset: str  # what the weights were trained on, as the manifest says it
    input_size_px: int = 224
    crop_pct: float = 0.875
    crop_mode: str = "center"
    num_classes: int = 1000
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    test_input_size_px: int | None = None  # timm's test_input_size / test_crop_pct: its best top-1, at a larger size
    test_crop_pct: float | None = None

    @property
    def model_name(self) -> str:
        return self.name.split(".", 1)[0]

    def data_config(self, input_size_px: int | None = None) -> dict:
        """The evaluation transform at `input_size_px` (default: the tag's size); at the tag's test size, its test
        crop (timm's resolve_data_config with use_test_size)."""
        size = input_size_px or self.input_size_px
        at_test_size = size == self.test_input_size_px and self.test_crop_pct is not None
        return {"input_size": size, "crop_pct": self.test_crop_pct if at_test_size else self.crop_pct,
                "crop_mode": self.crop_mode, "interpolation": "bicubic", "mean": self.mean, "std": self.std}


def _timm_table() -> dict[str, TimmPretrained]:
    """Every timm tag of these models that has a classifier head (not the DINOv3 / EUPE feature extractors)."""
    test_288 = {"test_input_size_px": 288, "test_crop_pct": 1.0}
    squash_384 = {"input_size_px": 384, "crop_pct": 1.0, "crop_mode": "squash"}
    ft = f"{IN22K}, fine-tuned on {IN1K}"
    rows = []
    for size in ("tiny", "small", "base", "large", "xlarge"):  # the official weights, as timm names them
        model = f"convnext_{size}"
        rows += [TimmPretrained(f"{model}.fb_in22k_ft_in1k", ft, **test_288),
                 TimmPretrained(f"{model}.fb_in22k_ft_in1k_384", ft, **squash_384),
                 TimmPretrained(f"{model}.fb_in22k", IN22K, num_classes=21841)]
        if size != "xlarge":
            rows.append(TimmPretrained(f"{model}.fb_in1k", IN1K, **test_288))
    for model in ("convnext_tiny", "convnext_small", "convnext_nano"):  # timm's ImageNet-12K runs: crop_pct 0.95
        rows += [TimmPretrained(f"{model}.in12k_ft_in1k", f"{IN12K}, fine-tuned on {IN1K}", crop_pct=0.95, **test_288),
                 TimmPretrained(f"{model}.in12k", IN12K, crop_pct=0.95, num_classes=11821)]
    rows += [TimmPretrained(f"{model}.in12k_ft_in1k_384", f"{IN12K}, fine-tuned on {IN1K}", **squash_384)
             for model in ("convnext_tiny", "convnext_small")]
    rows += [TimmPretrained(name, IN1K, test_input_size_px=288, test_crop_pct=0.95)
             for name in ("convnext_atto.d2_in1k", "convnext_femto.d1_in1k", "convnext_pico.d1_in1k")]
    rows += [TimmPretrained("convnext_nano.d1h_in1k", IN1K, crop_pct=0.95, **test_288),
             TimmPretrained("convnext_nano.r384_in12k_ft_in1k", f"{IN12K}, fine-tuned on {IN1K}", 384, 1.0),
             TimmPretrained("convnext_nano.r384_in12k", IN12K, 384, 1.0, num_classes=11821),
             TimmPretrained("convnext_nano.r384_ad_in12k", IN12K, 384, 1.0, num_classes=11821)]
    clip = {"mean": CLIP_MEAN, "std": CLIP_STD, "crop_pct": 1.0}
    laion, laion_a = "LAION-2B (CLIP)", "LAION-Aesthetics (CLIP)"
    rows += [
        TimmPretrained("convnext_base.clip_laion2b_augreg_ft_in12k_in1k", f"{laion}, fine-tuned on {IN12K} and {IN1K}",
                       256, **clip),
        TimmPretrained("convnext_base.clip_laion2b_augreg_ft_in12k_in1k_384",
                       f"{laion}, fine-tuned on {IN12K} and {IN1K}", 384, crop_mode="squash", **clip),
        TimmPretrained("convnext_base.clip_laion2b_augreg_ft_in1k", f"{laion}, fine-tuned on {IN1K}", 256, **clip),
        TimmPretrained("convnext_base.clip_laiona_augreg_ft_in1k_384", f"{laion_a}, fine-tuned on {IN1K}", 384, **clip),
        TimmPretrained("convnext_base.clip_laion2b_augreg_ft_in12k", f"{laion}, fine-tuned on {IN12K}", 256,
                       num_classes=11821, **clip),
    ]
    embedding = "(CLIP image tower: 640 embedding dimensions, not classes)"  # the head is CLIP's projection
    towers = (("clip_laion2b", "LAION-2B", 256), ("clip_laion2b_augreg", "LAION-2B", 256),
              ("clip_laiona", "LAION-Aesthetics", 256), ("clip_laiona_320", "LAION-Aesthetics", 320),
              ("clip_laiona_augreg_320", "LAION-Aesthetics", 320))
    rows += [TimmPretrained(f"convnext_base.{tag}", f"{data} {embedding}", px, num_classes=640, **clip)
             for tag, data, px in towers]
    return {row.name: row for row in rows}


TIMM_PRETRAINED: dict[str, TimmPretrained] = _timm_table()


def get_timm_pretrained(name: str) -> TimmPretrained:
    try:
        return TIMM_PRETRAINED[name]
    except KeyError:
        model = name.split(".", 1)[0]
        known = sorted(n for n in TIMM_PRETRAINED if n.startswith(model + ".")) or sorted(TIMM_PRETRAINED)
        raise ValueError(f"{name!r} is not a timm ConvNeXt pretrained tag this project knows; choose one of: "
                         f"{', '.join(known)}") from None


def find_timm_pretrained(checkpoint: str | Path) -> TimmPretrained | None:
    """The timm tag a checkpoint's path names, nearest the file first: the Hugging Face cache's
    `models--timm--<name>/snapshots/<revision>/pytorch_model.bin`, or a file or folder called `<name>` (.pth, .pt,
    .bin); None when no part of the path is one."""
    for part in reversed(Path(checkpoint).parts):
        name = part.removeprefix("models--timm--")
        for suffix in CHECKPOINT_SUFFIXES:
            name = name.removesuffix(suffix)
        if name in TIMM_PRETRAINED:
            return TIMM_PRETRAINED[name]
    return None


class DownloadError(RuntimeError):
    """A download that failed or did not verify; nothing is left in the cache under the final name."""


def get_pretrained(name: str) -> PretrainedCheckpoint:
    try:
        return PRETRAINED_CHECKPOINTS[name]
    except KeyError:
        raise ValueError(
            f"unknown pretrained checkpoint {name!r}; choose one of: {', '.join(sorted(PRETRAINED_CHECKPOINTS))}"
        ) from None


def default_cache_dir() -> Path:
    return Path(os.environ.get("CONVNEXT_CACHE_DIR", Path.home() / ".cache" / "convnext"))


def download_pretrained(name: str, cache_dir: str | Path | None = None, *, base_url: str = OFFICIAL_BASE_URL,
                        progress: bool = False) -> Path:
    """Path of the cached official checkpoint `name`, downloading it first when needed.

    `base_url` points at a mirror holding the same file names (air-gapped hosts, tests); `progress` reports bytes
    and rate on stderr.
    """
    entry = get_pretrained(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return download_file(base_url.rstrip("/") + "/" + entry.filename, cache_dir / entry.filename, sha256=entry.sha256,
                         progress=progress)


def download_file(url: str, destination: Path, *, sha256: str | None = None, timeout_s: float = 60.0,
                  progress: bool = False) -> Path:
    """Download `url` to `destination`: resume a `.part` file with an HTTP Range request, check Content-Length and
    sha256 (the expected one, else the `.sha256` sidecar written on first download, re-checked on every cache hit).

    Without an expected sha256 the first download is trusted: its hash becomes the record later hits are held to.
    A `.part` is resumed only against the validator (ETag or Last-Modified) saved when it began, sent as If-Range,
    so the bytes on disk and the tail are of the same remote file; anything else starts again from byte 0.
    """
    destination = Path(destination)
    if destination.is_file():
        if _cached_copy_verifies(destination, sha256):
            return destination
        destination.unlink()  # corrupted cache entry: fetch it again rather than hand it out
        sidecar_path(destination).unlink(missing_ok=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    _fetch(url, partial, timeout_s, progress)
    actual = sha256_file(partial)
    if sha256 is not None and actual != sha256:
        _discard_partial(partial)
        raise DownloadError(f"{url}: sha256 {actual} does not match the expected {sha256}; the file was discarded")
    partial.replace(destination)
    _validator_path(partial).unlink(missing_ok=True)
    write_sidecar(destination, actual)
    return destination


def _cached_copy_verifies(destination: Path, sha256: str | None) -> bool:
    """Whether the cached file matches `sha256`, else its sidecar; a file without either is recorded as it is."""
    try:
        expected = sha256 or recorded_sha256(destination)
    except CheckpointError:  # an empty or garbled sidecar: the copy cannot be verified, so it is fetched again
        return False
    actual = sha256_file(destination)
    if expected is None:
        write_sidecar(destination, actual)
    return expected is None or actual == expected


def _validator_path(partial: Path) -> Path:
    """`x.pth.part` -> `x.pth.part.validator`: the ETag or Last-Modified the server sent when the `.part` began."""
    return partial.with_name(partial.name + ".validator")


def _discard_partial(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _validator_path(partial).unlink(missing_ok=True)


def _response_validator(headers: Message) -> str | None:
    """What If-Range may carry (RFC 9110 13.1.5): a strong ETag, else Last-Modified; None when there is neither."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):  # a weak ETag must not be sent in If-Range
        return etag
    return headers.get("Last-Modified")


def _resume_point(partial: Path) -> tuple[int, str | None]:
    """The bytes of `partial` to keep and the validator they were fetched under; (0, None) discards the `.part`
    when nothing proves which file it holds (no saved validator: an older version, another file, a proxy's)."""
    validator_file = _validator_path(partial)
    validator = validator_file.read_text(errors="replace").strip() if validator_file.is_file() else ""
    offset = partial.stat().st_size if partial.is_file() else 0
    if not (offset and validator.isascii() and validator.isprintable() and validator):
        _discard_partial(partial)
        return 0, None
    return offset, validator


def _write_offset(response: http.client.HTTPResponse, offset: int, validator: str | None) -> int | None:
    """Where the body goes in the `.part`: `offset` for a 206 that continues it, 0 for a whole file (200: the file
    changed, or the server ignores ranges), None for a 206 of another range or version (splicing it corrupts)."""
    if response.status != 206:
        return 0
    sent_validator = _response_validator(response.headers)
    same_file = validator is None or sent_validator in (None, validator)
    return offset if same_file and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-") else None


def _fetch(url: str, partial: Path, timeout_s: float, progress: bool = False) -> None:
    """Download `url` into `partial`, resuming it only while the validator saved beside it still holds."""
    offset, validator = _resume_point(partial)
    headers = {"Range": f"bytes={offset}-", "If-Range": validator} if validator else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
            start = _write_offset(response, offset, validator)
            content_range = response.headers.get("Content-Range")
            expected_total = _receive(response, partial, start, progress) if start is not None else None
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # Range not satisfiable: the .part is stale or over-long, restart
            _discard_partial(partial)
            return _fetch(url, partial, timeout_s, progress)
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}; check the name or the mirror") from error
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)  # URLError wraps the socket error: "Name or service not known"
        if not (partial.is_file() and partial.stat().st_size):
            _discard_partial(partial)
            raise DownloadError(f"{url}: cannot download ({reason}); check the network, or pass --mirror with a "
                                "reachable copy of the file") from error
        raise DownloadError(f"{url}: download interrupted ({reason}); {_after_interruption(partial)}") from error
    if start is None:  # a 206 that does not continue the .part: never splice it, fetch the whole file instead
        if not offset:
            raise DownloadError(f"{url}: the server sent part of the file (Content-Range {content_range}) to a "
                                "request for all of it; use another mirror")
        _discard_partial(partial)
        return _fetch(url, partial, timeout_s, progress)
    received = partial.stat().st_size
    if expected_total is not None and received != expected_total:
        raise DownloadError(f"{url}: got {received} of {expected_total} bytes; {_after_interruption(partial)}")


def _receive(response: http.client.HTTPResponse, partial: Path, offset: int, progress: bool) -> int | None:
    """Write the body into `partial` after its first `offset` bytes; the file's total size, when the server says."""
    if not offset:  # a new .part: drop the old one first, so no validator ever sits beside bytes of another file
        _discard_partial(partial)
        validator = _response_validator(response.headers)
        if validator is not None:
            write_text_atomic(_validator_path(partial), validator + "\n")
    expected_total = _total_bytes(response.headers, offset)
    report = DownloadProgress(partial.name.removesuffix(".part"), offset, expected_total) if progress else None
    with partial.open("ab" if offset else "wb") as out:
        while chunk := response.read(_CHUNK_BYTES):
            out.write(chunk)
            if report is not None:
                report.update(len(chunk))
    if report is not None:
        report.finish()
    return expected_total


def _total_bytes(headers: Message, offset: int) -> int | None:
    """The whole file's size: a 206's Content-Range says it (a range cut short must not pass for the rest of the
    file), else the body's Content-Length after `offset`; None when the server says neither."""
    if match := re.fullmatch(r"bytes \d+-\d+/(\d+)", headers.get("Content-Range", "")):
        return int(match[1])
    length = headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _after_interruption(partial: Path) -> str:
    """What happens to a cut-off `.part`: kept for the next call to resume, or dropped when it cannot be resumed."""
    if _validator_path(partial).is_file():
        return f"{partial.name} is kept and the next call resumes it"
    _discard_partial(partial)
    return "the server sent no ETag or Last-Modified to resume against, so the next call starts over"


def format_progress(label: str, done_bytes: int, total_bytes: int | None, rate_bytes_s: float) -> str:
    """`convnext_tiny_1k_224_ema.pth: 45.2 of 109.1 MiB (41%), 12.3 MiB/s`."""
    mib = 2**20
    of_total = f" of {total_bytes / mib:.1f} MiB ({done_bytes / total_bytes:.0%})" if total_bytes else " MiB"
    return f"{label}: {done_bytes / mib:.1f}{of_total}, {rate_bytes_s / mib:.1f} MiB/s"


class DownloadProgress:
    """Bytes and rate on stderr: one line rewritten every 0.2 s on a terminal, else a new line every 5 s (logs)."""

    def __init__(self, label: str, done_bytes: int, total_bytes: int | None, stream: TextIO | None = None):
        self.label, self.done_bytes, self.total_bytes = label, done_bytes, total_bytes
        self.stream = stream or sys.stderr
        self.is_terminal = self.stream.isatty()
        self.interval_s = 0.2 if self.is_terminal else 5.0
        self.started = self.last_shown = time.monotonic()
        self.received_bytes = 0  # this session's bytes: the rate of a resumed download ignores the old part
        resumed = f", resuming at {done_bytes / 2**20:.1f} MiB" if done_bytes else ""
        print(f"downloading {label}{resumed}", file=self.stream, flush=True)

    def update(self, chunk_bytes: int) -> None:
        self.done_bytes += chunk_bytes
        self.received_bytes += chunk_bytes
        now = time.monotonic()
        if now - self.last_shown >= self.interval_s:
            self.last_shown = now
            self._show(now, end="" if self.is_terminal else "\n")

    def finish(self) -> None:
        self._show(time.monotonic(), end="\n")

    def _show(self, now: float, end: str) -> None:
        rate = self.received_bytes / max(now - self.started, 1e-6)
        line = format_progress(self.label, self.done_bytes, self.total_bytes, rate)
        print(("\r" + line + "\x1b[K") if self.is_terminal else line, end=end, file=self.stream, flush=True)

