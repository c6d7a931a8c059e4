"""The README's main job, end to end: train the offline demo, export it, serve it, classify held-out digits by HTTP."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from PIL import Image

from tests.service.conftest import free_port, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_IMAGES = 100


def _run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, check=True, timeout=600)


def _png(pixels) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_demo_model_trained_exported_and_served_classifies_held_out_digits(tmp_path):
    from training.data import digits_split

    # The demo preset, shortened to 12 epochs to keep CI fast (the full 30 epochs reach 98.9%).
    _run("training", "--preset", "demo", "--epochs", "12", "--output", str(tmp_path / "run"))
    _run("export", "onnx", "--checkpoint", str(tmp_path / "run" / "checkpoint_best.pth"),
         "--name", "digits", "--repository", str(tmp_path / "models"))

    port = free_port()
    env = dict(os.environ, CONVNEXT_INTRA_OP_THREADS="2")
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "--repository", str(tmp_path / "models"), "--host", "127.0.0.1",
         "--port", str(port)],
        cwd=REPO_ROOT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, alive=lambda: server.poll() is None)

        _, (val_images, val_labels) = digits_split(32)  # the split the demo never trained on
        correct = 0
        for start in range(0, HELD_OUT_IMAGES, 20):
            files = [("files", (f"{i}.png", _png(val_images[i]), "image/png")) for i in range(start, start + 20)]
            response = httpx.post(f"{url}/classify?top_k=1", files=files, timeout=60)
            assert response.status_code == 200, response.text
            for i, result in zip(range(start, start + 20), response.json()["results"], strict=True):
                correct += int(result["top_k"][0]["label"] == str(val_labels[i]))
        accuracy = correct / HELD_OUT_IMAGES
        assert accuracy >= 0.95, f"the served demo model got {accuracy:.0%} of held-out digits right"
        assert httpx.get(f"{url}/models").json()  # what is served is visible
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:  # a shutdown that hangs fails the test, and leaves no server behind
            server.kill()
            server.wait()
            raise
