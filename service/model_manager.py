"""The served model: owns the model version, its engine and the batcher; hot-swaps versions and recovers engines."""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from runtime.repository import ModelRepository, ModelVersion, RepositoryError
from service.admission import admission_capacity
from service.batcher import Batcher, EngineThread, ServedModel
from service.engine_builds import (
    BuildTimeoutError,
    EngineFactory,
    ReloadRefused,
    bounded_build,
    build_timeout_s,
    close_engine,
    close_prepared,
    prepared_engine,
)
from service.metrics import ServiceMetrics
from service.repository_reader import RepositoryReader, RepositoryStuck, is_transient, load_model_version, load_to_serve
from service.repository_watch import RefusedManifests, changed_version, created_at

if TYPE_CHECKING:
    from service.settings import Settings

logger = logging.getLogger("convnext.service")
RECOVERY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# convnext_engine_restarts_total{reason}: why the batcher gave an engine up (service/batcher.py's _detach calls);
# convnext_model_reloads_total{result}.
ENGINE_BROKEN_REASONS = ("engine_timeout", "consecutive_failures")
RELOAD_RESULTS = ("ok", "refused", "unavailable")
BUILD_ATTEMPTS = 3  # builds of a version, each overtaken by an export of it anew, before giving up


class ModelManager:
    """One job: which model version is served by which engine, and replacing that engine safely.

    Every engine is built, loaded, warmed up and smoke-run on its own new thread while the current one keeps
    serving; the batcher then swaps between batches. A broken engine (timeout or repeated failures, reported
    by the batcher) is abandoned and rebuilt from the same version, re-read from the repository, until one works;
    after engine_max_rebuild_attempts failed rebuilds in a row the process reports itself not live.
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics, engine_factory: EngineFactory):
        self.settings, self.metrics, self.engine_factory = settings, metrics, engine_factory
        self.repository = ModelRepository(settings.repository)
        self.current: ServedModel | None = None  # the last model swapped in (also while its engine is broken)
        self.batcher: Batcher | None = None
        self._broken_reason: str | None = "the model is not loaded yet"
        self._refused = RefusedManifests()  # the watcher retries none until it is exported anew
        self._failed_rebuilds = 0  # in a row, since the engine last broke
        self._last_rebuild_error: str | None = None
        self.build_limit_s = build_timeout_s(settings)  # each build's bound: the start's, a reload's, a rebuild's
        self.reader = RepositoryReader()  # a reload's and a rebuild's reads of the repository, each bounded
        self._watch_reader = RepositoryReader()  # the watcher's polls
        self._info_labels: tuple[str, ...] | None = None  # convnext_model_info's labels, as set last
        self._lock = asyncio.Lock()  # one reload or recovery at a time
        self._recovery: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()  # engines closing in the background; stop() awaits them
        self._stopping = False  # stop() has begun: an engine that breaks now is closed, not rebuilt
        registry = metrics.registry
        self.restarts = Counter("convnext_engine_restarts_total",
                                "engines abandoned as broken, by reason (each rebuilt unless the service is stopping)",
                                ["reason"], registry=registry)
        # A reload answered 404, 409 or shutting_down is none of these (README: Metrics).
        self.reloads = Counter("convnext_model_reloads_total", "model reloads, by result: ok (swapped in), refused "
                               "(the version failed), unavailable (the repository could not be read)", ["result"],
                               registry=registry)
        # Each series exists (at 0) before its first event, as convnext_inference_seconds's: rates read 0, not empty.
        for reason in ENGINE_BROKEN_REASONS:
            self.restarts.labels(reason)
        for result in RELOAD_RESULTS:
            self.reloads.labels(result)
        ready = Gauge("convnext_ready", "1 while the service can classify (what /readyz says)", registry=registry)
        ready.set_function(lambda: float(self.not_ready_reason is None))

    @property
    def not_ready_reason(self) -> str | None:
        if self._broken_reason is not None:
            return self._broken_reason
        if self.batcher is None or not self.batcher.alive:
            return "the batcher is not running"
        if self._watch is not None and self._watch.done():
            return "the repository watcher stopped"
        return None

    @property
    def not_live_reason(self) -> str | None:
        """Set once rebuilding a broken engine has failed engine_max_rebuild_attempts times in a row: /healthz
        fails so the orchestrator restarts the container (a sticky device fault does not clear in-process)."""
        limit = self.settings.engine_max_rebuild_attempts
        if self._failed_rebuilds < limit:
            return None
        return (f"the engine could not be rebuilt in {self._failed_rebuilds} attempts in a row (limit "
                f"engine_max_rebuild_attempts={limit}; last error: {self._last_rebuild_error}); restart the service")

    @property
    def serving(self) -> ServedModel:
        """The model swapped in last: start() sets it before the lifespan lets any request or task in."""
        if self.current is None:
            raise RuntimeError("the model manager has not started")
        return self.current

    @property
    def running_batcher(self) -> Batcher:
        """The batcher: start() creates it before the lifespan lets any request or task in."""
        if self.batcher is None:
            raise RuntimeError("the model manager has not started")
        return self.batcher

    @property
    def model(self) -> ModelVersion | None:
        return self.current.model if self.current is not None else None

    async def start(self) -> None:
        settings = self.settings
        model = await self.reader.read(load_model_version, self.repository, settings.model, settings.version,
                                       timeout_s=self.build_limit_s)
        served = await bounded_build(self._build(model), self.build_limit_s, "the first engine build")
        spec = served.engine.describe()
        # The queue holds every image admission lets in (service/admission.py), so admitted means accepted.
        queue_size = admission_capacity(settings.queue_size, settings.max_batch_size)
        self.batcher = Batcher(served, min(settings.max_batch_size, spec.max_batch_size), settings.max_queue_delay_ms,
                               queue_size, self.metrics, engine_timeout_ms=settings.engine_timeout_ms,
                               max_consecutive_failures=settings.engine_max_consecutive_failures,
                               on_broken=self._on_broken)
        self.batcher.start()
        self.current = served
        self._broken_reason = None
        self._show(served)
        if settings.watch_interval_s > 0:
            self._watch = asyncio.get_running_loop().create_task(self._watch_repository(), name="repository-watch")

    async def stop(self, drain_timeout_s: float) -> None:
        self._stopping = True
        self._broken_reason = "the service is shutting down"
        for task in (self._watch, self._recovery):
            if task is not None:
                task.cancel()
        if self.batcher is not None:
            await self.batcher.drain(drain_timeout_s)
        # The engine the batcher serves: current, or a reload's new one while that reload waits in swap() for the old
        # one's last batches (the reload closes the old one). A detached engine has been closing since it broke.
        served = self.batcher.served if self.batcher is not None else self.current
        if served is not None:
            await self._close(served)
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def reload(self, version: int | None) -> dict:
        """Load `version` (None: the latest) of the served model and swap it in, or raise ReloadRefused."""
        if self._stopping:  # nothing would close an engine swapped into the drained batcher
            raise ReloadRefused(503, "shutting_down", "the service is shutting down")
        if self._lock.locked():
            raise ReloadRefused(409, "reload_in_progress", "a reload or an engine recovery is in progress; retry "
                                "when /readyz says ready")
        async with self._lock:
            name = self.serving.name
            try:
                known = await self.reader.read(self.repository.versions, name)
            except (RepositoryError, OSError) as err:  # a transient error (a network volume, say): nothing to refuse
                raise self._unavailable(err) from None
            target = version if version is not None else max(known, default=None)
            if target is None or target not in known:
                raise ReloadRefused(404, "version_not_found", f"{name}/{version or 'latest'} is not in the "
                                    f"repository (it has versions {known})")
            attempted: datetime | None = None  # the manifest's created_at: what is refused, if it is
            try:
                # None: unreadable (refused below)
                attempted = await self.reader.read(created_at, self.repository, name, target)
                # Hashing the version's files: bounded like its build.
                model = await self.reader.read(load_to_serve, self.repository, name, target,
                                               timeout_s=self.build_limit_s)
            except OSError as err:
                if is_transient(err):  # the volume (an I/O error, a read that did not return), not the version
                    raise self._unavailable(err) from None
                raise self._refuse(name, target, attempted, err) from None  # unreadable for good (permissions, say)
            except Exception as err:  # a bad hash or manifest, a missing file
                raise self._refuse(name, target, attempted, err) from None
            try:
                served = await bounded_build(self._build(model, self._check_compatible), self.build_limit_s,
                                             "the reload")
            except RepositoryStuck as err:  # the build's re-read of the manifest: the volume again, not the version
                raise self._unavailable(err) from None
            except Exception as err:  # other inputs or classes, an engine that fails to load or run, or hangs
                raise self._refuse(name, target, model.manifest.created_at, err) from None
            if self._stopping:  # stop() began during the build: the batcher is drained or draining
                await self._close(served)
                raise ReloadRefused(503, "shutting_down", "the service is shutting down")
            previous = await self._install(served)
            self._refused.forget(served.version)
            self.reloads.labels("ok").inc()
            logger.info("now serving %s/%s", served.name, served.version)
            return {"model": {"name": served.name, "version": served.version},
                    "previous": {"name": previous.name, "version": previous.version} if previous else None}

    def _unavailable(self, err: Exception) -> ReloadRefused:
        """The repository cannot be read now: the volume is at fault, not the version (which is not refused)."""
        self.reloads.labels("unavailable").inc()
        return ReloadRefused(503, "repository_unavailable", f"cannot read the model repository ({err}); still serving "
                             f"{self.serving.name}/{self.serving.version}, retry later")

    def _refuse(self, name: str, target: int, attempted: datetime | None, err: Exception) -> ReloadRefused:
        """The version is refused (the watcher tries it again only once it is exported anew)."""
        self._refused.add(target, attempted)
        self.reloads.labels("refused").inc()
        message = err.message if isinstance(err, ReloadRefused) else f"{type(err).__name__}: {err}"
        logger.warning("refused to serve %s/%s: %s", name, target, message)
        return ReloadRefused(422, "version_refused", f"{name}/{target} was refused, still serving "
                             f"{name}/{self.serving.version}: {message}")

    def _check_compatible(self, model: ModelVersion) -> None:
        """Queued images were preprocessed for the served version, and a request's images may span the swap (one
        answer, one set of classes): a new version must take the same input and give the same classes."""
        served, new = self.serving.model, model.manifest
        if served is None:
            return
        old = served.manifest
        if (old.input, old.preprocess) != (new.input, new.preprocess):
            raise ReloadRefused(422, "version_refused", f"its input or preprocessing differs from the served "
                                f"version's ({new.input} {new.preprocess}); restart the service to change them")
        if old.labels != new.labels:
            raise ReloadRefused(422, "version_refused", f"its classes differ from the served version's "
                                f"({new.num_classes} vs {old.num_classes} classes, or other labels); restart the "
                                "service to change them")

    async def _build(self, model: ModelVersion,
                     check: Callable[[ModelVersion], None] | None = None) -> ServedModel:
        """An engine for `model` (_build_engine), built again from the version as the repository now has it when that
        was exported anew meanwhile (`export --overwrite`; adding an engine keeps created_at): the engine opens its
        files by path after they were verified, so its weights may be either export's. `check` vets each version
        it builds (a reload's or a rebuild's compatibility check), the first included; past BUILD_ATTEMPTS builds, each
        overtaken, RuntimeError. The caller's one bound (bounded_build) covers every build: an overtaken TensorRT
        build leaves the next one less."""
        name, number = model.manifest.name, model.manifest.version
        for attempt in range(BUILD_ATTEMPTS):
            if attempt:
                logger.warning("%s/%s was exported anew while its engine was built; building it again from that "
                               "export", name, number)
                model = await self.reader.read(load_to_serve, self.repository, name, number,
                                               timeout_s=self.build_limit_s)
            if check is not None:
                check(model)
            served = await self._build_engine(model)
            if served.model is not None and served.model.manifest.created_at == model.manifest.created_at:
                return served
            await self._close(served)
        raise RuntimeError(f"{name}/{number} was exported anew during each of {BUILD_ATTEMPTS} engine builds in a row "
                           "(export --overwrite); no engine is served whose weights may not be its manifest's: retry "
                           "once the exports are done")

    async def _build_engine(self, model: ModelVersion) -> ServedModel:
        """Build, load, warm up and smoke-run an engine on a new thread of its own, off the event loop.

        The ServedModel holds the version as the repository has it after the build: building may add an artifact
        (a TensorRT engine built on first start), which the next rebuild must find instead of building it again.
        """
        manifest = model.manifest
        thread = EngineThread(f"engine-{manifest.name}-{manifest.version}")
        prepared = thread.submit(prepared_engine, model, self.settings, self.engine_factory)
        try:
            engine = await asyncio.wrap_future(prepared)
            thread.add_workers(engine.max_concurrent_batches - 1)  # one thread per batch it runs at once
            built = await self.reader.read(self.repository.load, manifest.name, manifest.version, False)
        except BaseException:
            # Failed or cancelled (a rebuild past its bound): the engine is closed once its preparation returns, if it
            # made one, and the thread then ends; nothing waits for that (a wedged device's load may never return).
            thread.submit_last(close_prepared, prepared, f"{manifest.name}/{manifest.version}")
            raise
        return ServedModel(engine, manifest.name, manifest.version, thread, built)

    async def _install(self, served: ServedModel) -> ServedModel | None:
        previous_current, previously_served = self.current, self.running_batcher.served
        try:
            previous = await self.running_batcher.swap(served)  # returns once the previous engine's last batch is done
        except asyncio.CancelledError:
            # Cancelled while the previous engine's last batches finish (a reload the shutdown stopped): the batcher
            # serves `served` from swap's first step on, so it is current now (stop() closes it) and the previous
            # engine closes behind its batches (a detached one, None here, has been closing since it broke).
            self.current = served
            if previously_served is not None:
                self._close_in_background(previously_served)
            raise
        self.current = served
        self._broken_reason = None
        self._show(served)
        if previous is not None:
            await self._close(previous)
        return previous_current

    async def _close(self, served: ServedModel) -> None:
        """Close an engine after the batches already handed to it (one running several at once may still be in one).
        One with a hung batch is not waited for (that would hold a reload's lock, or the shutdown): it closes if and
        when that call returns. Nor is a slow one for long: after engine_timeout_ms for a batch that hangs only now and
        as much for the close, the close is left queued (not cancelled), to run once the calls before it are done."""
        if self.batcher is not None and self.batcher.abandoned(served):
            self._close_later(served)
            logger.warning("the engine of %s/%s is abandoned: a batch on it hung; it is closed if that call returns",
                           served.name, served.version)
            return
        closing = asyncio.wrap_future(served.thread.submit_last(close_engine, served.engine,
                                                                f"{served.name}/{served.version}"))
        done, _ = await asyncio.wait({closing}, timeout=2 * self.settings.engine_timeout_ms / 1000)
        if not done:
            logger.warning("closing the engine of %s/%s did not finish within 2 x engine_timeout_ms (a batch still "
                           "running on it?); not waiting for it, it closes once that batch returns", served.name,
                           served.version)
        elif closing.exception() is not None:  # its thread was stopped already: the engine is not in use
            logger.warning("the engine of %s/%s was not closed: %s", served.name, served.version, closing.exception())

    def _close_in_background(self, served: ServedModel) -> None:
        task = asyncio.get_running_loop().create_task(self._close(served))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    def _close_later(served: ServedModel) -> None:  # behind every call on it, a hung one included; waits for none
        served.thread.submit_last(close_engine, served.engine, f"{served.name}/{served.version}")

    def _show(self, served: ServedModel) -> None:
        """convnext_model_info names exactly the served model (the labels set last are removed: the previous engine
        may be closed by now, and is not asked again)."""
        if self._info_labels is not None:
            self.metrics.model_info.remove(*self._info_labels)
            self._info_labels = None
        try:
            spec = served.engine.describe()
        except Exception as err:  # the metric only informs: the model serves without it
            logger.warning("convnext_model_info is not set: the engine of %s/%s cannot describe itself (%s: %s)",
                           served.name, served.version, type(err).__name__, err)
            return
        self._info_labels = (served.name, str(served.version), spec.name, spec.precision)
        self.metrics.model_info.labels(*self._info_labels).set(1)

    def _on_broken(self, served: ServedModel, reason: str, detail: str) -> None:
        """Called by the batcher when it stops using an engine; rebuild one from the same version (not once stop()
        has begun: a batch of the drain that breaks it gets no rebuild outliving the shutdown)."""
        self.restarts.labels(reason).inc()
        logger.error("engine of %s/%s is broken (%s); %s", served.name, served.version, detail,
                     "shutting down, not rebuilding it" if self._stopping else "rebuilding it")
        if reason == "engine_timeout":
            self._close_later(served)  # abandoned: the hung call may still be using the engine
        else:
            self._close_in_background(served)  # stop() awaits it
        if self._stopping:
            return
        self._broken_reason = f"{reason}: {detail}"
        if self._recovery is None or self._recovery.done():
            # served.model is set: _build made every ServedModel this manager serves.
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(served.model), name="engine-recovery")  # type: ignore[arg-type]

    async def _recover(self, model: ModelVersion) -> None:
        name, version = model.manifest.name, model.manifest.version
        async with self._lock:
            self._failed_rebuilds = 0
            while self.running_batcher.served is None:
                try:
                    served = await self._rebuild(name, version)
                except Exception as err:  # keep trying: the service is useless without an engine
                    delay = RECOVERY_BACKOFF_S[min(self._failed_rebuilds, len(RECOVERY_BACKOFF_S) - 1)]
                    self._failed_rebuilds += 1
                    incident = secrets.token_hex(4)  # the error's own words go to the log only, not to /readyz
                    logger.error("rebuilding the engine of %s/%s failed, incident %s: %s: %s", name, version, incident,
                                 type(err).__name__, err)
                    self._last_rebuild_error = str(err) if isinstance(err, BuildTimeoutError) else \
                        f"{type(err).__name__} (incident {incident})"
                    self._broken_reason = (f"rebuilding the engine failed ({self._last_rebuild_error}); "
                                           f"retrying in {delay:.0f} s")
                    logger.error(self._broken_reason)
                    if self.not_live_reason is not None:
                        logger.critical(self.not_live_reason)
                    await asyncio.sleep(delay)
                    continue
                self._failed_rebuilds = 0
                await self._install(served)
                logger.info("engine of %s/%s rebuilt; serving again", served.name, served.version)

    async def _rebuild(self, name: str, version: int) -> ServedModel:
        """One rebuild attempt, bounded: past build_limit_s it counts as a failed attempt."""
        async def rebuilt() -> ServedModel:
            # Re-read: a previous build may have added an artifact (a TensorRT engine) to the version; an export over
            # it meanwhile must keep the served input and classes, as a reload's (the queue holds images for them).
            model = await self.reader.read(load_to_serve, self.repository, name, version,
                                           timeout_s=self.build_limit_s)
            return await self._build(model, self._check_compatible)

        return await bounded_build(rebuilt(), self.build_limit_s, "the rebuild")

    async def _watch_repository(self) -> None:
        """Poll the repository for a newer version of the served model (unless `version` pins one), or the served
        version exported again (`export --overwrite`), and reload it like /admin/reload. A poll that fails (a transient
        repository error, say) is logged and the next one tries again: the watcher ends with the service only (/readyz
        says if not)."""
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            try:
                target = await self._watch_reader.read(changed_version, self.repository, self.serving,
                                                       self.settings.version is not None, self._refused)
                if target is not None and not self._lock.locked():
                    await self.reload(target)
            except ReloadRefused as err:
                logger.warning("not serving the new version: %s", err.message)
            except (RepositoryError, OSError) as err:
                logger.warning("cannot read the model repository: %s", err)
            except Exception as err:
                logger.error("the repository watcher's poll failed (%s: %s); it polls again in %g s",
                             type(err).__name__, err, self.settings.watch_interval_s)
