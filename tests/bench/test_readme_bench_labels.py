"""README's `/classify` tables say how their images/s were counted. The cpu-serving runs before bench/loadgen.py's
steady_rate counted the requests completed in the window (a count that moves in steps of a batch); the README must
label the tables quoted from them, and the committed outputs show which runs those are."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "docs" / "benchmarks" / "cpu-serving-2core-zen4"
OLD_METHOD = "count-in-window"


def counted_in_window(output: Path) -> bool:
    """Every load level's images/s is exactly its completed requests / its window: the method before steady_rate."""
    rows = json.loads(output.read_text())
    return all(row[level]["images_per_s"] == row[level]["ok"] / row[level]["elapsed_s"]
               for row in rows for level in ("c8", "c32"))


def readme_paragraph(start: str) -> str:
    return next(p for p in (ROOT / "README.md").read_text().split("\n\n") if p.startswith(start))


def test_the_cpu_serving_tables_counted_in_the_window_are_labelled_so():
    assert counted_in_window(RUNS / "cpu_serving.json") and counted_in_window(RUNS / "session7" / "cpu_serving.json")
    assert not counted_in_window(RUNS / "session11" / "cpu_serving.json")  # steady_rate from here on
    main_run = readme_paragraph("**`/classify` vs the served engine** (`python -m bench cpu-serving")
    assert f"**Measured with the old {OLD_METHOD} method:**" in main_run and "steady_rate" in main_run
    assert OLD_METHOD in readme_paragraph("`/classify` vs the served engine (`bench cpu-serving`, same settings")
