"""Admission control: a request's images are counted in before any decoding, so overload is refused at once.

The batcher's queue bounds images waiting for the engine, but decoding comes first: under overload, requests that
the queue will refuse would still wait for a decode slot and burn CPU on decoding before their 503. Admission
counts every image from the moment its request is accepted until its answer is ready (decoding, queued or
running), and refuses a request whose images do not fit, before reading further.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class AdmissionRefused(Exception):
    """Not enough room for this request's images right now (503 + Retry-After)."""


class Admission:
    """A counter owned by the event loop (single-threaded: no lock), with a fixed capacity in images."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"admission capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.admitted = 0

    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        if self.admitted + images > self.capacity:
            raise AdmissionRefused(f"the service is at capacity ({self.admitted} images in progress, limit "
                                   f"{self.capacity}); retry later")
        self.admitted += images
        try:
            yield
        finally:
            self.admitted -= images
