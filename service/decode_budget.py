"""DecodeBudget: the bytes that images being decoded may hold at once (decode_memory_mb), all requests together.

Each decode thread reserves its image's peak (runtime.decode_memory, from the header, before a pixel is decoded) and
gives it back when the tensor is made. A thread whose image does not fit waits, first come first served (a large
picture is not overtaken forever by small ones), until its request's deadline or until its request is abandoned (the
client left, or another image of the request failed). preprocess_workers x max_pixels x ~9 bytes (several GB on a big
host) could otherwise be held by a burst of large PNGs; a decode budget bounds it whatever the core count.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from runtime.preprocess import ImageError

MIB = 1024 * 1024


class DecodeWaitTimeout(Exception):
    """The request's deadline passed while its image waited for decode memory."""


class DecodeAbandoned(Exception):
    """The request was abandoned while its image waited for decode memory."""


class DecodeBudget:
    def __init__(self, limit_bytes: int, observe_wait: Callable[[float], None] | None = None):
        self.limit_bytes = limit_bytes
        # Called with each reservation's wait for memory (0 when it fitted at once), however the wait ended: the waits
        # that end at a deadline or an abandoned request are the longest (convnext_decode_memory_wait_seconds).
        self.observe_wait = observe_wait
        self._free = limit_bytes
        self._waiting: deque[object] = deque()  # tickets, in arrival order
        self._changed = threading.Condition()

    @property
    def reserved_bytes(self) -> int:
        return self.limit_bytes - self._free

    @contextmanager
    def reserved(self, nbytes: int, deadline: float, abandoned: threading.Event) -> Iterator[float]:
        """Hold nbytes of the budget (in a decode thread) until the block ends; gives the seconds it waited for them.
        Raises ImageError too_many_pixels (413) when nbytes exceeds the whole budget, DecodeWaitTimeout at `deadline`
        (time.monotonic()) and DecodeAbandoned once `abandoned` is set (then call wake())."""
        if nbytes > self.limit_bytes:
            raise ImageError("too_many_pixels", f"decoding the image would hold {nbytes / MIB:.0f} MiB, over the "
                             f"decode memory budget of {self.limit_bytes / MIB:.0f} MiB (decode_memory_mb)")
        asked = time.perf_counter()
        try:
            self._acquire(nbytes, deadline, abandoned)
        finally:
            waited_s = time.perf_counter() - asked
            if self.observe_wait is not None:
                self.observe_wait(waited_s)
        try:
            yield waited_s
        finally:
            with self._changed:
                self._free += nbytes
                self._changed.notify_all()

    def _acquire(self, nbytes: int, deadline: float, abandoned: threading.Event) -> None:
        with self._changed:
            if abandoned.is_set():  # its request ended while the thread was on its way here
                raise DecodeAbandoned()
            if not self._waiting and self._free >= nbytes:  # the usual case: nobody waits, it fits
                self._free -= nbytes
                return
            ticket = object()
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self._free < nbytes:
                    if abandoned.is_set():
                        raise DecodeAbandoned()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DecodeWaitTimeout()
                    self._changed.wait(remaining)
                self._free -= nbytes
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now, or it was waiting behind this one

    def wake(self) -> None:
        """Let waiting threads look at their abandoned events again (after setting one)."""
        with self._changed:
            self._changed.notify_all()
