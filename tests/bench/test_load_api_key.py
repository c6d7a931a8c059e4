"""`bench load` against a real service that wants an API key (`python -m service`, started as the benches start it,
key from CONVNEXT_API_KEY): the key goes from --api-key or that same variable into the header the service reads, is
never printed, and a run the service refuses names the key, not the URL."""
from __future__ import annotations

import json

import pytest

import bench.__main__ as bench_main
from bench.server_process import service

API_KEY = "bench-key-7d2e91"


@pytest.fixture(scope="module")
def secured_url(tmp_path_factory):
    from export.onnx import export_onnx_version

    root = tmp_path_factory.mktemp("bench-key")
    export_onnx_version(root, "atto", "convnext_atto", num_classes=10, input_size=32, verify_images=[])
    args = ["--repository", str(root), "--model", "atto", "--intra-op-threads", "1", "--preprocess-workers", "1"]
    with service(args, env={"CONVNEXT_API_KEY": API_KEY}) as server:
        yield f"{server.url}/classify"


def bench_load(url: str, *flags: str) -> int:
    return bench_main.main(["load", url, "--requests", "4", "--concurrency", "2", *flags])


def test_the_key_from_the_services_variable_or_the_flag_is_sent_and_never_printed(secured_url, monkeypatch, capsys):
    monkeypatch.setenv("CONVNEXT_API_KEY", API_KEY)
    assert bench_load(secured_url) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] == 4 and API_KEY not in out + err
    monkeypatch.delenv("CONVNEXT_API_KEY")
    assert bench_load(secured_url, "--api-key", API_KEY) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ok"] == 4 and API_KEY not in out + err
    # A Kubernetes secret made from a file ends in its newline: stripped here as the service strips it.
    monkeypatch.setenv("CONVNEXT_API_KEY", API_KEY + "\n")
    assert bench_load(secured_url) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == 4


def test_a_missing_key_is_named_as_the_problem_not_the_url(secured_url, monkeypatch, capsys):
    monkeypatch.delenv("CONVNEXT_API_KEY", raising=False)
    assert bench_load(secured_url) == 1
    err = capsys.readouterr().err
    assert "the first with HTTP 401" in err and "check that the service is listening" not in err
    assert "the service wants an API key: set CONVNEXT_API_KEY (as for the service) or pass --api-key" in err


def test_a_wrong_key_is_named_as_refused_and_not_echoed(secured_url, monkeypatch, capsys):
    monkeypatch.setenv("CONVNEXT_API_KEY", "not-the-key")
    assert bench_load(secured_url) == 1
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "the service refused the API key sent (--api-key or CONVNEXT_API_KEY)" in err
    assert "not-the-key" not in err


def test_a_key_no_header_can_carry_is_refused_before_any_request(monkeypatch, capsys):
    monkeypatch.setenv("CONVNEXT_API_KEY", "key\r\nX-Injected: 1")
    assert bench_load("http://127.0.0.1:9/classify") == 1
    err = capsys.readouterr().err
    assert "holds a line break or another control character" in err and "Injected" not in err
