"""`bench all` keeps what it measured when a later phase fails: the report is written after every phase, a comparison
phase that fails (the LitServe peer, the ORT-spinning-off rerun) is recorded and the run goes on, and a failure of our
service leaves the engine sweep on disk, marked incomplete. The phases are stubbed with canned results: seconds."""
from __future__ import annotations

import json

import pytest

import bench.__main__ as bench_main
from bench.presets import PRESETS

ENGINE_ROW = {"model": "convnext_atto", "activation": "gelu", "precision": "fp32", "provider": "cpu", "batch_size": 1,
              "threads": 2, "images_per_s": 50.0, "p50_ms": 20.0, "p99_ms": 25.0, "iterations": 5}
OUR_RUN = {"server": "ours", "mode": "closed", "concurrency": 1, "rate_per_s": None, "ok": 10, "errors": {},
           "images_per_s": 40.0, "p50_ms": 25.0, "p95_ms": 30.0, "p99_ms": 31.0, "latencies_ms": [25.0] * 10}
SPINNING_OFF_RUN = "ours (ORT spinning off)"
PEER_DIED = "bench.peer_litserve exited with 1 before http://127.0.0.1:1234/health answered"


REAL_LOAD_OUR_SERVICE = bench_main.load_our_service


@pytest.fixture()
def canned_phases(monkeypatch):
    """Every phase before the peer answers at once with canned results (the engine sweep, our service)."""
    compared = {"models": [{"model": "convnext_atto", "activation": "gelu", "params_m": 3.7, "gmacs": 0.55,
                            "published_top1": None, "published_top1_source": "not published",
                            "results": [ENGINE_ROW, {**ENGINE_ROW, "batch_size": 2, "images_per_s": 80.0},
                                        {**ENGINE_ROW, "batch_size": 8, "images_per_s": 80.0}]}],
                "skipped": {}, "onnx_files": {}}
    monkeypatch.setattr(bench_main, "compare_models", lambda *a, **k: compared)
    monkeypatch.setattr(bench_main, "jpeg_payloads", lambda *a, **k: [b"jpeg"])
    monkeypatch.setattr(bench_main, "load_our_service", lambda *a, **k: {
        "load": [dict(OUR_RUN)], "batch_distribution": {}, "by_size": []})
    monkeypatch.setattr(bench_main, "load_spinning_off", lambda *a, **k: [{**OUR_RUN, "server": SPINNING_OFF_RUN}])
    monkeypatch.setattr(bench_main, "preprocess_and_low_load", lambda *a, **k: ({}, None))


def written(out) -> tuple[dict, str]:
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def test_a_peer_that_fails_to_start_is_recorded_and_every_earlier_phase_is_written(canned_phases, monkeypatch,
                                                                                    tmp_path):
    def peer_fails(*args, **kwargs):
        raise RuntimeError(PEER_DIED)

    monkeypatch.setattr(bench_main, "load_peer", peer_fails)
    results = bench_main.run_all(PRESETS["smoke"], tmp_path, ["cpu"], 2)
    saved, report = written(tmp_path)
    assert saved["phases"] == results["phases"] == {"engine sweep": "done", "our service": "done",
                                                    bench_main.SPINNING_OFF: "done",
                                                    "LitServe peer": f"failed: RuntimeError: {PEER_DIED}"}
    assert saved["complete"] and [run["server"] for run in saved["load"]] == ["ours", SPINNING_OFF_RUN]
    assert saved["load"][0]["efficiency"] == 0.5  # against the engine alone at the service's max batch size (8)
    assert "engines_under_load" not in saved  # no peer ran: nothing to compare ours with
    assert f"LitServe peer: failed: RuntimeError: {PEER_DIED}." in report and "Incomplete" not in report
    assert "| ours | closed |" in report


