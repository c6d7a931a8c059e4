"""The official pretrained ConvNeXt checkpoints (facebookresearch/ConvNeXt README) and a verified, resumable download.

Upstream publishes no sha256 for these files, and none could be pinned here without a trusted copy of each, so
the table's `sha256` is None: the first download is trusted (it comes over HTTPS from dl.fbaipublicfiles.com,
or from a mirror you chose) once it is a torch.save file, its hash is recorded in a `.sha256` sidecar and its URL in a
`.url` record, and every later cache hit is checked against both. A resumed download only joins bytes the server
proves are of the same file of the same URL (If-Range).
"""
from __future__ import annotations

import fcntl
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import TextIO

from convnext_files import (
    SidecarError,
    recorded_sha256,
    sha256_file,
    sidecar_path,
    write_sidecar,
    write_text_atomic,
)

from .checkpoints import (
    SAFETENSORS_ADVICE,
    is_safetensors_file,
    is_torch_save_file,
    recorded_source_url,
    source_url_path,
)

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

class DownloadError(RuntimeError):
    """A download that failed or did not verify; nothing is left in the cache under the final name."""


def shown_url(url: str) -> str:
    """`url` as a message may show it: without a user:password and with its query hidden (a presigned URL's query is
    its credential: X-Amz-Signature, sig=...), so an error in a log never hands the file to whoever reads it."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "<query hidden>" if parts.query else "", ""))


def _failed(url: str, text: str) -> DownloadError:
    """A download's error: the URL as shown_url shows it, then what went wrong."""
    return DownloadError(f"{shown_url(url)}: {text}")


class NoDowngradeRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects (http, https, ftp), except from https to anything but https: the official files have no
    pinned sha256, so TLS is what vouches for their bytes, and a redirect to plain http would hand the download to
    anyone on the path (urllib followed it without a word)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # newurl: absolute (urllib joined it)
        if urllib.parse.urlsplit(req.full_url).scheme == "https" and urllib.parse.urlsplit(newurl).scheme != "https":
            raise _failed(req.full_url, f"the server redirected the download to {shown_url(newurl)}, which is not "
                          "https; refused (download it yourself if you trust that address, and pass the path)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(NoDowngradeRedirects)  # the default handlers (proxies from the environment too)


def get_pretrained(name: str) -> PretrainedCheckpoint:
    try:
        return PRETRAINED_CHECKPOINTS[name]
    except KeyError:
        raise ValueError(
            f"unknown pretrained checkpoint {name!r}; choose one of: {', '.join(sorted(PRETRAINED_CHECKPOINTS))}"
        ) from None


def default_cache_dir() -> Path:
    # Empty means unset (compose's `${CONVNEXT_CACHE_DIR:-}`, as deploy/entrypoint.py reads it), not the working folder.
    return Path(os.environ.get("CONVNEXT_CACHE_DIR") or Path.home() / ".cache" / "convnext")


def download_pretrained(name: str, cache_dir: str | Path | None = None, *, base_url: str = OFFICIAL_BASE_URL,
                        progress: bool = False) -> Path:
    """Path of the cached official checkpoint `name`, downloading it first when needed.

    `base_url` points at a mirror holding the same file names (air-gapped hosts, tests); `progress` reports bytes
    and rate on stderr.
    """
    entry = get_pretrained(name)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return download_file(base_url.rstrip("/") + "/" + entry.filename, cache_dir / entry.filename, sha256=entry.sha256,
                         progress=progress, name_is_identity=True)


def download_file(url: str, destination: Path, *, sha256: str | None = None, timeout_s: float = 60.0,
                  progress: bool = False, name_is_identity: bool = False) -> Path:
    """Download the torch.save file at `url` to `destination`: resume a `.part` file with an HTTP Range request, check
    Content-Length and sha256 (the expected one, else the `.sha256` sidecar written on first download, re-checked on
    every cache hit), and that it is a torch.save file (a login page answered with 200 is not cached).

    Without an expected sha256 the first download is trusted: its hash becomes the record later hits are held to, and
    a hit must also be of the same URL (its `.url` record): a cache keyed by file name alone would hand run A's
    `checkpoint_best.pth` to a request for run B's. With an expected sha256, the hash alone decides; with
    `name_is_identity` (the official table's file names: every mirror serves the same file under one name), the
    recorded sha256 does, whatever URL the file came from, and a torch.save file found without a record (copied into
    the cache by hand, as an air-gapped host does) is recorded as it is.
    A `.part` is resumed only from the same URL and against the validator (ETag or Last-Modified) saved when it began,
    sent as If-Range, so the bytes on disk and the tail are of the same remote file; anything else starts again from
    byte 0.
    Concurrent calls for one destination (two `python -m model download`, two `convnext serve`) take turns: the
    later one finds the file finished, or resumes the `.part` the earlier one left.
    """
    destination = Path(destination)
    if _is_cache_hit(destination, url, sha256, name_is_identity):  # no lock: a read-only cache still serves its files
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(destination.with_name(destination.name + ".lock")):
        return _download_unless_cached(url, destination, sha256, timeout_s, progress, name_is_identity)


def _download_unless_cached(url: str, destination: Path, sha256: str | None, timeout_s: float,
                            progress: bool, name_is_identity: bool) -> Path:
    """download_file's work, under its lock: the `.part` has a fixed name (what lets a later call resume it), so two
    downloads writing it at once would interleave their bytes, or one would find it renamed away."""
    if _is_cache_hit(destination, url, sha256, name_is_identity):  # the call that held the lock before fetched it
        return destination
    if name_is_identity and sha256 is None and _record_copied_in(destination):
        return destination
    # Not a hit (another URL's file, a corrupted or unreadable one, one with nothing to verify it by): fetched again,
    # and replaced only once the new file is whole, so a failed download leaves the old one where it was.
    partial = destination.with_name(destination.name + ".part")
    content_type = _fetch(url, partial, timeout_s, progress)
    actual = sha256_file(partial)
    if sha256 is not None and actual != sha256:
        _discard_partial(partial)
        raise _failed(url, f"sha256 {actual} does not match the expected {sha256}; the file was discarded")
    if not is_torch_save_file(partial):
        size, safetensors = partial.stat().st_size, is_safetensors_file(partial)
        _discard_partial(partial)
        if safetensors:  # e.g. a Hugging Face timm repository's model.safetensors
            raise _failed(url, f"a safetensors file, {SAFETENSORS_ADVICE} (fetch it yourself to convert it); "
                                "the download was discarded")
        raise _failed(url, f"the server sent {size} bytes of {content_type or 'no Content-Type'}, not a "
                            "torch.save checkpoint (a login or share page, an error page, a mirror without the file?); "
                            "the file was discarded: check the URL, or download it in a browser and pass the path")
    # The old file's records go first: a crash before the new ones are written leaves a file that is no hit.
    for record in (source_url_path(destination), sidecar_path(destination)):
        record.unlink(missing_ok=True)
    partial.replace(destination)
    _validator_path(partial).unlink(missing_ok=True)
    write_sidecar(destination, actual)
    write_text_atomic(source_url_path(destination), url + "\n")  # last: a file without it is never a hit for a URL
    return destination


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path`, waited for, released when the holder leaves (or dies: flock goes with its
    process). The file is removed before the release, so the cache keeps no lock files; a waiter that wakes holding
    the removed file locks the one now named `lock_path` instead."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)  # read-write: NFS's emulated flock needs it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        if _still_named(fd, lock_path):
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # even when the unlink fails: a lock held on would block every other download


def _still_named(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd` (not removed, nor replaced by another)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _is_cache_hit(destination: Path, url: str, sha256: str | None, name_is_identity: bool = False) -> bool:
    """Whether the cached file is the one asked for, checked without writing anything: of the expected sha256, else
    downloaded from `url` (its `.url` record; any URL with `name_is_identity`) and still of the sha256 recorded then;
    and a torch.save file, so that a page cached before that check was made is fetched again. A file with no record
    (copied in, or from an older version) is not trusted for a URL: its source is unknown."""
    if not destination.is_file():
        return False
    try:
        same_source = name_is_identity or recorded_source_url(destination) == url
        expected = sha256 or (recorded_sha256(destination) if same_source else None)
        return expected is not None and sha256_file(destination) == expected and is_torch_save_file(destination)
    except (SidecarError, FileNotFoundError):  # a garbled sidecar, or a file just removed: fetched again
        return False


def _record_copied_in(destination: Path) -> bool:
    """An official file put into the cache by hand, with no sha256 record: recorded as it is when it is a torch.save
    file (its name says which file it is; later hits are held to this record), so an air-gapped host need not fetch
    it. False when there is no such file, it has a record already (which it failed), or it is not a checkpoint."""
    if not destination.is_file() or sidecar_path(destination).exists() or not is_torch_save_file(destination):
        return False
    write_sidecar(destination, sha256_file(destination))
    return True


def _validator_path(partial: Path) -> Path:
    """`x.pth.part` -> `x.pth.part.validator`: the URL the `.part` is of, and the ETag or Last-Modified its server sent
    when it began (one line each)."""
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


def _resume_point(partial: Path, url: str) -> tuple[int, str | None]:
    """The bytes of `partial` to keep and the validator they were fetched under; (0, None) discards the `.part`
    when nothing proves which file it holds (no saved validator: an older version, another file, a proxy's), or it
    is of another URL (the same file name on another run's folder or another mirror)."""
    validator_file = _validator_path(partial)
    lines = validator_file.read_text(errors="replace").splitlines() if validator_file.is_file() else []
    source, validator = (lines[0], lines[1].strip()) if len(lines) == 2 else ("", "")
    offset = partial.stat().st_size if partial.is_file() else 0
    if not (offset and source == url and validator.isascii() and validator.isprintable() and validator):
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


def _fetch(url: str, partial: Path, timeout_s: float, progress: bool = False) -> str | None:
    """Download `url` into `partial`, resuming it only while the validator saved beside it still holds; the response's
    Content-Type (what a message names when the file is not a checkpoint)."""
    offset, validator = _resume_point(partial, url)
    headers = {"Range": f"bytes={offset}-", "If-Range": validator} if validator else {}
    try:
        with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
            start = _write_offset(response, offset, validator)
            content_range = response.headers.get("Content-Range")
            content_type = response.headers.get("Content-Type")
            expected_total = _receive(response, partial, url, start, progress) if start is not None else None
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # Range not satisfiable: the .part is stale or over-long, restart
            _discard_partial(partial)
            return _fetch(url, partial, timeout_s, progress)
        raise _failed(url, f"HTTP {error.code} {error.reason}; check the name or the mirror") from error
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)  # URLError wraps the socket error: "Name or service not known"
        if not (partial.is_file() and partial.stat().st_size):
            _discard_partial(partial)
            raise _failed(url, f"cannot download ({reason}); check the network, or pass --mirror with a "
                                "reachable copy of the file") from error
        raise _failed(url, f"download interrupted ({reason}); {_after_interruption(partial)}") from error
    if start is None:  # a 206 that does not continue the .part: never splice it, fetch the whole file instead
        if not offset:
            raise _failed(url, f"the server sent part of the file (Content-Range {content_range}) to a "
                                "request for all of it; use another mirror")
        _discard_partial(partial)
        return _fetch(url, partial, timeout_s, progress)
    received = partial.stat().st_size
    if expected_total is not None and received != expected_total:
        raise _failed(url, f"got {received} of {expected_total} bytes; {_after_interruption(partial)}")
    return content_type


def _receive(response: http.client.HTTPResponse, partial: Path, url: str, offset: int, progress: bool) -> int | None:
    """Write the body into `partial` after its first `offset` bytes; the file's total size, when the server says."""
    if not offset:  # a new .part: drop the old one first, so no validator ever sits beside bytes of another file
        _discard_partial(partial)
        validator = _response_validator(response.headers)
        if validator is not None:
            write_text_atomic(_validator_path(partial), f"{url}\n{validator}\n")
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

