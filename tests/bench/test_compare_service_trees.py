"""scripts/compare_service_trees.py and bench.lone_request against an older tree's service (no preprocess_ms in its
timings), over real sockets: the overhead is unknown, not a KeyError; --output keeps every round measured before a
later one fails; the table counts the failed requests beside the rates."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from bench.loadgen import jpeg_payloads
from bench.lone_request import lone_requests
from tests.bench import old_service

ROOT = Path(__file__).resolve().parents[2]


def test_a_service_without_preprocess_ms_leaves_the_overhead_unknown():
    server = old_service.serve(0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/classify"
        lone = lone_requests(url, jpeg_payloads(sizes=((500, 375),)), 3)
    finally:
        server.shutdown()
        server.server_close()
    assert lone["requests"] == 3 and lone["served_preprocess_p50_ms"] is None and lone["overhead_p50_ms"] is None
    assert lone["inference_p50_ms"] == 5.0 and lone["preprocess_and_handoffs_ms"] == 6.0 - 0.1 - 5.0


def service_tree(root: Path, main_source: str) -> Path:
    """A source tree whose `python -m service` runs `main_source`."""
    (root / "service").mkdir(parents=True)
    (root / "service" / "__init__.py").write_text("")
    (root / "service" / "__main__.py").write_text(main_source)
    return root


def test_output_keeps_the_rounds_measured_before_a_tree_fails(tmp_path):
    before = service_tree(tmp_path / "before", Path(old_service.__file__).read_text())
    after = service_tree(tmp_path / "after", "raise SystemExit('this tree does not start')\n")
    output = tmp_path / "runs.json"
    done = subprocess.run([sys.executable, "scripts/compare_service_trees.py", "--before", str(before), "--after",
                           str(after), "--repository", str(tmp_path), "--model", "m", "--rounds", "2", "--seconds",
                           "0.5", "--concurrency", "1", "--lone-requests", "2", "--output", str(output)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "this tree does not start" in done.stderr
    runs = json.loads(output.read_text())  # round 0's before, measured before round 0's after failed
    assert runs["after"] == [] and len(runs["before"]) == 1
    assert runs["before"][0]["c1"]["ok"] > 0 and runs["before"][0]["lone"]["overhead_p50_ms"] is None


def test_the_table_counts_each_trees_failed_requests_and_leaves_an_unknown_overhead_blank(tmp_path):
    old = Path(old_service.__file__).read_text()
    before, after = service_tree(tmp_path / "before", old), service_tree(tmp_path / "after", old)
    done = subprocess.run([sys.executable, "scripts/compare_service_trees.py", "--before", str(before), "--after",
                           str(after), "--repository", str(tmp_path), "--model", "m", "--rounds", "2", "--seconds",
                           "0.5", "--concurrency", "1", "--lone-requests", "2", "--service-args", "--refuse-first 3"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("load average after")[1]
    assert "| measure | before | after | after / before | failed requests, all rounds, before / after |" in table
    # Each server refuses its first 3 POSTs: 3 per tree and round, 2 rounds.
    assert re.search(r"\| /classify c=1 images/s \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 6 / 6 \|", table)
    assert "| lone request overhead ms (client - its preprocess - its inference) | - | - | - | - |" in table
