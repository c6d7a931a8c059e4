"""Pretrained checkpoint table and the download: cache, Range resume, Content-Length and sha256 checks (local HTTP)."""
from __future__ import annotations

import hashlib
import io
import re
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from model import create_model, list_models
from model.__main__ import main
from model.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from model.pretrained import (
    PRETRAINED_CHECKPOINTS,
    DownloadError,
    DownloadProgress,
    NoDowngradeRedirects,
    default_cache_dir,
    download_file,
    download_pretrained,
    format_progress,
    shown_url,
)

FILENAME = "convnext_tiny_1k_224_ema.pth"
CACHED_FILES = [FILENAME, f"{FILENAME}.sha256", f"{FILENAME}.url"]  # the file, its hash and the URL it came from


def _etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


class _CheckpointServer(BaseHTTPRequestHandler):
    """Serves `files` with HTTP Range and If-Range support, each file with its `validators` headers (by default a
    strong ETag of its bytes); `truncate_next` cuts the next response short after that many bytes;
    `range_reply` "misplaced" answers a Range request from byte 0, "short" with only 1000 bytes (a proxy that mangles
    ranges); `stall_after` holds the next response after that many bytes, setting `stalled`, until `resume` is set;
    `content_type` is sent as Content-Type when set, and `send_length` False sends no Content-Length."""

    files: dict[str, bytes] = {}
    validators: dict[str, dict[str, str]] = {}
    truncate_next: int | None = None
    range_reply = "honest"
    stall_after: int | None = None
    content_type: str | None = None
    send_length = True
    stalled = threading.Event()
    resume = threading.Event()
    requests: list[tuple[str, str | None, str | None]] = []  # (path, Range, If-Range)
    redirects: dict[str, str] = {}  # name -> the URL a 302 sends the client to

    def do_GET(self):  # noqa: N802 (http.server's naming)
        cls = type(self)
        cls.requests.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        name = self.path.lstrip("/")
        if name in cls.redirects:
            self.send_response(302)
            self.send_header("Location", cls.redirects[name])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = cls.files.get(name)
        if body is None:
            self.send_error(404)
            return
        validators = cls.validators.get(name, {"ETag": _etag(body)})
        if_range = self.headers.get("If-Range")
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and (if_range is None or if_range in validators.values()):  # RFC 9110: else the whole file
            start = int(match[1])
            if start >= len(body):
                self.send_error(416)
                return
            start = 0 if cls.range_reply == "misplaced" else start
            end = min(start + 1000, len(body)) if cls.range_reply == "short" else len(body)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        else:
            self.send_response(200)
            end = len(body)
        payload = body[start:end]
        for header, value in validators.items():
            self.send_header(header, value)
        if cls.content_type is not None:
            self.send_header("Content-Type", cls.content_type)
        if cls.send_length:
            self.send_header("Content-Length", str(len(payload)))
        else:  # the body ends when the connection closes
            self.close_connection = True
        self.end_headers()
        if cls.truncate_next is not None:
            payload, cls.truncate_next = payload[: cls.truncate_next], None
            self.close_connection = True
        if cls.stall_after is not None:
            head, payload, cls.stall_after = payload[: cls.stall_after], payload[cls.stall_after:], None
            self.wfile.write(head)
            self.wfile.flush()
            cls.stalled.set()
            cls.resume.wait(timeout=30)
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("served") / FILENAME
    torch.manual_seed(0)
    torch.save({"model": create_model("convnext_atto").state_dict()}, path)  # a real, small checkpoint
    return path.read_bytes()


@pytest.fixture
def server(checkpoint_bytes):
    _CheckpointServer.files = {FILENAME: checkpoint_bytes}
    _CheckpointServer.validators = {}
    _CheckpointServer.truncate_next = None
    _CheckpointServer.range_reply = "honest"
    _CheckpointServer.stall_after = None
    _CheckpointServer.content_type = None
    _CheckpointServer.send_length = True
    _CheckpointServer.stalled, _CheckpointServer.resume = threading.Event(), threading.Event()
    _CheckpointServer.requests = []
    _CheckpointServer.redirects = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _CheckpointServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _CheckpointServer, f"http://127.0.0.1:{httpd.server_address[1]}/"
    _CheckpointServer.resume.set()  # a test that failed while a response was held does not leave it waiting
    httpd.shutdown()
    httpd.server_close()


