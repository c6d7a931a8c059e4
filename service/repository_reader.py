"""Reads of the model repository off the event loop (a reload's listing, manifest and hashing, a rebuild's re-read,
/models), each bounded, at most `max_reads` at once: a volume that stops answering costs that many stuck threads,
not one per request or retry, and every caller gets an answer (RepositoryStuck) instead of waiting. Also the read of a
version to serve (load_to_serve) and of the one to start with (load_model_version)."""
from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from runtime.repository import ModelRepository, ModelVersion

T = TypeVar("T")
READ_TIMEOUT_S = 30.0  # a listing or a manifest: small files; hashing a version's files gets the caller's bound


# Errors a volume may get over by itself (a network file system's), as opposed to a permission or a missing file.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ENETDOWN,
                              errno.ENETUNREACH, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ECONNRESET,
                              errno.ECONNREFUSED, errno.ENOLINK, errno.ECOMM})


class RepositoryStuck(OSError):
    """A read of the repository did not return within its bound, or an earlier one still has not."""


def is_transient(err: OSError) -> bool:
    """A read that may succeed if tried again later: one that did not return, or an error a volume gets over."""
    return isinstance(err, (RepositoryStuck, TimeoutError, ConnectionError)) or err.errno in TRANSIENT_ERRNOS


class RepositoryReader:
    def __init__(self, timeout_s: float = READ_TIMEOUT_S, max_reads: int = 1):
        self.timeout_s, self.max_reads = timeout_s, max_reads
        self._running: dict[Future[Any], float] = {}  # reads started and not returned (abandoned ones too) -> start

    async def read(self, read: Callable[..., T], *args: Any, timeout_s: float | None = None) -> T:
        """`read(*args)` on a thread of its own, within `timeout_s` (default: the reader's). Past it the read is
        abandoned (a daemon thread: it never holds the process at exit) and RepositoryStuck raised; so is it at once
        while `max_reads` reads have not returned. Called on the event loop only."""
        self._running = {started: at for started, at in self._running.items() if not started.done()}
        now = time.monotonic()
        if len(self._running) >= self.max_reads:
            count = len(self._running)
            raise RepositoryStuck(f"{count} earlier read{'s' if count > 1 else ''} of the model repository "
                                  f"{'have' if count > 1 else 'has'} not returned, the oldest in "
                                  f"{now - min(self._running.values()):.0f} s: a hung volume?")
        limit_s = self.timeout_s if timeout_s is None else timeout_s
        reading: Future[T] = Future()
        self._running[reading] = now
        threading.Thread(target=self._run, args=(reading, read, args), name="repository-read", daemon=True).start()
        try:
            async with asyncio.timeout(limit_s) as bound:
                return await asyncio.wrap_future(reading)
        except TimeoutError:
            if not bound.expired():
                raise  # the read's own (an OSError: the caller's to map)
            raise RepositoryStuck(f"the model repository did not answer within {limit_s:g} s: a hung volume?") \
                from None

    @staticmethod
    def _run(reading: Future, read: Callable[..., Any], args: tuple) -> None:
        if not reading.set_running_or_notify_cancel():
            return
        try:
            reading.set_result(read(*args))
        except BaseException as err:  # handed to the awaiting caller, as to_thread would
            reading.set_exception(err)


def load_to_serve(repository: ModelRepository, name: str, version: int | None) -> ModelVersion:
    """A version as the service loads it (start, reload, rebuild): manifest and ONNX files verified; TensorRT engines
    are left to find-or-build, which rebuilds the one served when broken (another GPU's is never read)."""
    return repository.load(name, version, verify_engines=False)


def load_model_version(repository: ModelRepository, name: str | None, version: int | None) -> ModelVersion:
    """The version to serve at start: `name` (default: the first model) at `version` (default: the latest)."""
    models = repository.models()
    if not models:
        raise RuntimeError(f"the model repository {str(repository.root)!r} has no models; export one with "
                           "`convnext export onnx ...` or run `make demo-model`")
    return load_to_serve(repository, name or models[0], version)
