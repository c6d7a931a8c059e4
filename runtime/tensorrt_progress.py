"""TensorRT build progress on stderr: phase lines from TensorRT's progress monitor (TensorRT >= 10.0), throttled.

The lines come from BuildPhaseLines, a plain class (testable without TensorRT); the trt.IProgressMonitor subclass
that feeds it is made only once TensorRT is imported (progress_monitor).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

PREFIX = "TensorRT build:"

logger = logging.getLogger(__name__)


@dataclass
class _Phase:
    depth: int
    num_steps: int
    started_s: float
    shown: bool


class BuildPhaseLines:
    """One line per phase start and finish, indented by nesting, with a step count on long phases.

    TensorRT nests phases (per layer, per tactic) and can start hundreds a second, so: phases deeper than
    `max_depth` are not shown; a nested phase starting within `min_interval_s` of the last line is not shown (nor
    its finish); a shown phase with steps says how far it is at most every `step_interval_s`. Top-level phases
    are always shown. TensorRT may call from several threads: a lock guards the state.
    """

    def __init__(self, stream: TextIO | None = None, *, max_depth: int = 2, min_interval_s: float = 0.5,
                 step_interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.max_depth, self.min_interval_s, self.step_interval_s = max_depth, min_interval_s, step_interval_s
        self.clock = clock
        self.phases: dict[str, _Phase] = {}
        self.last_line_s = float("-inf")
        self.lock = threading.Lock()

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self.lock:
            now = self.clock()
            parent = self.phases.get(parent_phase) if parent_phase is not None else None
            depth = parent.depth + 1 if parent is not None else 0
            shown = depth == 0 or (parent is not None and depth <= self.max_depth and parent.shown
                                   and now - self.last_line_s >= self.min_interval_s)
            self.phases[phase_name] = _Phase(depth, num_steps, now, shown)
            if shown:
                steps = f" ({num_steps} steps)" if num_steps > 1 else ""
                self._print(depth, f"{phase_name}{steps}", now)

    def step_complete(self, phase_name: str, step: int) -> bool:
        """Always True: go on building (False would cancel the build)."""
        with self.lock:
            phase, now = self.phases.get(phase_name), self.clock()
            if phase is not None and phase.shown and now - self.last_line_s >= self.step_interval_s:
                self._print(phase.depth, f"{phase_name}: step {step + 1}/{phase.num_steps}", now)
        return True

    def phase_finish(self, phase_name: str) -> None:
        with self.lock:
            phase, now = self.phases.pop(phase_name, None), self.clock()
            if phase is not None and phase.shown:
                self._print(phase.depth, f"{phase_name} done in {now - phase.started_s:.1f} s", now)

    def _print(self, depth: int, text: str, now: float) -> None:
        self.last_line_s = now
        print(f"{PREFIX} {'  ' * depth}{text}", file=self.stream, flush=True)


def progress_monitor(trt, lines: BuildPhaseLines | None):
    """A trt.IProgressMonitor that hands every callback to `lines` (None: no lines, as with --quiet; the monitor still
    cancels the build on a Ctrl-C); None where TensorRT has no progress monitor.

    Keep the returned object alive until the build ends (TensorRT does not own it). TensorRT's binding swallows what
    a callback raises (it prints "Exception caught in phase_start()"; in step_complete it also cancels the build:
    NVIDIA/TensorRT python/src/infer/pyCore.cpp, PyProgressMonitor), so nothing may escape one: a KeyboardInterrupt or
    SystemExit raised inside the lines' code (by a signal handler run there) is kept in `interruption` and cancels the
    build at the next step_complete
    (False), as NVIDIA's simple_progress_monitor sample does, for build_engine to raise once the build returns; a
    line that cannot be written (a closed stderr) ends the lines, not the build. A Ctrl-C that arrives while TensorRT
    runs C++ is raised at the first instruction of the next callback, before any try in it: `interrupts_noted` keeps
    it out of the callbacks altogether.
    """
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[valid-type, misc]  # TensorRT's class, found at run time
        def __init__(self):
            base.__init__(self)  # type: ignore[misc]  # pybind11 classes need their __init__ called explicitly
            self.interruption: BaseException | None = None
            self.lines_failed = False

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._call("phase_start", phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name, step):
            self._call("step_complete", phase_name, step)
            return self.interruption is None  # False cancels the build (TensorRT's only way to stop one)

        def phase_finish(self, phase_name):
            self._call("phase_finish", phase_name)

        def _call(self, name, *args):
            if lines is None or self.interruption is not None or self.lines_failed:
                return
            callback = getattr(lines, name)
            try:
                callback(*args)
            except (KeyboardInterrupt, SystemExit) as interruption:
                self.interruption = interruption
            except Exception as error:  # noqa: BLE001  # the lines are a courtesy: the build goes on without them
                self.lines_failed = True
                logger.warning("TensorRT build progress lines stopped (%s: %s); the build goes on",
                               type(error).__name__, error)

    return _Monitor()


@contextmanager
def interrupts_noted(monitor) -> Iterator[None]:
    """While TensorRT builds, a Ctrl-C (SIGINT) is noted in `monitor.interruption` instead of raised: the build runs in
    C++ and returns to Python only in the monitor's callbacks, where CPython would raise KeyboardInterrupt at the
    callback's first instruction, outside anything the callback can catch, and TensorRT's binding would drop it or
    report a failed build. Noted, it cancels the build at the next step_complete, and build_engine raises it once the
    build returns. Python runs the handler only when the main thread runs Python code, here at the build's next
    callback; from then a second Ctrl-C ends the process at once (the default action), for a build slow to reach a
    step. Only in the main thread (where Python runs signal handlers), and not where SIGINT is ignored (a job started
    in the background by a script: a Ctrl-C meant for the foreground job); elsewhere, and without a monitor, nothing
    changes."""
    if (monitor is None or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield
        return

    def note(signum: int, frame) -> None:
        monitor.interruption = monitor.interruption or KeyboardInterrupt()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:  # None: a handler set outside Python, which cannot be put back; the default is the nearest
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