def test_table_matches_the_official_readme():
    assert len(PRETRAINED_CHECKPOINTS) == 9 + 5 + 10
    tiny = PRETRAINED_CHECKPOINTS["convnext_tiny_1k_224_ema"]
    assert (tiny.url, tiny.top1, tiny.input_size_px) == (
        "https://dl.fbaipublicfiles.com/convnext/convnext_tiny_1k_224_ema.pth", 82.1, 224)
    assert PRETRAINED_CHECKPOINTS["convnext_xlarge_22k_1k_384_ema"].top1 == 87.8
    assert PRETRAINED_CHECKPOINTS["convnext_large_22k_224"].num_classes == 21841
    assert all(entry.model_name in list_models() for entry in PRETRAINED_CHECKPOINTS.values())


def test_download_then_cache_hit_and_the_file_loads(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert path.read_bytes() == checkpoint_bytes
    assert (tmp_path / f"{FILENAME}.sha256").read_text().split()[0] == hashlib.sha256(checkpoint_bytes).hexdigest()
    assert download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url) == path
    assert len(handler.requests) == 1  # the second call was a verified cache hit
    model = create_model("convnext_atto", num_classes=10)
    assert load_checkpoint(model, read_checkpoint(path)).head_reinitialised


LAST_MODIFIED = "Tue, 01 Jul 2025 00:00:00 GMT"


@pytest.mark.parametrize(("validators", "if_range"), [
    (None, "etag"),
    ({"Last-Modified": LAST_MODIFIED}, LAST_MODIFIED),
    ({"ETag": 'W/"weak"', "Last-Modified": LAST_MODIFIED}, LAST_MODIFIED),  # a weak ETag may not go in If-Range
], ids=["etag", "last-modified", "weak-etag"])
def test_truncated_transfer_fails_then_resumes_with_a_range_request_if_still_the_same_file(
        server, tmp_path, checkpoint_bytes, validators, if_range):
    handler, base_url = server
    if validators is not None:
        handler.validators = {FILENAME: validators}
    handler.truncate_next = 100_000
    with pytest.raises(DownloadError, match="resumes"):
        download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert not (tmp_path / FILENAME).exists()  # no half file under the final name
    assert (tmp_path / f"{FILENAME}.part").stat().st_size == 100_000
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    expected_if_range = _etag(checkpoint_bytes) if if_range == "etag" else if_range
    assert handler.requests[-1][1:] == ("bytes=100000-", expected_if_range)  # only the tail, and only of this file
    assert path.read_bytes() == checkpoint_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == CACHED_FILES  # no .part, no validator


def _plant_partial(folder, first_bytes: bytes, validator: str | None, url: str) -> None:
    (folder / f"{FILENAME}.part").write_bytes(first_bytes)
    if validator is not None:
        (folder / f"{FILENAME}.part.validator").write_text(f"{url}\n{validator}\n")


