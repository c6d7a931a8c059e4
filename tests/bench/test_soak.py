"""`python -m bench soak --smoke` end to end (real export, `python -m service`, open loop), plus its drift maths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.service_metrics import metric_value
from bench.soak import Window, drift, format_row, rss_mb


@pytest.fixture(scope="module")
def smoke_soak(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    done = subprocess.run([sys.executable, "-m", "bench", "soak", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_smoke_soak_samples_every_window_from_the_live_server(smoke_soak):
    stdout, report = smoke_soak
    windows = report["windows"]
    assert len(windows) == report["seconds"] // report["window_s"] == 4
    assert report["rate_per_s"] == pytest.approx(0.7 * report["sustainable_images_per_s"], rel=1e-6)
    for window in windows:
        assert window["ok"] > 0 and window["p50_ms"] <= window["p99_ms"]
        assert window["rss_mb"] > 50  # the server's own RSS (onnxruntime loaded), not a placeholder
    # Read from /metrics; a window whose scrape a busy machine made late has none (the report says "-").
    depths = [window["queue_depth"] for window in windows if window["queue_depth"] is not None]
    assert depths and all(depth >= 0 for depth in depths)
    summary = report["summary"]
    assert summary["answered"] == summary["sent"] == sum(summary["statuses"].values())  # every request answered
    assert sum(w["ok"] + sum(w["errors"].values()) for w in windows) <= summary["answered"]
    # errors: every failed request, those answered after the last window too; errors_in_windows: the windows' own.
    assert summary["errors"] == sum(n for status, n in summary["statuses"].items() if status != "200")
    assert summary["errors_in_windows"] == sum(sum(w["errors"].values()) for w in windows) <= summary["errors"]
    assert "p50_ms" in stdout and "rss_growth_mb" in stdout


def test_drift_reports_latency_ratio_slope_and_memory_growth_after_the_first_window():
    windows = [Window(end_s=10.0 * i, p50_ms=10.0 + i, rss_mb=100.0 + 2 * i, ok=5) for i in range(1, 7)]
    summary = drift(windows)
    assert summary["p50_last_over_first"] == pytest.approx(16 / 11)
    assert summary["p50_slope_ms_per_min"] == pytest.approx(6.0)  # +1 ms per 10 s window
    assert summary["rss_growth_mb"] == pytest.approx(10.0)
    assert summary["rss_growth_mb_per_min"] == pytest.approx(12.0)  # 10 MB over the 50 s after window one


def test_a_window_without_a_success_gives_nulls_not_nan():
    windows = [Window(end_s=10.0, sent=5, errors={"503": 5}, rss_mb=100.0),
               *(Window(end_s=10.0 * i, p50_ms=10.0 + i, p99_ms=20.0, send_lag_max_ms=1.0, rss_mb=100.0, ok=5)
                 for i in range(2, 5))]
    summary = drift(windows)
    assert summary["p50_first_ms"] is None and summary["p50_last_over_first"] is None
    assert summary["p50_slope_ms_per_min"] == pytest.approx(6.0)  # from the windows that have a p50
    json.dumps({"windows": [w.__dict__ for w in windows], "summary": summary}, allow_nan=False)
    assert format_row(windows[0]).split()[3:6] == ["-", "-", "-"]  # p50, p99 and send lag columns


def test_queue_depth_is_read_from_a_prometheus_exposition():
    text = "# HELP convnext_queue_depth images\n# TYPE convnext_queue_depth gauge\nconvnext_queue_depth 3.0\n"
    assert metric_value(text, "convnext_queue_depth") == 3.0
    assert metric_value(text, "convnext_inflight_requests") is None


def test_rss_is_this_process_resident_memory_in_mb_as_labelled():
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    assert rss_mb(os.getpid()) == pytest.approx(kib * 1024 / 1e6, rel=0.01)  # MB (10^6 bytes), not MiB (4.9% less)


def test_a_soak_too_short_for_two_windows_is_refused():
    done = subprocess.run([sys.executable, "-m", "bench", "soak", "--minutes", "0.1", "--window-s", "10"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "two 10.0 s windows" in done.stderr
