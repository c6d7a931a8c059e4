"""ServiceState: what the lifespan owns (settings, metrics, model manager, decode pool and budget, admission, the memory
bound on request bodies that HTTP and gRPC share, the v2 conversion pool, the repository reader, the gRPC per-client
limiter and calls in flight), one per app."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from runtime.engines.base import Engine
from runtime.repository import ModelVersion
from service.admission import Admission, admission_capacity
from service.batcher import Batcher
from service.body_budget import BodyBudget
from service.decode_budget import MIB, DecodeBudget
from service.grpc_calls import CallsInFlight
from service.grpc_clients import ArrivingMessages
from service.manifest_cache import ManifestCache
from service.metrics import ServiceMetrics
from service.model_manager import ModelManager
from service.repository_reader import RepositoryReader
from service.settings import Settings

CONVERSIONS_AT_ONCE = 2
LISTINGS_AT_ONCE = 8  # /models requests reading the repository at once; more get 503 repository_unavailable


class ServiceState:
    def __init__(self, settings: Settings, metrics: ServiceMetrics, body_budget: BodyBudget):
        self.settings, self.metrics, self.body_budget = settings, metrics, body_budget
        self.models: ModelManager | None = None  # the served version, its engine and the batcher
        self.preprocess_pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="preprocess")
        # Bounds images being decoded at once, so a flood waits here instead of piling up in the pool.
        self.preprocess_slots = asyncio.Semaphore(settings.preprocess_workers * 2)
        # The memory those decodes may hold at once: each image reserves its peak from its header before decoding.
        self.decode_budget = DecodeBudget(settings.decode_memory_mb * MIB, metrics.decode_memory_wait.observe)
        metrics.decode_memory.set_function(lambda: self.decode_budget.reserved_bytes)
        # Large v2 requests are parsed and converted here (service/v2.py, grpc_server.py): each builds a Python object
        # per number (several times its JSON in memory) and holds the GIL much of its run, so a flood of them waits
        # for these threads instead of all parsing at once. A request waits for a slot on the event loop and is
        # handed to the pool only holding one (service.pipeline.converted), so nothing waits in the pool's queue,
        # where a job kept its request's body after the request was answered; the slot is given back when the
        # thread ends, not when the request does: a cancelled gRPC call's thread goes on converting, and still holds
        # its place until it ends.
        self.conversion_slots = asyncio.Semaphore(CONVERSIONS_AT_ONCE)
        self.conversion_pool = ThreadPoolExecutor(CONVERSIONS_AT_ONCE, thread_name_prefix="v2-convert")
        # /models' reads of the repository: bounded, a few at once (service/repository_reader.py).
        self.repository_reader = RepositoryReader(max_reads=LISTINGS_AT_ONCE)
        self.manifest_cache = ManifestCache()  # /models' manifests, parsed once while unchanged
        # Images in progress (decoding, queued or in the running batch); beyond this a request is refused at once.
        self.admission = Admission(admission_capacity(settings.queue_size, settings.max_batch_size))
        # gRPC calls per client address waiting for room in the body budget or receiving their message.
        self.grpc_arrivals = ArrivingMessages(settings.grpc_messages_per_client)
        # gRPC calls being handled, at most max_connections (service/grpc_calls.py).
        self.grpc_calls = CallsInFlight(settings.max_connections)
        metrics.grpc_inflight.set_function(lambda: self.grpc_calls.count)

    @property
    def version(self) -> ModelVersion | None:
        return self.models.model if self.models is not None else None

    @property
    def engine(self) -> Engine | None:
        return self.models.current.engine if self.models is not None and self.models.current is not None else None

    @property
    def batcher(self) -> Batcher | None:
        return self.models.batcher if self.models is not None else None

    @property
    def not_ready_reason(self) -> str | None:
        return self.models.not_ready_reason if self.models is not None else "the model is not loaded yet"

    @property
    def not_live_reason(self) -> str | None:
        """Why the process should be restarted (the engine cannot be rebuilt in it); None while it is live."""
        return self.models.not_live_reason if self.models is not None else None

    @property
    def is_ready(self) -> bool:
        return self.not_ready_reason is None
