"""The calling thread's alternate signal stack, kept as it was across a call into a library that changes it.

OpenVINO 2026.4's CPU plugin, compiling a model (with the LATENCY or the THROUGHPUT hint), installs an alternate
signal stack (sigaltstack(2), ~11 KB) on the calling thread and, when that compiled model is released, puts back the
stack it found.
Two such models released in the order they were made (a hot swap: the new version loads before the old one closes)
leave the thread with the first model's stack, already freed: the next signal the thread handles with a Python handler
(CPython installs them with SA_ONSTACK: uvicorn's SIGTERM, Ctrl-C) runs on freed memory, and the process dies of
SIGSEGV instead of draining (measured, with either hint: two engines loaded and closed, then SIGTERM: exit 139).
Keeping the thread's own stack around the compile and the release leaves OpenVINO nothing to restore wrongly; its
plugin installs no signal handler of its own that would need the stack.

Linux only (where the service runs); elsewhere, or when the call is unavailable, nothing is changed.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class _SignalStack(ctypes.Structure):  # stack_t, <bits/types/stack_t.h>
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _sigaltstack():
    """libc's sigaltstack, or None where it is not to be had."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sigaltstack
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.POINTER(_SignalStack), ctypes.POINTER(_SignalStack)]
    function.restype = ctypes.c_int
    return function


_SIGALTSTACK = _sigaltstack()


def current_signal_stack() -> tuple[int, int, int] | None:
    """(address, flags, size) of the calling thread's alternate signal stack; None where it cannot be read."""
    stack = _SignalStack()
    if _SIGALTSTACK is None or _SIGALTSTACK(None, ctypes.byref(stack)) != 0:
        return None
    return stack.ss_sp or 0, stack.ss_flags, stack.ss_size


@contextmanager
def signal_stack_kept() -> Iterator[None]:
    """The calling thread's alternate signal stack is, after the block, what it was before it."""
    before = _SignalStack()
    if _SIGALTSTACK is None or _SIGALTSTACK(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        _SIGALTSTACK(ctypes.byref(before), None)
