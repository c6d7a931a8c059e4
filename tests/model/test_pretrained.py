"""Pretrained checkpoint table and the download: cache, Range resume, Content-Length and sha256 checks (local HTTP)."""
from __future__ import annotations

import hashlib
import io
import re
import threading
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


class _CheckpointServer(BaseHTTPRequestHandler):
    """Serves `files` with HTTP Range support; `truncate_next` cuts the next response short after that many bytes."""

    files: dict[str, bytes] = {}
    truncate_next: int | None = None
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        cls = type(self)
        cls.requests.append((self.path, self.headers.get("Range")))
        body = cls.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
            start = int(match[1])
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if cls.truncate_next is not None:
            payload, cls.truncate_next = payload[: cls.truncate_next], None
            self.close_connection = True
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
    _CheckpointServer.truncate_next = None
    _CheckpointServer.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _CheckpointServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _CheckpointServer, f"http://127.0.0.1:{httpd.server_address[1]}/"
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


def test_truncated_transfer_fails_then_resumes_with_a_range_request(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    handler.truncate_next = 100_000
    with pytest.raises(DownloadError, match="resumes"):
        download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert not (tmp_path / FILENAME).exists()  # no half file under the final name
    assert (tmp_path / f"{FILENAME}.part").stat().st_size == 100_000
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    assert handler.requests[-1][1] == "bytes=100000-"
    assert path.read_bytes() == checkpoint_bytes
    assert not (tmp_path / f"{FILENAME}.part").exists()


def test_corrupted_cached_file_is_detected_and_downloaded_again(server, tmp_path, checkpoint_bytes):
    handler, base_url = server
    path = download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url)
    corrupted = bytearray(checkpoint_bytes)
    corrupted[5000] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    assert download_pretrained("convnext_tiny_1k_224_ema", tmp_path, base_url=base_url).read_bytes() == checkpoint_bytes
    assert len(handler.requests) == 2


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
