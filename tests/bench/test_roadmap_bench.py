"""`python -m bench roadmap`: a real one-step run end to end, and the ledger / verdict / plot on given figures."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.roadmap_report import NOISE, PLOT, gelu_section, ledger, markdown, noise_level, verdict, write_report
from model.flops import measure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_roadmap_bench_runs_one_step_on_every_cpu_engine(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "roadmap", "--steps", "gelu", "--batch-sizes", "1", "2", "--seconds", "0.2",
         "--rounds", "2", "--input-size", "32", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    (step,) = results["steps"]
    assert (step["model"], step["top1"], step["delta_top1"]) == ("roadmap_r50_gelu", 80.62, 0.05)
    # GMACs at the 32 px timed (the "input 32x32" the report heads them with), not the paper's 224 px (4.146).
    assert step["gmacs"] == pytest.approx(measure("roadmap_r50_gelu", 32).gmacs, abs=1e-4) and step["gmacs"] < 0.2
    assert step["input_size_px"] == 32 and step["gmacs_vs_paper"] is None
    assert step["parity_top1_agreement"] == 1.0 and step["parity_max_abs_diff"] < 1e-3
    assert {"onnxruntime-fp32", "pytorch-eager-fp32"} <= set(results["engines"])
    assert "openvino-f32" in results["engines"] or "not installed" in results["skipped_engines"]["openvino"]
    for engine in results["engines"]:
        assert set(step["results"][engine]) == {"1", "2"}
        # At least 5 timed calls per point, however slow a call is against --seconds 0.2.
        assert all(point["images_per_s"] > 0 and point["calls"] >= 5 for point in step["results"][engine].values())
        assert all(len(point["round_rates"]) == 2 for point in step["results"][engine].values())
    assert results["config"]["rounds"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "Steps timed in 2 interleaved rounds per engine and batch size (every engine:" in report
    assert results["host"] in report and "Load average" in report and str(results["load_average_after"]) in report
    assert "Reproduce (one line): `nice -n 0 python -m bench roadmap --steps gelu" in report
    assert "GMACs: conv + linear multiply-accumulates of one 32x32 image, the size timed" in report
    assert (tmp_path / PLOT).read_bytes().startswith(PNG_MAGIC)


def _step(key, row, top1, std, gmacs, parent, speeds, on_path=True):
    return {"row": row, "key": key, "label": key, "model": f"roadmap_r50_{key}", "parent": parent, "on_path": on_path,
            "params_m": 25.0, "gmacs": gmacs, "top1": top1, "top1_std": std, "parity_max_abs_diff": 1e-6,
            "parity_top1_agreement": 1.0,
            "results": {"onnxruntime-fp32": {"1": {"images_per_s": speeds[0], "calls": 40 + row},
                                             "8": {"images_per_s": speeds[1], "calls": 5 + row}}}}


@pytest.fixture()
def results():
    return {
        "config": {"regime": "r50", "source": "Table 10", "batch_sizes": [1, 8], "seconds_per_point": 2.5,
                   "rounds": 3, "min_calls_per_point": 5, "input_size": 224, "threads": 2,
                   "command": "python -m bench roadmap"},
        "host": "Linux, Test CPU (AVX2), 2 cores", "load_average_before": [1.0, 1.0, 1.0],
        "load_average_after": [2.0, 1.5, 1.0], "versions": {}, "engines": ["onnxruntime-fp32"],
        "skipped_engines": {"openvino": "not installed"},
        "steps": [_step("kernel7", 9, 80.57, 0.14, 4.15, None, (40.0, 60.0)),
                  _step("kernel9", 10, 80.57, 0.06, 4.21, "kernel7", (39.0, 58.0), on_path=False),
                  _step("gelu", 12, 80.62, 0.14, 4.15, "kernel7", (30.0, 45.0)),
                  _step("fewer_activations", 13, 81.27, 0.06, 4.15, "gelu", (36.0, 44.0))],
    }


def test_ledger_sets_each_delta_against_the_row_it_modifies(results):
    entries = {e["key"]: e for e in ledger(results)}
    assert entries["kernel7"]["verdict"] == "baseline" and entries["kernel7"]["delta_top1"] is None
    gelu = entries["gelu"]
    assert gelu["parent"] == "kernel7" and gelu["delta_top1"] == 0.05  # vs kernel 7, not the kernel 9 row above
    assert gelu["delta_images_per_s"] == {"onnxruntime-fp32 b1": pytest.approx(-0.25),
                                          "onnxruntime-fp32 b8": pytest.approx(-0.25)}
    assert gelu["verdict"] == "paid, no gain beyond std"
    assert entries["fewer_activations"]["verdict"] == "free: accuracy at no throughput cost"  # -2.2% is noise
    assert entries["kernel9"]["verdict"] == "no change"


@pytest.mark.parametrize(("delta_top1", "delta_speed", "expected"), [
    (0.65, -0.20, "bought: accuracy for throughput"), (0.65, 0.0, "free: accuracy at no throughput cost"),
    (0.65, 0.20, "won both"), (-1.23, 0.40, "traded accuracy for speed"), (-0.72, -0.20, "lost both"),
    (0.05, -0.20, "paid, no gain beyond std"), (0.05, 0.20, "faster, same accuracy"), (-0.5, 0.0,
                                                                                       "lost accuracy, same speed"),
])
def test_verdict_reads_accuracy_beyond_the_seed_std_and_speed_beyond_the_noise(delta_top1, delta_speed, expected):
    assert verdict(delta_top1, 0.14, delta_speed) == expected
    assert verdict(0.65, 0.14, -NOISE / 2) == "free: accuracy at no throughput cost"


def test_a_run_reads_its_noise_from_its_two_same_network_rows(results):
    assert noise_level(results) == NOISE  # no rows 0 and 1 in this run
    twins = [_step("resnet50_original", 0, 76.13, None, 4.09, None, (20.0, 20.0)),
             _step("resnet50", 1, 78.82, 0.07, 4.09, "resnet50_original", (21.0, 24.0))]
    results["steps"] = twins + results["steps"]
    assert noise_level(results) == pytest.approx(0.20)
    entries = {e["key"]: e for e in ledger(results)}
    assert entries["resnet50"]["verdict"] == "free: accuracy at no throughput cost"  # +20% is this run's noise
    assert entries["gelu"]["verdict"] == "paid, no gain beyond std"  # -25% is beyond it


def test_report_answers_the_gelu_question_and_draws_the_plot(results, tmp_path):
    files = write_report(results, tmp_path)
    report = files["markdown"].read_text()
    assert "| onnxruntime-fp32 | 8 | 60.0 | 45.0 | 0.750 |" in report
    assert "80.57 +/- 0.14 -> 80.62 +/- 0.14 (+0.05, inside one seed std)" in report
    assert "## ReLU -> GELU (row 12 vs row 9)" in report and "mean +/- std of 3 seeds in Table 10" in report
    # How many calls the points rest on: the fewest is batch 8 of row 9 (5 + 9 in this fixture).
    assert "at least 5 calls" in report and "Timed calls per point: 14 to 53 (the fewest: onnxruntime-fp32 b8, row 9" \
        in report
    assert "| 12 | gelu | +0.05 | +0.0% | -25.0% | -25.0% | paid, no gain beyond std |" in report
    assert "Not timed: openvino: not installed." in report and "Test CPU (AVX2)" in report
    assert files["plot"].read_bytes().startswith(PNG_MAGIC)
    assert json.loads(files["json"].read_text())["ledger"][2]["key"] == "gelu"
    assert markdown(results) + "\n" == report
    # Figures without per-round rates (a run from before the rounds, or GPU engines) say they were timed in turn.
    assert "Steps timed one after another (every engine: each step minutes after the previous)" in report
    assert "interleaved" not in report and "In brackets" not in report


def test_the_ledger_gives_an_interleaved_delta_its_range_over_the_rounds(results):
    for step in results["steps"]:
        for point in step["results"]["onnxruntime-fp32"].values():
            point["round_rates"] = [point["images_per_s"]] * 3
    gelu = next(s for s in results["steps"] if s["key"] == "gelu")
    gelu["results"]["onnxruntime-fp32"]["8"]["round_rates"] = [42.0, 45.0, 48.0]  # kernel 7: 60 in every round
    # A GPU engine beside it, timed step after step: no per-round rates, no range, and the report says so.
    results["engines"].append("tensorrt-fp16")
    for step in results["steps"]:
        step["results"]["tensorrt-fp16"] = {b: {"images_per_s": p["images_per_s"], "calls": p["calls"]}
                                            for b, p in step["results"]["onnxruntime-fp32"].items()}
    entries = {e["key"]: e for e in ledger(results)}
    assert entries["gelu"]["delta_images_per_s_rounds"] == {"onnxruntime-fp32 b1": pytest.approx([-0.25, -0.25]),
                                                            "onnxruntime-fp32 b8": pytest.approx([-0.30, -0.20])}
    assert entries["kernel7"]["delta_images_per_s_rounds"] == {}
    report = markdown(results)
    assert "| 12 | gelu | +0.05 | +0.0% | -25.0% (-25% to -25%) | -25.0% (-30% to -20%) | -25.0% | -25.0% |" in report
    assert ("Steps timed in 3 interleaved rounds per engine and batch size (onnxruntime-fp32: the steps in turn, the "
            "order reversed every other round") in report
    assert "Steps timed one after another (tensorrt-fp16: each step minutes after the previous)" in report
    assert "In brackets: the lowest and highest per-round delta" in report


def test_a_table_without_seed_std_claims_none(results):
    # Table 11 (--regime r200) gives no std: no "+/- None", no seed-std verdict, the right table named.
    results["config"].update(regime="r200", source="Table 11")
    for step in results["steps"]:
        step["top1_std"] = None
    section = "\n".join(gelu_section(results))
    assert "None" not in section and "seed std" not in section
    assert "Paper (Table 11): top-1 80.57 -> 80.62 (+0.05; Table 11 gives no std" in section
    report = markdown(results)
    assert "Table 10" not in report and "None" not in report and "seed std" not in report
    assert "Table 11 gives no std, so any top-1 change counts" in report