def test_when_our_service_fails_the_engine_sweep_is_on_disk_and_the_report_says_the_run_stopped(
        canned_phases, monkeypatch, tmp_path):
    def ours_fails(*args, **kwargs):
        raise RuntimeError("python -m service exited with 3 before http://127.0.0.1:1/readyz answered:\nport taken")

    monkeypatch.setattr(bench_main, "load_our_service", ours_fails)
    with pytest.raises(RuntimeError, match="exited with 3"):
        bench_main.run_all(PRESETS["smoke"], tmp_path, ["cpu"], 2)
    saved, report = written(tmp_path)
    assert saved["compare"]["models"][0]["results"][1]["images_per_s"] == 80.0 and not saved["complete"]
    assert saved["phases"] == {"engine sweep": "done", "our service": "failed: RuntimeError: python -m service "
                                                                      "exited with 3 before http://127.0.0.1:1/readyz "
                                                                      "answered:; port taken"}
    assert report.count("**Incomplete run**") == 1 and "## Engine alone" in report


@pytest.mark.parametrize("failure", [RuntimeError("http://127.0.0.1:2/readyz not ready after 120 s"),
                                     KeyboardInterrupt()], ids=["not-ready", "ctrl-c"])
def test_a_spinning_off_rerun_that_fails_leaves_our_services_runs_on_disk(canned_phases, monkeypatch, tmp_path,
                                                                          failure):
    """The rerun is a phase of its own, after our service's is saved: a rerun that fails to start is recorded and the
    run goes on; one interrupted (Ctrl-C) ends the run, with our service's runs on disk all the same."""
    def rerun_fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(bench_main, "load_spinning_off", rerun_fails)
    monkeypatch.setattr(bench_main, "load_peer", lambda *a, **k: [])
    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            bench_main.run_all(PRESETS["smoke"], tmp_path, ["cpu"], 2)
    else:
        bench_main.run_all(PRESETS["smoke"], tmp_path, ["cpu"], 2)
    saved, report = written(tmp_path)
    assert saved["phases"]["our service"] == "done" and [run["server"] for run in saved["load"]] == ["ours"]
    if isinstance(failure, KeyboardInterrupt):
        assert not saved["complete"] and bench_main.SPINNING_OFF not in saved["phases"]
        assert "**Incomplete run**" in report
    else:
        assert saved["complete"] and saved["phases"][bench_main.SPINNING_OFF] == (
            "failed: RuntimeError: http://127.0.0.1:2/readyz not ready after 120 s")


@pytest.mark.parametrize("name", ["smoke", "full"])
def test_efficiency_divides_by_the_engine_alone_at_the_batch_limit_the_servers_run_with(canned_phases, monkeypatch,
                                                                                      tmp_path, name):
    """`bench all --smoke` started the service at --max-batch-size 8 and divided by the sweep's batch 2 (its largest):
    efficiencies above 1, and the report called batch 2 the service's max batch size. The servers' real command lines
    are recorded in place of starting them."""
    started: dict[str, list[str]] = {}

    def record(server: str):
        def start(args, *rest, **kwargs):
            started[server] = list(args)
            raise RuntimeError(f"{server} recorded, not started")
        return start

    monkeypatch.setattr(bench_main, "load_our_service", REAL_LOAD_OUR_SERVICE)
    monkeypatch.setattr(bench_main, "service", record("ours"))
    monkeypatch.setattr(bench_main, "litserve_peer", record("litserve"))
    preset = PRESETS[name]
    with pytest.raises(RuntimeError, match="ours recorded"):
        bench_main.run_all(preset, tmp_path, ["cpu"], 2)
    with pytest.raises(RuntimeError, match="litserve recorded"):
        bench_main.load_peer(str(tmp_path), "atto", preset, [b"jpeg"], 2)
    saved, report = written(tmp_path)
    for args in started.values():
        assert int(args[args.index("--max-batch-size") + 1]) == saved["efficiency_batch_size"]
    assert saved["efficiency_batch_size"] in preset.batch_sizes  # the sweep times it
    assert saved["config"]["max_batch_size"] == saved["efficiency_batch_size"]