def test_a_part_of_another_version_is_not_joined_with_the_new_file(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    older = bytes(reversed(checkpoint_bytes))  # what the same URL served before, as large as the new file
    _plant_partial(tmp_path, older[:100_000], _etag(older), base_url + FILENAME)
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert handler.requests[-1][1:] == ("bytes=100000-", _etag(older))  # the server saw the ETag change: 200
    assert path.read_bytes() == checkpoint_bytes


def test_a_part_without_its_validator_starts_over(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    _plant_partial(tmp_path, bytes(reversed(checkpoint_bytes))[:100_000], None, base_url + FILENAME)  # older version
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert handler.requests == [("/" + FILENAME, None, None)]
    assert path.read_bytes() == checkpoint_bytes


def test_a_206_that_does_not_continue_the_part_is_never_spliced(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    _plant_partial(tmp_path, checkpoint_bytes[:100_000], _etag(checkpoint_bytes), base_url + FILENAME)
    handler.range_reply = "misplaced"  # answers "bytes=100000-" with "Content-Range: bytes 0-..."
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert [request[1] for request in handler.requests] == ["bytes=100000-", None]  # refused, then the whole file
    assert path.read_bytes() == checkpoint_bytes


def test_a_206_that_stops_short_of_the_end_is_not_taken_for_the_whole_file(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    _plant_partial(tmp_path, checkpoint_bytes[:100_000], _etag(checkpoint_bytes), base_url + FILENAME)
    handler.range_reply = "short"  # "Content-Range: bytes 100000-100999/<size>"
    with pytest.raises(DownloadError, match=f"got 101000 of {len(checkpoint_bytes)} bytes; .* resumes it"):
        download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    handler.range_reply = "honest"
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert handler.requests[-1][1] == "bytes=101000-" and path.read_bytes() == checkpoint_bytes


def test_a_transfer_without_validators_cannot_be_resumed_and_says_so(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    handler.validators = {FILENAME: {}}
    handler.truncate_next = 100_000
    with pytest.raises(DownloadError, match="no ETag or Last-Modified to resume against, so the next call starts over"):
        download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert list(tmp_path.iterdir()) == []
    assert download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url).read_bytes() == checkpoint_bytes
    assert handler.requests[-1][1] is None


@pytest.mark.parametrize("first_transfer", ["finishes", "is cut off"])
def test_concurrent_downloads_of_one_file_take_turns_and_fetch_its_bytes_once(server, tmp_path, checkpoint_bytes,
                                                                               first_transfer):
    handler, base_url = server
    handler.stall_after = 100_000  # the first transfer is held halfway while the second download starts
    if first_transfer == "is cut off":
        handler.truncate_next = 100_000
    with ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(download_pretrained, "convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
            assert handler.stalled.wait(timeout=10)
            second = pool.submit(download_pretrained, "convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
            assert wait([second], timeout=0.5).not_done == {second}  # time enough to reach the server, were it free to
            assert len(handler.requests) == 1  # it waits for the first rather than writing the same .part beside it
        finally:
            handler.resume.set()
        if first_transfer == "is cut off":
            with pytest.raises(DownloadError, match="the next call resumes it"):
                first.result(timeout=30)
        else:
            assert first.result(timeout=30) == tmp_path / FILENAME
        assert second.result(timeout=30).read_bytes() == checkpoint_bytes  # a cache hit, or the resumed .part
    expected_ranges = [None] if first_transfer == "finishes" else [None, "bytes=100000-"]
    assert [request[1] for request in handler.requests] == expected_ranges
    assert sorted(p.name for p in tmp_path.iterdir()) == CACHED_FILES  # and no lock file


def test_corrupted_cached_file_is_detected_and_downloaded_again(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    corrupted = bytearray(checkpoint_bytes)
    corrupted[5000] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    assert download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url).read_bytes() == checkpoint_bytes
    assert len(handler.requests) == 2


@pytest.mark.parametrize("sidecar_text", ["", "\n"])
def test_an_empty_sidecar_means_the_cached_file_is_downloaded_again(server, tmp_path, checkpoint_bytes, sidecar_text):
    handler, base_url = server
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    sidecar = tmp_path / f"{FILENAME}.sha256"
    sidecar.write_text(sidecar_text)  # e.g. a disk that filled up while it was written
    assert main(["download", "convnext_tiny_1k_224_ema", "--cache-dir", str(tmp_path), "--mirror", base_url,
                 "--quiet"]) == 0
    assert len(handler.requests) == 2 and path.read_bytes() == checkpoint_bytes
    assert sidecar.read_text().split()[0] == hashlib.sha256(checkpoint_bytes).hexdigest()


def test_wrong_expected_sha256_leaves_nothing_behind(server, tmp_path):
    _, base_url = server
    destination = tmp_path / FILENAME
    with pytest.raises(DownloadError, match="does not match the expected"):
        download_file(base_url + FILENAME, destination, sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_http_error_and_unknown_name_fail_clearly(server, tmp_path):
    _, base_url = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_pretrained("convnext_small_1k_224_ema", tmp_path, base_url=base_url)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown pretrained checkpoint 'convnext_tiny_in1k'"):
        download_pretrained("convnext_tiny_in1k", tmp_path)


def test_download_command_prints_the_cached_path(server, tmp_path, capsys):
    _, base_url = server
    assert main(["download", "convnext_tiny_1k_224_ema", "--cache-dir", str(tmp_path), "--mirror", base_url]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / FILENAME)
    assert (tmp_path / FILENAME).is_file()


def test_download_reports_bytes_and_rate_on_stderr_unless_quiet(server, tmp_path, capsys, checkpoint_bytes):
    _, base_url = server
    assert main(["download", "convnext_tiny_1k_224_ema", "--cache-dir", str(tmp_path / "a"), "--mirror", base_url]) == 0
    err = capsys.readouterr().err.splitlines()  # not a terminal here: whole lines, the last one at 100%
    mib = len(checkpoint_bytes) / 2**20
    assert err[0] == f"downloading {FILENAME}"
    assert re.fullmatch(rf"{FILENAME}: {mib:.1f} of {mib:.1f} MiB \(100%\), [\d.]+ MiB/s", err[-1])
    assert main(["download", "convnext_tiny_1k_224_ema", "--cache-dir", str(tmp_path / "b"), "--mirror", base_url,
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_progress_line_format():
    assert format_progress("x.pth", 45 * 2**20, 90 * 2**20, 12.5 * 2**20) == "x.pth: 45.0 of 90.0 MiB (50%), 12.5 MiB/s"
    assert format_progress("x.pth", 3 * 2**20, None, 2**20) == "x.pth: 3.0 MiB, 1.0 MiB/s"  # no Content-Length


def test_progress_on_a_terminal_rewrites_one_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    report = DownloadProgress(FILENAME, 2**20, 2 * 2**20, terminal)  # resuming a half-done download
    report.update(2**20)
    report.finish()
    first, last = terminal.getvalue().split("\n", 1)
    assert first == f"downloading {FILENAME}, resuming at 1.0 MiB"
    assert re.fullmatch(rf"(\r{FILENAME}: [\d.]+ of 2.0 MiB \(\d+%\), [\d.]+ MiB/s\x1b\[K)*"
                        rf"\r{FILENAME}: 2.0 of 2.0 MiB \(100%\), [\d.]+ MiB/s\x1b\[K\n", last)


def _torch_file_bytes(tmp_path, content: dict) -> bytes:
    path = tmp_path / "made.pth"
    torch.save(content, path)
    return path.read_bytes()


def test_a_cached_file_is_a_hit_only_for_the_url_it_came_from(server, tmp_path):
    """Two runs' checkpoint_best.pth share a file name (deploy/entrypoint.py caches CONVNEXT_CHECKPOINT by it): the
    cache once handed run A's weights to a request for run B's."""
    handler, base_url = server
    runs = {run: _torch_file_bytes(tmp_path, {"run": run}) for run in ("runA", "runB")}
    handler.files = {f"{run}/checkpoint_best.pth": body for run, body in runs.items()}
    destination = tmp_path / "cache" / "checkpoint_best.pth"
    for run in ("runA", "runB", "runB", "runA"):
        url = f"{base_url}{run}/checkpoint_best.pth"
        assert download_file(url, destination).read_bytes() == runs[run], run
        assert (tmp_path / "cache" / "checkpoint_best.pth.url").read_text() == url + "\n"
    assert [request[0] for request in handler.requests] == ["/runA/checkpoint_best.pth", "/runB/checkpoint_best.pth",
                                                            "/runA/checkpoint_best.pth"]  # the second runB: a hit


def test_a_cached_file_without_a_recorded_url_is_fetched_again_unless_its_sha256_is_known(server, tmp_path,
                                                                                         checkpoint_bytes):
    """A file copied into the cache, or cached by an older version, has no `.url`: its source is unknown. A file
    whose sha256 the caller knows is verified by that hash alone, wherever it came from."""
    handler, base_url = server
    other = _torch_file_bytes(tmp_path, {"other": "weights"})
    (tmp_path / "cache").mkdir()
    destination = tmp_path / "cache" / FILENAME
    destination.write_bytes(other)
    (tmp_path / "cache" / f"{FILENAME}.sha256").write_text(f"{hashlib.sha256(other).hexdigest()}  {FILENAME}\n")
    assert download_file(base_url + FILENAME, destination).read_bytes() == checkpoint_bytes
    assert len(handler.requests) == 1
    (tmp_path / "cache" / f"{FILENAME}.url").unlink()
    known = hashlib.sha256(checkpoint_bytes).hexdigest()
    assert download_file(base_url + "elsewhere/" + FILENAME, destination, sha256=known) == destination
    assert len(handler.requests) == 1  # verified by the known hash: no request


def test_an_official_file_is_reused_whatever_mirror_it_came_from_and_when_copied_in(server, tmp_path,
                                                                                   checkpoint_bytes):
    """An official name says which file it is (every mirror serves the same one): a file cached by an older version
    (a sidecar, no `.url`), one from another mirror, and one copied into the cache by hand (no record at all: an
    air-gapped host) are used without a request; a copied-in file that is not a checkpoint is fetched."""
    handler, base_url = server
    cache = tmp_path / "cache"
    cache.mkdir()
    destination = cache / FILENAME
    destination.write_bytes(checkpoint_bytes)  # copied in by hand
    assert download_pretrained("convnext_tiny_1k_224_ema", cache, base_url=base_url) == destination
    assert (cache / f"{FILENAME}.sha256").read_text().split()[0] == hashlib.sha256(checkpoint_bytes).hexdigest()
    assert not (cache / f"{FILENAME}.url").exists()  # recorded as it is: its source is not known
    assert download_pretrained("convnext_tiny_1k_224_ema", cache, base_url=base_url + "mirror/") == destination
    assert handler.requests == []
    destination.write_bytes(b"<html>not a checkpoint</html>")
    (cache / f"{FILENAME}.sha256").unlink()
    assert download_pretrained("convnext_tiny_1k_224_ema", cache, base_url=base_url).read_bytes() == checkpoint_bytes
    assert len(handler.requests) == 1


def test_a_safetensors_download_says_how_to_convert_it(server, tmp_path):
    """A Hugging Face timm repository serves model.safetensors: named as such, with the conversion, not taken for a
    login page."""
    handler, base_url = server
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    handler.files = {"model.safetensors": len(header).to_bytes(8, "little") + header + b"\0" * 4}
    with pytest.raises(DownloadError, match=r"a safetensors file, which is not .*safetensors.torch.load_file"):
        download_file(base_url + "model.safetensors", tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()  # discarded, not cached


def test_a_part_of_another_url_is_not_resumed(server, tmp_path):
    """Run A's download is cut off; run B's file of the same name carries the same Last-Modified (both written in
    one second): that validator proves nothing about another URL's bytes, so B starts from byte 0, never spliced."""
    handler, base_url = server
    runs = {run: _torch_file_bytes(tmp_path, {"run": run, "weights": torch.randn(100_000)}) for run in ("runA", "runB")}
    handler.files = {f"{run}/checkpoint_best.pth": body for run, body in runs.items()}
    handler.validators = {name: {"Last-Modified": LAST_MODIFIED} for name in handler.files}
    destination = tmp_path / "cache" / "checkpoint_best.pth"
    handler.truncate_next = 100_000
    with pytest.raises(DownloadError, match="resumes"):
        download_file(f"{base_url}runA/checkpoint_best.pth", destination)
    assert download_file(f"{base_url}runB/checkpoint_best.pth", destination).read_bytes() == runs["runB"]
    assert handler.requests[-1] == ("/runB/checkpoint_best.pth", None, None)  # the whole file, no Range


@pytest.mark.parametrize("reply", ["login page", "cut off without Content-Length"])
def test_a_body_that_is_not_a_torch_save_file_is_refused_and_never_cached(server, tmp_path, checkpoint_bytes, reply):
    """A proxy's login page answered with 200, or a body cut short with no Content-Length to notice it by, was once
    cached with a sidecar and served from the cache forever."""
    handler, base_url = server
    if reply == "login page":
        handler.files = {FILENAME: b"<html><body>Please log in to the proxy</body></html>"}
        handler.content_type = "text/html"
        expected = "the server sent 52 bytes of text/html, not a torch.save checkpoint"
    else:
        handler.send_length, handler.truncate_next = False, 100_000
        expected = "the server sent 100000 bytes of no Content-Type, not a torch.save checkpoint"
    with pytest.raises(DownloadError, match=re.escape(f"{base_url}{FILENAME}: {expected}")):
        download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert list(tmp_path.iterdir()) == []
    handler.files, handler.content_type, handler.send_length = {FILENAME: checkpoint_bytes}, None, True
    assert download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url).read_bytes() == checkpoint_bytes
    assert len(handler.requests) == 2


def test_a_cached_file_that_is_not_a_torch_save_file_is_fetched_again(server, tmp_path, checkpoint_bytes):
    """A page an older version cached, with its sidecar and URL: not handed out again."""
    handler, base_url = server
    page = b"<html>share page</html>"
    (tmp_path / FILENAME).write_bytes(page)
    (tmp_path / f"{FILENAME}.sha256").write_text(f"{hashlib.sha256(page).hexdigest()}  {FILENAME}\n")
    (tmp_path / f"{FILENAME}.url").write_text(base_url + FILENAME + "\n")
    assert download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url).read_bytes() == checkpoint_bytes
    assert len(handler.requests) == 1


def test_a_downloaded_file_that_cannot_be_read_is_named_for_deletion(server, tmp_path, checkpoint_bytes):
    """A legacy-format file cut short passes the download's check (its header is whole) and its sidecar records the
    cut bytes: read_checkpoint names the cached file to delete, and the next download fetches it again."""
    handler, base_url = server
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": create_model("convnext_atto").state_dict()}, legacy, _use_new_zipfile_serialization=False)
    handler.files = {FILENAME: legacy.read_bytes()[:2000]}
    cache = tmp_path / "cache"
    path = download_pretrained("convnext_tiny_1k_224_ema", cache, base_url=base_url)
    with pytest.raises(CheckpointError, match=re.escape(f"is damaged or truncated (IndexError: index out of range); "
                                                        f"it was downloaded from {base_url}{FILENAME}: delete {path} "
                                                        "and download it again")):
        read_checkpoint(path)
    path.unlink()
    handler.files = {FILENAME: checkpoint_bytes}
    assert read_checkpoint(download_pretrained("convnext_tiny_1k_224_ema", cache, base_url=base_url))["model"]


@pytest.mark.parametrize("value", ["", None])
def test_an_empty_cache_dir_variable_means_the_default_not_the_working_folder(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CONVNEXT_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("CONVNEXT_CACHE_DIR", value)
    assert default_cache_dir() == Path.home() / ".cache" / "convnext"
    monkeypatch.setenv("CONVNEXT_CACHE_DIR", "/data/cache")
    assert default_cache_dir() == Path("/data/cache")


def test_a_redirect_is_followed_but_never_from_https_to_plain_http(server, tmp_path, checkpoint_bytes):
    """The official files have no pinned sha256: TLS vouches for their bytes, and urllib followed a redirect from an
    https mirror to plain http without a word. http -> http (and http -> https, https -> https) is followed."""
    handler, url = server
    handler.redirects = {"moved.pth": f"{url}{FILENAME}"}
    path = download_file(f"{url}moved.pth", tmp_path / FILENAME, timeout_s=30)
    assert path.read_bytes() == checkpoint_bytes
    redirects = NoDowngradeRedirects()
    for source, target in (("https://mirror.example/a.pth", "https://cdn.example/a.pth"),
                           ("http://mirror.example/a.pth", "https://cdn.example/a.pth")):
        followed = redirects.redirect_request(urllib.request.Request(source), None, 302, "Found", {}, target)
        assert followed is not None and followed.full_url == target
    for target in ("http://cdn.example/a.pth", "ftp://cdn.example/a.pth"):
        with pytest.raises(DownloadError, match=f"redirected the download to {target}, which is not https"):
            redirects.redirect_request(urllib.request.Request("https://mirror.example/a.pth"), None, 302, "Found",
                                       {}, target)


def test_an_error_never_shows_a_urls_password_or_query(server, tmp_path):
    """A presigned URL's query is its credential (X-Amz-Signature=..., sig=...): an error in a log would hand the file
    to whoever reads it. Messages show the URL without its query or user:password."""
    assert (shown_url("https://user:pw@bucket.example:8443/w/x.pth?X-Amz-Signature=s3cr3t&X-Amz-Expires=60#f")
            == "https://bucket.example:8443/w/x.pth?<query hidden>")
    assert shown_url("https://host/x.pth") == "https://host/x.pth"  # nothing to hide: as given
    _, base_url = server
    with pytest.raises(DownloadError, match="HTTP 404") as refused:
        download_file(f"{base_url}/missing.pth?sig=s3cr3t", tmp_path / "missing.pth")
    assert "s3cr3t" not in str(refused.value) and "/missing.pth?<query hidden>: HTTP 404" in str(refused.value)
