"""build_engine against a stand-in TensorRT module: network creation flags per TensorRT major, and the timing cache.

The stand-in records what build_engine asks of TensorRT's builder, network and builder config (a GPU host runs the real
one: tests/gpu/). Everything around it (flags, profile, timing cache handling, the files written) is the real
runtime.tensorrt_build code.
"""
from __future__ import annotations

import functools
import logging
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

import runtime.tensorrt_build as tensorrt_build
from runtime.tensorrt_build import build_engine
from runtime.tensorrt_files import BatchProfile
from runtime.tensorrt_runtime import TensorRTError

TRT10_FLAGS = ("FP16", "BF16", "TF32", "OBEY_PRECISION_CONSTRAINTS")
TRT11_FLAGS = ("TF32",)  # strongly typed only: no precision flags


class StandInConfig:
    """IBuilderConfig: refuses a timing cache whose bytes are in `refused` (as TensorRT does one from another GPU)."""

    def __init__(self, refused: frozenset[bytes]):
        self.refused = refused
        self.timing_caches: list[tuple[bytes, bool]] = []  # (the cache's bytes, ignore_mismatch) per set_timing_cache
        self.cache: SimpleNamespace | None = None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool, size):
        pass

    def set_flag(self, flag):
        pass

    def clear_flag(self, flag):
        pass

    def add_optimization_profile(self, profile):
        pass

    def create_timing_cache(self, data: bytes) -> SimpleNamespace:
        return SimpleNamespace(data=bytes(data), serialize=lambda: b"timings measured on this GPU")

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.timing_caches.append((cache.data, ignore_mismatch))
        accepted = ignore_mismatch or cache.data not in self.refused
        self.cache = cache if accepted else self.cache
        return accepted

    def get_timing_cache(self):
        return self.cache


class StandInTensorRT:
    """The `tensorrt` module as build_engine uses it; TensorRT 11 when `flags` has no FP16."""

    def __init__(self, flags: tuple[str, ...], parses: bool = True, refused: frozenset[bytes] = frozenset()):
        self.network_flags: list[int] = []
        self.config = StandInConfig(refused)
        self.BuilderFlag = SimpleNamespace(__members__=dict.fromkeys(flags, 0), **{name: name for name in flags})
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=0)  # 1 << 0 is the flag's bit
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
        stand_in = self

        class Logger:
            WARNING = "warning"

            def __init__(self, severity):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags: int):
                stand_in.network_flags.append(flags)
                return SimpleNamespace(num_layers=0)

            def create_builder_config(self):
                return stand_in.config

            def create_optimization_profile(self):
                return SimpleNamespace(set_shape=lambda name, low, opt, high: None)

            def build_serialized_network(self, network, config):
                monitor = getattr(config, "progress_monitor", None)
                if monitor is not None and not stand_in.run_phases(monitor):
                    return None  # a step_complete answered False: TensorRT cancels the build
                return b"serialized engine"

        class OnnxParser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse(self, data: bytes, path: str) -> bool:
                return parses

            def get_error(self, i):
                return "stand-in parse error"

        class IProgressMonitor:
            def __init__(self):
                pass

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.IProgressMonitor = IProgressMonitor

    sigint_at_step: int | None = None  # a Ctrl-C while TensorRT works in C++, before this step's callback

    def run_phases(self, monitor, steps: int = 3) -> bool:
        """One phase of `steps` steps, each callback called as TensorRT's binding calls it (NVIDIA/TensorRT
        python/src/infer/pyCore.cpp, PyProgressMonitor): what one raises is printed and dropped, and in step_complete
        it also cancels the build. False: the build was cancelled."""
        def call(callback, *args, cancelled=None):
            try:
                if callback == monitor.step_complete and args[1] == self.sigint_at_step:
                    # Python's handler runs at the next instruction: in the real build, the callback's first one,
                    # inside the binding's catch, which is where this raises whatever the handler raises. Called,
                    # not raised: a real signal would end this test's process if no handler caught it.
                    handler = signal.getsignal(signal.SIGINT)
                    if callable(handler):  # SIG_IGN: nothing happens
                        handler(signal.SIGINT, None)
                return callback(*args)
            except BaseException:  # noqa: BLE001  # as the binding's catch (...)
                return cancelled

        call(monitor.phase_start, "Building engine", None, steps)
        for step in range(steps):
            if not call(monitor.step_complete, "Building engine", step, cancelled=False):
                return False
        call(monitor.phase_finish, "Building engine")
        return True


def _build(monkeypatch, tmp_path: Path, trt: StandInTensorRT, precision="fp16", timing_cache: Path | None = None,
           quiet: bool = True):
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    build_engine(onnx, tmp_path / "engines" / "model.engine", precision, BatchProfile(1, 4, 8), size_px=32,
                 timing_cache=timing_cache, quiet=quiet)


class FailingStderr:
    """A stderr whose writes raise `error` from the `after`-th on (0: the first)."""

    def __init__(self, error: type[BaseException], after: int = 0):
        self.error, self.after, self.lines = error, after, []

    def write(self, text: str) -> int:
        if len(self.lines) >= self.after:
            raise self.error()
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_a_ctrl_c_in_a_progress_line_cancels_the_build_and_is_raised(monkeypatch, tmp_path):
    """Ctrl-C during `export tensorrt` lands in a progress callback (the build's thread runs Python only there).
    TensorRT's binding swallowed it: in phase_start the build went on, in step_complete it was cancelled and the
    user read "TensorRT failed to build" with status 1, not "interrupted" (130). It cancels the build and is raised."""
    monkeypatch.setattr("sys.stderr", FailingStderr(KeyboardInterrupt))  # the phase's first line
    with pytest.raises(KeyboardInterrupt):
        _build(monkeypatch, tmp_path, StandInTensorRT(TRT11_FLAGS), quiet=False)
    assert not (tmp_path / "engines" / "model.engine").exists()


