"""bench.preprocess_cost times the service's own preprocessing functions, the normalisation included."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bench import preprocess_cost
from runtime.preprocess import normalized_tensor
from runtime.repository import Preprocess

SPEC = Preprocess(resize_px=72, crop_px=64, crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225))


def jpeg(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_normalize_stage_times_the_services_normalized_tensor(monkeypatch):
    calls = []

    def recording(image, spec):
        calls.append((image.size, spec))
        return normalized_tensor(image, spec)

    monkeypatch.setattr(preprocess_cost, "normalized_tensor", recording)
    costs = preprocess_cost.stage_costs(jpeg(160, 120), SPEC, repeats=3)
    assert calls == [((64, 64), SPEC)] * 3  # the cropped picture, with the served spec, once per repeat
    assert (costs["width"], costs["height"]) == (160, 120) and costs["normalize"] > 0
