"""`convnext serve --pretrained NAME` end to end against a local mirror: download -> export -> serve -> /classify
answers with ImageNet-1K labels; a second start finds the export in the repository and needs no network."""
from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch

from export.labels import imagenet_labels
from model import create_model
from tests.service.conftest import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
NAME = "convnext_tiny_1k_224_ema"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def mirror(folder: Path):
    """http.server on 127.0.0.1 serving `folder` (with Content-Length, which the download checks)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@contextmanager
def convnext_serve(tmp: Path, mirror_url: str, log: Path, **variables: str):
    """`convnext serve --pretrained NAME` in a subprocess (with these environment `variables` too); yields its URL
    once /readyz answers 200."""
    port = free_port()
    command = [sys.executable, "-m", "convnext_cli", "serve", "--pretrained", NAME, "--mirror", mirror_url,
               "--cache-dir", str(tmp / "cache"), "--repository", str(tmp / "models"), "--host", "127.0.0.1",
               "--port", str(port), "--intra-op-threads", "1", "--preprocess-workers", "1", "--warmup-runs", "1"]
    env = os.environ | {"PYTHONPATH": str(ROOT)} | variables
    with log.open("w") as stderr:
        process = subprocess.Popen(command, stdout=stderr, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        try:  # ConvNeXt-T: download, export and parity take about a minute on 2 cores
            wait_ready(url, timeout_s=900, alive=lambda: process.poll() is None)
        except RuntimeError as err:
            raise AssertionError(f"{err}:\n{log.read_text()}") from None
        yield url
    finally:
        process.terminate()
        process.wait(60)


@pytest.mark.timeout(1500)
def test_serve_pretrained_downloads_exports_and_serves_imagenet_labels(tmp_path, real_photos):
    served = tmp_path / "mirror"
    served.mkdir()
    torch.manual_seed(0)  # random weights in the official file layout: {"model": state_dict}, 1000 classes
    torch.save({"model": create_model("convnext_tiny", num_classes=1000).state_dict()}, served / f"{NAME}.pth")
    imagenet = set(imagenet_labels())
    cat = real_photos[2].read_bytes()

    with mirror(served) as mirror_url, convnext_serve(tmp_path, mirror_url, tmp_path / "first.log") as url:
        answer = httpx.post(f"{url}/classify?top_k=5", content=cat, headers={"Content-Type": "image/png"}, timeout=60)
        assert answer.status_code == 200, answer.text
        labels = [p["label"] for p in answer.json()["results"][0]["top_k"]]
        assert len(labels) == 5 and set(labels) <= imagenet
        card = next(m for m in httpx.get(f"{url}/models").json()["models"] if m["serving"])["description"]
        assert (card["architecture"], card["source"], card["dataset"]) == ("convnext_tiny", "official", "ImageNet-1K")
        assert card["pretrained"] == NAME  # known by its official file name, which the download keeps
        assert card["num_classes"] == 1000 and card["sample_labels"][:2] == ["tench", "goldfish"]
        assert card["serve_imagenet_command"] is None
    first = (tmp_path / "first.log").read_text()
    assert f"downloading {NAME}.pth" in first and "[2/3] ONNX" in first and "[3/3] parity" in first
    assert (tmp_path / "cache" / f"{NAME}.pth.sha256").is_file()  # verified, cached

    # The mirror is gone (offline): the model exported above is served again without a download or an export; a
    # CONVNEXT_MODEL left in the environment does not change what is served, and the log says so.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}/"
        with convnext_serve(tmp_path, dead_url, tmp_path / "second.log", CONVNEXT_MODEL="other") as url:
            answer = httpx.post(f"{url}/classify?top_k=5", content=cat, headers={"Content-Type": "image/png"},
                                timeout=60)
            assert [p["label"] for p in answer.json()["results"][0]["top_k"]] == labels
    second = (tmp_path / "second.log").read_text()
    assert "downloading" not in second and "ONNX" not in second
    assert ("convnext serve: note: CONVNEXT_MODEL=other is not used: this command serves the model it exports or "
            "finds (convnext-tiny-1k-224-ema version 1)") in second
    assert sorted(p.name for p in (tmp_path / "models" / "convnext-tiny-1k-224-ema").iterdir()) == ["1"]
