"""A client that hangs up mid-upload is a 499 `client_disconnected` in the metrics, on every route that reads a body,
and logs no traceback: Starlette's ClientDisconnect reached the catch-all handler, which answered 500 and logged
"Exception in ASGI application" (flaky mobile clients set off 5xx alerts; anyone could fill the log)."""
from __future__ import annotations

import logging

import pytest

from tests.service.conftest import metric
from tests.service.test_limits import connect, wait_for_metric

ROUTES = {"/classify": "image/jpeg", "/v2/models/atto/infer": "application/json"}


@pytest.fixture(scope="module")
def url(model_repository, launch):
    with launch(model_repository) as url:
        yield url


@pytest.mark.parametrize("path", list(ROUTES))
def test_a_client_gone_mid_upload_is_a_499_not_a_500(url, path, caplog):
    route = path if path == "/classify" else "/v2/models/{name}/infer"
    gone = f'convnext_requests_total{{method="POST",route="{route}",status="499"}}'
    failed = f'convnext_requests_total{{method="POST",route="{route}",status="500"}}'
    before = metric(url, gone)
    sock = connect(url)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: %s\r\nContent-Length: 100000\r\n\r\n"
                 % (path.encode(), ROUTES[path].encode()) + b"x" * 1000)
    with caplog.at_level(logging.ERROR):
        sock.close()  # 1000 of the 100000 bytes it declared
        wait_for_metric(url, gone, before + 1)
    assert metric(url, failed) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
