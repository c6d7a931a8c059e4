"""What the repository watcher (watch_interval_s) reloads: a newer version of the served model, unless a version is
pinned, or the served version exported again over itself (`export --overwrite`: its manifest's created_at changed);
never a manifest a reload has refused already, until it is exported anew."""
from __future__ import annotations

from datetime import datetime

from runtime.repository import ModelRepository, RepositoryError
from service.batcher import ServedModel

NOT_REFUSED = object()  # a version no reload has refused


class RefusedManifests:
    """version -> created_at of the manifest a reload refused (None: it could not be read)."""

    def __init__(self):
        self._refused: dict[int, datetime | None] = {}

    def add(self, version: int, created_at: datetime | None) -> None:
        self._refused[version] = created_at

    def forget(self, version: int) -> None:
        self._refused.pop(version, None)

    @property
    def versions(self) -> set[int]:
        return set(self._refused)

    def has(self, version: int, created_at: datetime | None) -> bool:
        """Whether a reload refused this version's manifest of this created_at."""
        return self._refused.get(version, NOT_REFUSED) == created_at


def changed_version(repository: ModelRepository, served: ServedModel, pinned: bool,
                    refused: RefusedManifests) -> int | None:
    """The version to load, or None: neither newer nor exported anew (or being replaced right now: the next poll sees
    the new manifest), or refused already. Runs in a thread: the refusals are only read, one dict lookup each."""
    if not pinned:
        latest = repository.latest_version(served.name)
        if latest > served.version and not refused.has(latest, created_at(repository, served.name, latest)):
            return latest
    current = created_at(repository, served.name, served.version)
    if current is None or served.model is None or current == served.model.manifest.created_at:
        return None
    return None if refused.has(served.version, current) else served.version


def created_at(repository: ModelRepository, name: str, version: int) -> datetime | None:
    try:
        return repository.load(name, version, verify_files=False).manifest.created_at
    except (RepositoryError, OSError):
        return None
