"""The model manager's reads of the model repository (a reload's listing, manifest and hashing, a rebuild's re-read),
each bounded and one at a time: a volume that stops answering costs one stuck thread, not one per retry, and every
caller gets an answer (RepositoryStuck) instead of waiting with the reload lock held."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")
READ_TIMEOUT_S = 30.0  # a listing or a manifest: small files; hashing a version's files gets the caller's bound


class RepositoryStuck(OSError):
    """A read of the repository did not return within its bound, or an earlier one still has not."""


class RepositoryReader:
    def __init__(self, timeout_s: float = READ_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._reading: Future[Any] | None = None
        self._started = 0.0

    async def read(self, read: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """`read(*args)` on a thread of its own, within `timeout_s` (default: the reader's). Past it the read is
        abandoned (a daemon thread: it never holds the process at exit) and RepositoryStuck raised; so is it at once
        while an abandoned read has still not returned."""
        if self._reading is not None and not self._reading.done():
            raise RepositoryStuck(f"an earlier read of the model repository has not returned for "
                                  f"{time.monotonic() - self._started:.0f} s (a hung volume?)")
        limit_s = self.timeout_s if timeout_s is None else timeout_s
        self._started = time.monotonic()
        reading: Future[T] = Future()
        self._reading = reading
        threading.Thread(target=self._run, args=(reading, read, args), name="repository-read", daemon=True).start()
        try:
            async with asyncio.timeout(limit_s) as bound:
                return await asyncio.wrap_future(reading)
        except TimeoutError:
            if not bound.expired():
                raise  # the read's own (an OSError: the caller's to map)
            raise RepositoryStuck(f"the model repository did not answer within {limit_s:g} s (a hung volume?)") \
                from None

    @staticmethod
    def _run(reading: Future, read: Callable[..., Any], args: tuple) -> None:
        if not reading.set_running_or_notify_cancel():
            return
        try:
            reading.set_result(read(*args))
        except BaseException as err:  # handed to the awaiting caller, as to_thread would
            reading.set_exception(err)
