"""TensorRT build progress without TensorRT: the phase lines, their throttling, the monitor's delegation, --quiet."""
from __future__ import annotations

import io
import subprocess
import sys
import types

from export.__main__ import get_args_parser
from runtime.tensorrt_progress import BuildPhaseLines, progress_monitor


class Clock:
    """A settable clock: the throttling is a function of the time the callbacks come in."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def phase_lines(**kwargs) -> tuple[BuildPhaseLines, io.StringIO, Clock]:
    stream, clock = io.StringIO(), Clock()
    return BuildPhaseLines(stream, clock=clock, **kwargs), stream, clock


def test_phase_start_and_finish_are_one_line_each_indented_by_nesting():
    lines, stream, clock = phase_lines()
    lines.phase_start("Building engine", None, 3)
    clock.now += 1
    lines.phase_start("Computing costs", "Building engine", 120)
    clock.now += 1
    lines.phase_start("Tactic timing", "Computing costs", 1)
    clock.now += 2.5
    lines.phase_finish("Tactic timing")
    lines.phase_finish("Computing costs")
    clock.now += 10
    lines.phase_finish("Building engine")
    assert stream.getvalue().splitlines() == [
        "TensorRT build: Building engine (3 steps)",
        "TensorRT build:   Computing costs (120 steps)",
        "TensorRT build:     Tactic timing",
        "TensorRT build:     Tactic timing done in 2.5 s",
        "TensorRT build:   Computing costs done in 3.5 s",
        "TensorRT build: Building engine done in 14.5 s",
    ]


def test_a_burst_of_nested_phases_is_throttled_and_top_level_phases_always_show():
    lines, stream, clock = phase_lines(min_interval_s=0.5, max_depth=2)
    lines.phase_start("Building engine", None, 1)
    clock.now += 0.1  # within the interval: this phase, its finish and its children stay silent
    lines.phase_start("layer 1", "Building engine", 4)
    clock.now += 1
    lines.phase_start("tactic of layer 1", "layer 1", 4)
    lines.phase_finish("tactic of layer 1")
    lines.phase_finish("layer 1")
    lines.phase_start("layer 2", "Building engine", 1)  # past the interval: shown
    lines.phase_start("tactic of layer 2", "layer 2", 1)  # right after a line: silent
    lines.phase_finish("tactic of layer 2")
    clock.now += 1
    lines.phase_start("too deep", "layer 2", 1)
    lines.phase_start("deeper than max_depth", "too deep", 1)  # depth 3
    lines.phase_finish("deeper than max_depth")
    lines.phase_finish("too deep")
    lines.phase_finish("layer 2")
    lines.phase_start("Serializing", None, 1)  # top level: shown even within the interval
    assert stream.getvalue().splitlines() == [
        "TensorRT build: Building engine",
        "TensorRT build:   layer 2",
        "TensorRT build:     too deep",
        "TensorRT build:     too deep done in 0.0 s",
        "TensorRT build:   layer 2 done in 1.0 s",
        "TensorRT build: Serializing",
    ]


def test_a_long_phase_says_its_step_at_most_every_step_interval():
    lines, stream, clock = phase_lines(step_interval_s=10.0)
    lines.phase_start("Computing costs", None, 50)
    for step in range(50):
        clock.now += 1
        assert lines.step_complete("Computing costs", step) is True  # never cancels the build
    assert stream.getvalue().splitlines()[1:] == [
        "TensorRT build: Computing costs: step 10/50", "TensorRT build: Computing costs: step 20/50",
        "TensorRT build: Computing costs: step 30/50", "TensorRT build: Computing costs: step 40/50",
        "TensorRT build: Computing costs: step 50/50"]


def test_the_monitor_subclasses_tensorrts_interface_and_hands_every_callback_to_the_lines():
    class IProgressMonitor:  # TensorRT cannot be installed here: a stand-in for trt.IProgressMonitor
        def __init__(self):
            self.initialised = True

    lines, stream, _ = phase_lines()
    monitor = progress_monitor(types.SimpleNamespace(IProgressMonitor=IProgressMonitor), lines)
    assert isinstance(monitor, IProgressMonitor) and monitor.initialised
    monitor.phase_start("Building engine", None, 2)
    assert monitor.step_complete("Building engine", 0) is True
    monitor.phase_finish("Building engine")
    assert stream.getvalue().splitlines() == [
        "TensorRT build: Building engine (2 steps)", "TensorRT build: Building engine done in 0.0 s"]
    assert progress_monitor(types.SimpleNamespace(), lines) is None  # a TensorRT before 10.0: no monitor


def test_export_tensorrt_has_a_quiet_flag():
    assert get_args_parser().parse_args(["tensorrt", "--name", "atto", "--quiet"]).quiet is True
    assert get_args_parser().parse_args(["tensorrt", "--name", "atto"]).quiet is False
    result = subprocess.run([sys.executable, "-m", "export", "tensorrt", "--help"], capture_output=True, text=True,
                            check=True)
    assert "--quiet" in result.stdout
