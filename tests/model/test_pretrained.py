"""Pretrained checkpoint table and the download: cache, Range resume, Content-Length and sha256 checks (local HTTP)."""
from __future__ import annotations

import hashlib
import io
import re
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from model import create_model, list_models
from model.__main__ import main
from model.checkpoints import load_checkpoint, read_checkpoint
from model.pretrained import (
    PRETRAINED_CHECKPOINTS,
    DownloadError,
    DownloadProgress,
    download_file,
    download_pretrained,
    format_progress,
)

FILENAME = "convnext_tiny_1k_224_ema.pth"


def _etag(body: bytes) -> str:
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


class _CheckpointServer(BaseHTTPRequestHandler):
    """Serves `files` with HTTP Range and If-Range support, each file with its `validators` headers (by default a
    strong ETag of its bytes); `truncate_next` cuts the next response short after that many bytes;
    `range_reply` "misplaced" answers a Range request from byte 0, "short" with only 1000 bytes (a proxy that mangles
    ranges); `stall_after` holds the next response after that many bytes, setting `stalled`, until `resume` is set."""

    files: dict[str, bytes] = {}
    validators: dict[str, dict[str, str]] = {}
    truncate_next: int | None = None
    range_reply = "honest"
    stall_after: int | None = None
    stalled = threading.Event()
    resume = threading.Event()
    requests: list[tuple[str, str | None, str | None]] = []  # (path, Range, If-Range)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        cls = type(self)
        cls.requests.append((self.path, self.headers.get("Range"), self.headers.get("If-Range")))
        name = self.path.lstrip("/")
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
        self.send_header("Content-Length", str(len(payload)))
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
    _CheckpointServer.stalled, _CheckpointServer.resume = threading.Event(), threading.Event()
    _CheckpointServer.requests = []
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
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME, f"{FILENAME}.sha256"]  # no .part, no validator


def _plant_partial(folder, first_bytes: bytes, validator: str | None) -> None:
    (folder / f"{FILENAME}.part").write_bytes(first_bytes)
    if validator is not None:
        (folder / f"{FILENAME}.part.validator").write_text(validator + "\n")


def test_a_part_of_another_version_is_not_joined_with_the_new_file(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    older = bytes(reversed(checkpoint_bytes))  # what the same URL served before, as large as the new file
    _plant_partial(tmp_path, older[:100_000], _etag(older))
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert handler.requests[-1][1:] == ("bytes=100000-", _etag(older))  # the server saw the ETag change: 200
    assert path.read_bytes() == checkpoint_bytes


def test_a_part_without_its_validator_starts_over(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    _plant_partial(tmp_path, bytes(reversed(checkpoint_bytes))[:100_000], None)  # e.g. left by an older version
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert handler.requests == [("/" + FILENAME, None, None)]
    assert path.read_bytes() == checkpoint_bytes


def test_a_206_that_does_not_continue_the_part_is_never_spliced(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    _plant_partial(tmp_path, checkpoint_bytes[:100_000], _etag(checkpoint_bytes))
    handler.range_reply = "misplaced"  # answers "bytes=100000-" with "Content-Range: bytes 0-..."
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert [request[1] for request in handler.requests] == ["bytes=100000-", None]  # refused, then the whole file
    assert path.read_bytes() == checkpoint_bytes


def test_a_206_that_stops_short_of_the_end_is_not_taken_for_the_whole_file(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    _plant_partial(tmp_path, checkpoint_bytes[:100_000], _etag(checkpoint_bytes))
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
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME, f"{FILENAME}.sha256"]  # and no lock file


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