@pytest.mark.parametrize("quiet", [False, True], ids=["lines", "quiet"])
def test_a_ctrl_c_while_tensorrt_builds_cancels_the_build_and_is_raised(monkeypatch, tmp_path, quiet):
    """A SIGINT arriving while TensorRT runs C++ raises KeyboardInterrupt at a callback's first instruction, before any
    try there, and the binding dropped it or cancelled the build as a failure ("TensorRT failed to build", status 1);
    with --quiet there was no callback and the build ran to its end. The interrupt is noted, cancels the build at the
    next step, and is raised after it; the previous SIGINT handler is back."""
    trt = StandInTensorRT(TRT11_FLAGS)
    trt.sigint_at_step = 1
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _build(monkeypatch, tmp_path, trt, quiet=quiet)
    assert not (tmp_path / "engines" / "model.engine").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_ctrl_c_is_left_alone_where_sigint_is_ignored(monkeypatch, tmp_path):
    """A build started in the background by a script ignores SIGINT; the handler the build installed replaced that,
    and a Ctrl-C meant for the foreground job cancelled the build. It is left alone: the build finishes."""
    trt = StandInTensorRT(TRT11_FLAGS)
    trt.sigint_at_step = 1
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _build(monkeypatch, tmp_path, trt)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    except KeyboardInterrupt:
        pytest.fail("a Ctrl-C the process ignores cancelled the build")
    finally:
        signal.signal(signal.SIGINT, before)
    assert (tmp_path / "engines" / "model.engine").read_bytes() == b"serialized engine"


def test_a_closed_stderr_ends_the_progress_lines_not_the_build(monkeypatch, tmp_path, caplog):
    """`export tensorrt ... 2>&1 | head`: a progress line raising BrokenPipeError in step_complete cancelled the
    build, reported as a failed build."""
    stderr = FailingStderr(BrokenPipeError, after=2)  # the phase's line (text, newline), then the pipe closes
    monkeypatch.setattr("sys.stderr", stderr)
    every_step = functools.partial(tensorrt_build.BuildPhaseLines, step_interval_s=0)  # a line at each step
    monkeypatch.setattr(tensorrt_build, "BuildPhaseLines", every_step)
    with caplog.at_level(logging.WARNING, logger="runtime.tensorrt_progress"):
        _build(monkeypatch, tmp_path, StandInTensorRT(TRT11_FLAGS), quiet=False)
    assert (tmp_path / "engines" / "model.engine").read_bytes() == b"serialized engine"
    assert stderr.lines == ["TensorRT build: Building engine (3 steps)", "\n"]
    assert "progress lines stopped (BrokenPipeError" in caplog.text


@pytest.mark.parametrize("flags", [TRT10_FLAGS, TRT11_FLAGS], ids=["tensorrt10", "tensorrt11"])
def test_networks_are_created_without_flags(monkeypatch, tmp_path, flags):
    """TensorRT 10: weakly typed (builder flags pick the precision); TensorRT 11: STRONGLY_TYPED is deprecated and
    ignored there, networks are always strongly typed."""
    trt = StandInTensorRT(flags)
    _build(monkeypatch, tmp_path, trt)
    assert trt.network_flags == [0]
    assert (tmp_path / "engines" / "model.engine").read_bytes() == b"serialized engine"


def test_a_parse_failure_names_the_onnx_file_and_the_parser_errors(monkeypatch, tmp_path):
    with pytest.raises(TensorRTError, match="could not parse .*model.onnx: stand-in parse error"):
        _build(monkeypatch, tmp_path, StandInTensorRT(TRT11_FLAGS, parses=False))


def test_the_timing_cache_file_is_used_with_strict_device_checks_and_rewritten(monkeypatch, tmp_path):
    cache = tmp_path / ".timing_cache.trt10.13.2.6.sm90-h200"
    cache.write_bytes(b"timings from an earlier build on this GPU")
    trt = StandInTensorRT(TRT10_FLAGS)
    _build(monkeypatch, tmp_path, trt, timing_cache=cache)
    assert trt.config.timing_caches == [(b"timings from an earlier build on this GPU", False)]
    assert cache.read_bytes() == b"timings measured on this GPU"


def test_a_timing_cache_tensorrt_refuses_is_replaced_by_a_fresh_one(monkeypatch, tmp_path, caplog):
    cache = tmp_path / ".timing_cache"
    cache.write_bytes(b"timings from another GPU")
    trt = StandInTensorRT(TRT10_FLAGS, refused=frozenset({b"timings from another GPU"}))
    with caplog.at_level(logging.WARNING, logger="convnext.export"):
        _build(monkeypatch, tmp_path, trt, timing_cache=cache)
    assert trt.config.timing_caches == [(b"timings from another GPU", False), (b"", False)]  # never forced in
    assert "refused the timing cache" in caplog.text
    assert cache.read_bytes() == b"timings measured on this GPU"


def test_no_timing_cache_file_starts_an_empty_cache_and_writes_none(monkeypatch, tmp_path):
    trt = StandInTensorRT(TRT11_FLAGS)
    _build(monkeypatch, tmp_path, trt, precision="fp32")
    assert trt.config.timing_caches == [(b"", False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines", "model.onnx"]
