"""bench/roadmap_timing.py: a roadmap run's CPU engines time every step in the same alternating rounds, one engine's
runners at a time, and an engine that fails on a step mid-rounds is dropped while the others run on."""
from __future__ import annotations

import itertools
import weakref
from pathlib import Path

from bench.roadmap_timing import ExportedStep, PointTiming, time_cpu_engines

STEPS = [ExportedStep(key, f"roadmap_r50_{key}", Path(f"{key}.onnx")) for key in ("kernel7", "gelu", "layernorm")]
ROUNDS = 3


class Runner:
    """A step's runner on one engine: logs each call (engine, step, batch shape); `fails` may raise on a call."""

    def __init__(self, engine: str, key: str, log: list, fails=None):
        self.engine, self.key, self.log, self.fails = engine, key, log, fails

    def __call__(self, batch):
        if self.fails is not None and self.fails(self.key, batch, self.log):
            raise RuntimeError("device lost")
        self.log.append((self.engine, self.key, batch.shape))


def _factory(engine: str, log: list, live: weakref.WeakSet, others_alive_at_build: list, fails=None):
    def build(onnx_path: Path, model: str, threads: int) -> Runner:
        assert (onnx_path, model, threads) == (Path(f"{model.removeprefix('roadmap_r50_')}.onnx"), model, 1)
        others_alive_at_build.append(sum(1 for runner in live if runner.engine != engine))
        runner = Runner(engine, model.removeprefix("roadmap_r50_"), log, fails)
        live.add(runner)
        return runner
    return build


def _timing(batch_sizes=(1, 2)) -> PointTiming:
    return PointTiming(batch_sizes=batch_sizes, seconds=0.03, rounds=ROUNDS, input_size=32, threads=1)


def _step_order(log: list, engine: str, batch_size: int) -> list[str]:
    """The steps in the order one engine ran them at one batch size, each stretch of one step's calls as one."""
    keys = [key for e, key, shape in log if e == engine and shape[0] == batch_size]
    return [key for key, _ in itertools.groupby(keys)]


def test_each_engine_times_every_step_in_alternating_rounds_and_releases_its_runners_before_the_next():
    log: list = []
    live: weakref.WeakSet = weakref.WeakSet()
    others_alive: list[int] = []
    factories = {e: _factory(e, log, live, others_alive) for e in ("onnxruntime-fp32", "openvino-f32")}
    failed: dict[str, str] = {}
    results = time_cpu_engines(STEPS, factories, list(factories), _timing(), failed)

    assert failed == {}
    for engine in factories:
        for batch_size in (1, 2):
            # Round 1 kernel7 gelu layernorm, round 2 reversed, round 3 as round 1: a round's stretches of one step
            # run into the next round's at the turns, so the steps' order reads k g l (l) g k (k) g l.
            assert _step_order(log, engine, batch_size) == ["kernel7", "gelu", "layernorm", "gelu", "kernel7",
                                                             "gelu", "layernorm"]
    # One engine after the other, each building its runners while no runner of another engine is alive.
    assert [e for e, _ in itertools.groupby(e for e, _, _ in log)] == ["onnxruntime-fp32", "openvino-f32"]
    assert others_alive == [0] * 6 and len(live) == 0
    assert {shape for _, _, shape in log} == {(1, 3, 32, 32), (2, 3, 32, 32)}
    for step in STEPS:
        assert list(results[step.key]) == list(factories)
        for engine, by_batch in results[step.key].items():
            assert list(by_batch) == ["1", "2"]
            for batch, point in by_batch.items():
                calls = sum(1 for e, key, shape in log if (e, key, shape[0]) == (engine, step.key, int(batch)))
                assert len(point["round_rates"]) == ROUNDS and all(rate > 0 for rate in point["round_rates"])
                assert point["calls"] == calls - 2  # the 2 warm-up calls of the first round are not timed
                assert point["images_per_s"] > 0 and point["p50_ms"] >= 0


def test_an_engine_failing_on_a_step_in_a_later_round_is_dropped_and_the_other_engines_run_on():
    def gelu_fails_in_the_second_round(key, batch, log) -> bool:
        # Round 2 runs the steps reversed: gelu after layernorm, which round 1 ran after gelu.
        flaky = [k for e, k, shape in log if e == "flaky-fp32" and shape[0] == batch.shape[0]]
        return key == "gelu" and "layernorm" in flaky

    log: list = []
    live: weakref.WeakSet = weakref.WeakSet()
    others_alive: list[int] = []
    factories = {"flaky-fp32": _factory("flaky-fp32", log, live, others_alive, gelu_fails_in_the_second_round),
                 "onnxruntime-fp32": _factory("onnxruntime-fp32", log, live, others_alive)}
    failed: dict[str, str] = {}
    results = time_cpu_engines(STEPS, factories, list(factories), _timing(), failed)

    assert failed == {"flaky-fp32": "step gelu: RuntimeError: device lost"}
    assert all(list(results[step.key]) == ["onnxruntime-fp32"] for step in STEPS)
    assert all(list(results[step.key]["onnxruntime-fp32"]) == ["1", "2"] for step in STEPS)
    # The failure came mid-rounds at batch 1: the engine is not timed at batch 2, and its runners are gone.
    assert {shape[0] for e, _, shape in log if e == "flaky-fp32"} == {1}
    assert "layernorm" in _step_order(log, "flaky-fp32", 1)
    assert others_alive == [0] * 6 and len(live) == 0


def test_an_engine_that_cannot_build_a_step_is_dropped_before_any_timing():
    def builds_until_gelu(onnx_path: Path, model: str, threads: int):
        if model.endswith("gelu"):
            raise ValueError("unsupported op:\n  Erf")
        return lambda batch: None

    failed: dict[str, str] = {}
    results = time_cpu_engines(STEPS, {"openvino-bf16": builds_until_gelu}, ["openvino-bf16"], _timing((1,)), failed)
    assert failed == {"openvino-bf16": "step gelu: ValueError: unsupported op: Erf"}  # one line
    assert results == {step.key: {} for step in STEPS}
