"""The admission gate: a POST /classify arriving when no image fits is refused before routing, over real HTTP."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from tests.service.test_faults import Hold


@pytest.fixture
def held():
    hold = Hold()
    yield hold
    hold.released.set()  # a failed test leaves nothing blocked


def fill_to_capacity(url, app, data: bytes, headers: dict) -> list[threading.Thread]:
    """Start requests in the background until every admission slot is taken (the slow engine holds them)."""
    admission = app.state.service.admission
    threads = [threading.Thread(target=httpx.post, args=(f"{url}/classify",),
                                kwargs={"content": data, "headers": headers, "timeout": 60})
               for _ in range(admission.capacity)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while admission.admitted < admission.capacity:
        assert time.monotonic() < deadline, f"only {admission.admitted} of {admission.capacity} slots filled"
        time.sleep(0.005)
    return threads


def test_at_capacity_a_request_is_refused_at_the_gate_and_the_connection_stays_usable(model_repository,
                                                                                        real_photos, launch, held):
    data = real_photos[0].read_bytes()
    jpeg = {"content-type": "image/jpeg"}
    with launch(model_repository, held.factory, max_batch_size=1, queue_size=1, warmup_runs=0) as url:
        held.start()  # from here on, batches wait for held.finish
        with httpx.Client(base_url=url, timeout=60) as client:
            threads = fill_to_capacity(url, url.app, data, jpeg)
            started = time.perf_counter()
            refused = client.post("/classify", content=data, headers=jpeg)
            refused_ms = (time.perf_counter() - started) * 1000
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "queue_full"
            assert "2 images in progress, limit 2" in refused.json()["error"]["message"]
            # No wait for the held batches (held up to 60 s); typically a few ms, the bound leaves room for a busy
            # machine.
            assert refused_ms < 5000, f"the refusal took {refused_ms:.0f} ms"
            held.finish(threads)
            # The refused request's body was never read; the same keep-alive connection serves the next one.
            assert client.post("/classify", content=data, headers=jpeg).status_code == 200
        scrape = httpx.get(f"{url}/metrics").text
        assert 'convnext_requests_total{method="POST",route="/classify",status="503"} 1.0' in scrape
        assert 'convnext_rejected_total{reason="queue_full"} 1.0' in scrape
        # The refusal's ~0 ms stays out of the answered requests' latency, which the dashboard's percentiles read.
        assert 'convnext_request_duration_seconds_count{route="/classify",status_class="5xx"} 1.0' in scrape
        assert f'convnext_request_duration_seconds_count{{route="/classify",status_class="2xx"}} {len(threads) + 1}.0' \
            in scrape


def test_at_capacity_the_gate_answers_before_the_body_arrives(model_repository, real_photos, launch, held):
    """The route would wait for the body (body_timeout_s, then 408); the gate answers from the headers alone."""
    data = real_photos[0].read_bytes()
    jpeg = {"content-type": "image/jpeg"}
    with launch(model_repository, held.factory, max_batch_size=1, queue_size=1, warmup_runs=0,
                body_timeout_s=20) as url:
        held.start()  # from here on, batches wait for held.finish
        threads = fill_to_capacity(url, url.app, data, jpeg)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as client:
            client.sendall(b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
                           b"Content-Length: 100000\r\n\r\n" + data[:1000])  # 1000 of the 100000 bytes it declares
            status_line = client.recv(4096).split(b"\r\n", 1)[0]
        assert status_line == b"HTTP/1.1 503 Service Unavailable", status_line
        held.finish(threads)


def test_a_request_whose_images_do_not_all_fit_is_refused_in_the_route(model_repository, real_photos, launch,
                                                                         held):
    """One slot free passes the gate; a 2-file request still does not fit, and admission in the route refuses it."""
    data = real_photos[0].read_bytes()
    with launch(model_repository, held.factory, max_batch_size=1, queue_size=2, warmup_runs=0) as url:
        held.start()  # from here on, batches wait for held.finish
        admission = url.app.state.service.admission
        background = threading.Thread(target=httpx.post, args=(f"{url}/classify",),
                                      kwargs={"files": [("file", ("a.jpg", data)), ("file", ("b.jpg", data))],
                                              "timeout": 60})
        background.start()
        deadline = time.monotonic() + 10
        while admission.admitted < 2:
            assert time.monotonic() < deadline, f"only {admission.admitted} of 2 images admitted"
            time.sleep(0.005)
        files = [("file", (f"{i}.jpg", data)) for i in range(2)]
        refused = httpx.post(f"{url}/classify", files=files, timeout=60)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
        assert "limit 3" in refused.json()["error"]["message"]
        held.finish([background])


def test_without_the_key_a_full_service_answers_401_not_503(model_repository, real_photos, launch, held):
    data = real_photos[0].read_bytes()
    key = {"authorization": "Bearer s3cret", "content-type": "image/jpeg"}
    with launch(model_repository, held.factory, max_batch_size=1, queue_size=1, warmup_runs=0,
                api_key="s3cret") as url:
        held.start()  # from here on, batches wait for held.finish
        threads = fill_to_capacity(url, url.app, data, key)
        anonymous = httpx.post(f"{url}/classify", content=data, headers={"content-type": "image/jpeg"})
        assert anonymous.status_code == 401
        assert httpx.post(f"{url}/classify", content=data, headers=key, timeout=60).status_code == 503
        held.finish(threads)


def test_images_admitted_together_are_all_queued_before_the_batcher_takes_any(model_repository, launch, held):
    """Two decodes can finish in one loop step while the engine is idle: their images are enqueued before the
    batcher takes the first. The queue holds as many images as admission lets in, so neither is refused."""
    with launch(model_repository, held.factory, max_batch_size=1, queue_size=1, warmup_runs=0) as url:
        state = url.app.state.service
        assert state.batcher.queue.maxsize == state.admission.capacity == 2
        held.start()
        spec = state.version.manifest.input
        image = np.zeros((spec.channels, spec.height, spec.width), dtype=np.float32)

        async def submit_in_one_step():  # no await between the submits: the batcher cannot run in between
            first = state.batcher.submit([image], time.monotonic() + 30)
            second = state.batcher.submit([image], time.monotonic() + 30)
            return [*first, *second]

        loop = state.batcher.task.get_loop()
        items = asyncio.run_coroutine_threadsafe(submit_in_one_step(), loop).result(timeout=10)
        held.finish([])
        for item in items:
            asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(item.future), 30), loop).result(40)
        assert all(item.future.result().shape == (state.version.manifest.num_classes,) for item in items)


def test_a_request_with_more_images_than_the_capacity_gets_413_not_a_503_to_retry_forever(model_repository,
                                                                                          real_photos, launch):
    """queue_size + max_batch_size images at most are ever in progress: a request with more could never be admitted,
    and a 503 with Retry-After had clients retry it forever (gRPC's UNAVAILABLE is retried automatically)."""
    data = real_photos[0].read_bytes()
    with launch(model_repository, max_batch_size=1, queue_size=1, warmup_runs=0) as url:
        def post(count: int) -> httpx.Response:
            files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i in range(count)]
            return httpx.post(f"{url}/classify", files=files, timeout=60)

        refused = post(3)
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"]["code"] == "too_many_images"
        assert "over the service's capacity of 2" in refused.json()["error"]["message"]
        assert "retry-after" not in refused.headers
        assert post(2).status_code == 200

