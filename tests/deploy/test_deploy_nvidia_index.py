"""deploy/check_nvidia_index.py: the GPU image build stops early, saying what to do, when TensorRT's index is gone."""
from __future__ import annotations

import functools
import http.server
import subprocess
import sys

import pytest
from compose_yaml import ROOT
from threaded_server import serving

SCRIPT = ROOT / "deploy" / "check_nvidia_index.py"


@pytest.fixture()
def index(tmp_path):
    """A local simple index (PEP 503 layout, as pypi.nvidia.com and its mirrors serve) in `tmp_path`."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path)))
    with serving(server) as port:
        yield tmp_path, f"http://127.0.0.1:{port}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def run(index_url: str, machine: str = "x86_64") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--index-url", index_url, "--machine", machine],
                          capture_output=True, text=True, timeout=60)


def list_wheel(root, *filenames: str) -> None:
    page = root / "tensorrt-cu13-libs"
    page.mkdir()
    (page / "index.html").write_text("".join(f'<a href="../files/{name}">{name}</a>\n' for name in filenames))


def test_an_index_with_the_pinned_tensorrt_libs_passes(index):
    root, url = index
    list_wheel(root, "tensorrt_cu13_libs-11.4.0.106-py2.py3-none-manylinux_2_28_x86_64.whl")
    result = run(url)
    assert result.returncode == 0, result.stderr
    assert "has tensorrt-cu13-libs 11.4.0.106 for x86_64" in result.stdout


def test_an_arm64_build_needs_the_aarch64_wheel(index):
    """An arm64 image build needs TensorRT's aarch64 wheel: a listing for x86_64 only fails here, naming both."""
    root, url = index
    x86 = "tensorrt_cu13_libs-11.4.0.106-py2.py3-none-manylinux_2_28_x86_64.whl"
    list_wheel(root, x86)
    refused = run(url, machine="aarch64")
    assert refused.returncode == 1
    assert f"lists tensorrt_cu13_libs-11.4.0.106-*.whl only for other platforms ({x86}), none for aarch64" \
        in refused.stderr
    (root / "tensorrt-cu13-libs" / "index.html").unlink()
    (root / "tensorrt-cu13-libs").rmdir()
    list_wheel(root, x86, "tensorrt_cu13_libs-11.4.0.106-py2.py3-none-manylinux_2_31_aarch64.whl")
    assert run(url, machine="aarch64").returncode == 0


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
