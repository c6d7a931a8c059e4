"""pipeline decisions: top_k_of (the k most probable classes in the order a stable sort of every class gives, ties in
class order) and a client gone before its images were queued, without a server; the request deadline, with one."""
from __future__ import annotations

import time

import numpy as np

from service.pipeline import top_k_of


def reference(logits: np.ndarray, k: int) -> list[int]:
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return [int(i) for i in np.argsort(-(shifted / shifted.sum()), kind="stable")[:k]]


def test_top_k_matches_a_stable_sort_of_every_class_with_ties():
    rng = np.random.default_rng(0)
    labels = tuple(f"class {i}" for i in range(40))
    for trial in range(200):
        # Few distinct values, so ties straddle the k-th place often.
        logits = rng.integers(0, 4 if trial % 2 else 40, size=40).astype(np.float32)
        for k in (1, 2, 5, 39, 40):
            top = top_k_of(logits, labels, k)
            assert [entry["index"] for entry in top] == reference(logits, k)
            assert [entry["label"] for entry in top] == [labels[i] for i in reference(logits, k)]
    probabilities = [entry["probability"] for entry in top_k_of(np.arange(5, dtype=np.float32), labels[:5], 5)]
    assert abs(sum(probabilities) - 1) < 1e-12 and probabilities == sorted(probabilities, reverse=True)


def test_a_client_gone_while_its_images_decoded_gets_499_and_nothing_is_queued():
    """pipeline.run_batched with the disconnect watcher already done: no batcher call (state has none)."""
    import asyncio
    from types import SimpleNamespace

    import pytest

    from service.errors import ApiError
    from service.pipeline import run_batched

    async def main():
        gone = asyncio.get_running_loop().create_future()
        gone.set_result(None)
        state = SimpleNamespace(settings=SimpleNamespace(request_timeout_ms=1000.0), batcher=None)
        with pytest.raises(ApiError) as err:
            await run_batched(state, [np.zeros((3, 4, 4), np.float32)], gone, time.monotonic() + 1)
        assert (err.value.status, err.value.code) == (499, "client_disconnected")

    asyncio.run(main())


def test_the_request_deadline_counts_decoding_too(launch, model_repository, real_photos):
    """request_timeout_ms runs from when the body has arrived, decoding included: a 12-MP photo (~100 ms of exact
    decoding) cannot finish within 20 ms, even though the 64-px model's batch takes a few ms once it is queued."""
    import io

    import httpx
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(real_photos[0]).convert("RGB").resize((4000, 3000)).save(buffer, "JPEG", quality=90)
    with launch(model_repository, request_timeout_ms=20) as url:
        answer = httpx.post(f"{url}/classify", content=buffer.getvalue(), headers={"content-type": "image/jpeg"},
                            timeout=30)
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"] == {"code": "deadline", "message": "the request did not finish within 20 ms"}
