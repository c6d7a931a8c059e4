"""`python -m bench roadmap --engines`: engine selection, the ONNX variants each needs, result assembly, and the
GPU engines refused at once on a host without a GPU."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from bench.engine_benchmark import EngineResult
from bench.roadmap import get_args_parser, onnxruntime_engine, run_roadmap
from bench.roadmap_engines import (
    EnginePlan,
    bf16_problem,
    drop_failed_engines,
    engine_parities,
    gpu_engines_for,
    onnx_precisions,
    plan_engines,
    points_from,
    select_engines,
)
from bench.roadmap_report import engine_parity_note, tensorrt_profile_note, write_report
from runtime.repository import Artifact, Parity

GPU = ["tensorrt-fp16", "tensorrt-bf16", "onnxruntime-cuda-fp32"]


def test_groups_expand_in_order_and_each_engine_is_timed_once():
    assert select_engines(["cpu"]) == ["onnxruntime-fp32", "pytorch-eager-fp32", "openvino-f32", "openvino-bf16"]
    assert select_engines(["gpu"]) == GPU  # TensorRT fp16 first: the verdicts read the first engine
    assert select_engines(["tensorrt-bf16", "gpu", "onnxruntime-fp32"]) == [
        "tensorrt-bf16", "tensorrt-fp16", "onnxruntime-cuda-fp32", "onnxruntime-fp32"]


def test_an_unknown_engine_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown engines \['tensorrt-int8'\].*tensorrt-fp16"):
        select_engines(["gpu", "tensorrt-int8"])


def test_the_plan_splits_by_device_and_says_why_a_cpu_engine_is_left_out():
    no_openvino = {"openvino": "not installed (pip install openvino ...)"}
    plan = plan_engines(select_engines(["cpu", "gpu"]), ["onnxruntime-fp32", "pytorch-eager-fp32"], no_openvino)
    assert plan == EnginePlan(("onnxruntime-fp32", "pytorch-eager-fp32"), tuple(GPU), no_openvino)
    assert plan.engines == ["onnxruntime-fp32", "pytorch-eager-fp32", *GPU]
    gpu_only = plan_engines(["tensorrt-fp16"], ["onnxruntime-fp32"], no_openvino)
    assert gpu_only.cpu == () and gpu_only.skipped == {}  # openvino was not asked for: not reported
    no_bf16 = plan_engines(["openvino-bf16"], ["openvino-f32"], {"openvino-bf16": "no BF16 capability"})
    assert no_bf16.engines == [] and no_bf16.skipped == {"openvino-bf16": "no BF16 capability"}


@pytest.mark.parametrize(("engines", "weakly_typed", "expected"), [
    (GPU, False, ("fp32", "fp16", "bf16")),  # TensorRT 11: the precision is in the ONNX graph
    (["tensorrt-bf16"], False, ("fp32", "bf16")),
    (GPU, True, ("fp32",)),  # TensorRT 10 builds fp16 / bf16 engines from the fp32 graph
    (["onnxruntime-cuda-fp32"], False, ("fp32",)),
    ([], False, ("fp32",)),
])
def test_each_step_exports_the_onnx_variants_its_engines_are_built_from(engines, weakly_typed, expected):
    assert onnx_precisions(engines, weakly_typed) == expected


def test_bf16_is_refused_before_ampere():
    refused = bf16_problem("7.5", "Tesla T4")
    assert "compute capability >= 8.0" in refused and "Tesla T4 is 7.5" in refused
    assert bf16_problem("8.0", "A100") is None and bf16_problem("9.0", "H200") is None
    assert bf16_problem("10.0", "B200") is None


@pytest.mark.parametrize(("compute_capability", "expected"), [
    ("7.5", ["tensorrt-fp16", "onnxruntime-cuda-fp32"]),  # Turing: supported, no bf16 tensor cores
    ("8.0", GPU), ("8.9", GPU), ("9.0", GPU), ("12.0", GPU),
])
def test_a_pre_ampere_gpu_runs_the_gpu_group_without_tensorrt_bf16(compute_capability, expected):
    assert list(gpu_engines_for(compute_capability)) == expected


def test_engine_benchmark_results_become_roadmap_points():
    results = [EngineResult("m", "gelu", "fp16", "tensorrt-engine", b, 0, rate, p50, 1.0, calls)
               for b, rate, p50, calls in ((1, 900.0, 1.1, 40), (32, 9000.0, 3.5, 12))]
    assert points_from(results) == {"1": {"images_per_s": 900.0, "p50_ms": 1.1, "calls": 40},
                                    "32": {"images_per_s": 9000.0, "p50_ms": 3.5, "calls": 12}}


def _artifact(format, precision, max_abs_diff, top1):
    parity = Parity(reference="onnxruntime-fp32", num_inputs=10, num_real_images=6, max_abs_diff=max_abs_diff,
                    top1_agreement=top1, top5_agreement=1.0)
    return Artifact(file=f"{format}.{precision}", format=format, precision=precision, sha256="0" * 64,
                    size_bytes=1, parity=parity)


def test_each_tensorrt_engine_reports_the_parity_its_build_recorded():
    artifacts = [_artifact("onnx", "fp16", 1e-3, 1.0), _artifact("tensorrt", "fp16", 2e-3, 1.0),
                 _artifact("tensorrt", "bf16", 3e-2, 0.9)]
    timed = ["tensorrt-fp16", "tensorrt-bf16", "onnxruntime-cuda-fp32", "onnxruntime-fp32"]
    parities = engine_parities(artifacts, timed)
    assert parities == {"tensorrt-fp16": {"max_abs_diff": 2e-3, "top1_agreement": 1.0},
                        "tensorrt-bf16": {"max_abs_diff": 3e-2, "top1_agreement": 0.9}}  # not the fp16 ONNX's
    assert engine_parities(artifacts[:1], timed) == {}
    steps = [{"engine_parity": parities}, {"engine_parity": {"tensorrt-fp16": {"max_abs_diff": 5e-3,
                                                                               "top1_agreement": 0.8}}}]
    note = engine_parity_note({"engines": ["tensorrt-fp16", "tensorrt-bf16"], "steps": steps})
    assert note == (" Every engine built was verified against ONNX Runtime fp32: tensorrt-fp16 max |logit diff| "
                    "<= 0.005, top-1 agreement 0.80; tensorrt-bf16 max |logit diff| <= 0.03, top-1 agreement 0.90.")
    assert engine_parity_note({"engines": ["onnxruntime-fp32"], "steps": [{"engine_parity": {}}]}) == ""


def test_the_report_names_the_batch_each_tensorrt_engines_kernels_were_chosen_for():
    tensorrt = points_from([EngineResult("m", "gelu", "fp16", "tensorrt-engine", b, 0, 100.0, 1.0, 1.0, 5, 32)
                            for b in (1, 32)])
    cuda = points_from([EngineResult("m", "gelu", "fp32", "cuda", b, 1, 50.0, 2.0, 2.0, 5) for b in (1, 32)])
    assert "opt_batch" not in cuda["32"]
    steps = [{"results": {"tensorrt-fp16": tensorrt, "onnxruntime-cuda-fp32": cuda}}] * 2
    assert tensorrt_profile_note({"steps": steps}) == (
        " TensorRT profiles: tensorrt-fp16 opt batch 32 (opt = the largest batch timed, as the service's engine: "
        "TensorRT chose the kernels for that batch, and smaller batches run on them).")
    assert tensorrt_profile_note({"steps": [{"results": {"onnxruntime-cuda-fp32": cuda}}]}) == ""


def test_an_engine_that_failed_on_any_step_leaves_every_step():
    steps = [{"key": "kernel7", "results": {"tensorrt-fp16": {"1": {}}, "tensorrt-bf16": {"1": {}}},
              "engine_parity": {"tensorrt-fp16": {}, "tensorrt-bf16": {}}},
             {"key": "gelu", "results": {"tensorrt-fp16": {"1": {}}}, "engine_parity": {"tensorrt-fp16": {}}}]
    failed = {"tensorrt-bf16": "step gelu: ParityError: top-1 agreement 0.5 < 0.9"}
    cleaned, engines, skipped = drop_failed_engines(steps, ["tensorrt-fp16", "tensorrt-bf16"], failed)
    assert engines == ["tensorrt-fp16"] and [set(s["results"]) for s in cleaned] == [{"tensorrt-fp16"}] * 2
    assert [set(s["engine_parity"]) for s in cleaned] == [{"tensorrt-fp16"}] * 2
    assert skipped == {"tensorrt-bf16": "failed: step gelu: ParityError: top-1 agreement 0.5 < 0.9"}
    assert set(steps[0]["results"]) == {"tensorrt-fp16", "tensorrt-bf16"}  # the input is left as it was


def test_failing_engines_are_reported_and_the_others_still_make_the_report(tmp_path):
    def broken(onnx_path, model, threads):
        raise RuntimeError("no such device")

    def fails_on_gelus_fourth_call(onnx_path, model, threads):
        run, calls = onnxruntime_engine(onnx_path, model, threads), []

        def flaky(batch):
            calls.append(model)
            if model.endswith("gelu") and len(calls) >= 4:
                raise RuntimeError("provider lost")
            return run(batch)
        return flaky

    args = get_args_parser().parse_args(["--steps", "kernel7", "gelu", "--batch-sizes", "1", "--seconds", "0.1",
                                         "--input-size", "32", "--threads", "1", "--out", str(tmp_path)])
    plan = EnginePlan(("onnxruntime-fp32", "broken-fp32", "flaky-fp32"), (), {})
    factories = {"onnxruntime-fp32": onnxruntime_engine, "broken-fp32": broken,
                 "flaky-fp32": fails_on_gelus_fourth_call}
    results, failed = run_roadmap(args, plan, factories, None)
    results["config"]["command"] = "python -m bench roadmap"
    assert failed == {"broken-fp32": "step kernel7: RuntimeError: no such device",  # a build: not tried on gelu
                      "flaky-fp32": "step gelu: RuntimeError: provider lost"}  # a call, while timing
    assert results["engines"] == ["onnxruntime-fp32"] and results["device"] == "CPU"
    assert results["skipped_engines"]["broken-fp32"].startswith("failed: step kernel7")
    assert [list(s["results"]) for s in results["steps"]] == [["onnxruntime-fp32"]] * 2
    assert results["config"]["rounds"] == 3
    assert [len(s["results"]["onnxruntime-fp32"]["1"]["round_rates"]) for s in results["steps"]] == [3, 3]
    assert [s["engine_parity"] for s in results["steps"]] == [{}, {}]  # no TensorRT engine was built
    files = write_report(results, tmp_path)
    report = files["markdown"].read_text()
    assert "Not timed: broken-fp32: failed: step kernel7: RuntimeError: no such device." in report
    assert "Not timed: flaky-fp32: failed: step gelu: RuntimeError: provider lost." in report
    assert "every step on every CPU engine" in report
    gelu = json.loads(files["json"].read_text())["ledger"][1]
    assert gelu["key"] == "gelu" and np.isfinite(gelu["delta_images_per_s"]["onnxruntime-fp32 b1"])


def test_gpu_engines_on_a_host_without_a_gpu_fail_at_once_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench", "roadmap", "--engines", "gpu", "--steps", "gelu",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("python -m bench roadmap: error: this host cannot run ['tensorrt-fp16', "
                                  "'tensorrt-bf16', 'onnxruntime-cuda-fp32']:")
    assert "TensorRT" in done.stderr and "--engines cpu" in done.stderr
    assert not (tmp_path / "out").exists() and "export" not in done.stdout  # refused before exporting anything
