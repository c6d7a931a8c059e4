"""deploy/check_nvidia_index.py: the GPU image build stops early, saying what to do, when TensorRT's index is gone."""
from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import threading

import pytest
from compose_yaml import ROOT

SCRIPT = ROOT / "deploy" / "check_nvidia_index.py"


@pytest.fixture()
def index(tmp_path):
    """A local simple index (PEP 503 layout, as pypi.nvidia.com and its mirrors serve) in `tmp_path`."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def run(index_url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--index-url", index_url], capture_output=True, text=True,
                          timeout=60)


def list_wheel(root, filename: str) -> None:
    page = root / "tensorrt-cu13-libs"
    page.mkdir()
    (page / "index.html").write_text(f'<a href="../files/{filename}">{filename}</a>\n')


def test_an_index_with_the_pinned_tensorrt_libs_passes(index):
    root, url = index
    list_wheel(root, "tensorrt_cu13_libs-11.4.0.106-py2.py3-none-manylinux_2_28_x86_64.whl")
    result = run(url)
    assert result.returncode == 0, result.stderr
    assert "has tensorrt-cu13-libs 11.4.0.106" in result.stdout


def test_an_index_without_the_pinned_version_fails_naming_it(index):
    root, url = index
    list_wheel(root, "tensorrt_cu13_libs-11.3.0.30-py2.py3-none-manylinux_2_28_x86_64.whl")
    result = run(url)
    assert result.returncode == 1
    assert "lists no tensorrt_cu13_libs-11.4.0.106-*.whl" in result.stderr


def test_an_unreachable_index_fails_with_what_to_do_and_no_traceback(index):
    _, url = index  # an empty folder: the package page is a 404
    for unreachable in (url, "http://127.0.0.1:9"):
        result = run(unreachable)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert f"Cannot build the GPU image: {unreachable}/tensorrt-cu13-libs/ is unreachable" in result.stderr
        assert "tensorrt-cu13==11.4.0.106 on PyPI does not contain TensorRT" in result.stderr
        assert "--build-arg NVIDIA_PYPI_URL=" in result.stderr and "docker-compose.cpu.yml" in result.stderr
