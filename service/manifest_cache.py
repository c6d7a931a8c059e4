"""/models' manifests, each parsed once while its file is unchanged.

/models is open (no key, for dashboards and the web page) and lists every version of every model from its manifest.
Six 21,841-class manifests took 12.3 ms of CPU (and of the GIL) a call to parse and validate on a Zen 4 EPYC core (a
loaded machine measured ~107 ms), 0.3 ms kept: a flood of calls held every other request up. A manifest is kept by
its file's identity (inode, mtime in ns, size): an export, a re-export or an edit writes another file or changes its
time, and it is read anew.
"""
from __future__ import annotations

import threading

from runtime.repository import MANIFEST_FILE, Manifest, ModelRepository

FileIdentity = tuple[int, int, int]


class ManifestCache:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, int], tuple[FileIdentity, Manifest]] = {}
        self._lock = threading.Lock()  # listings run on threads of their own (service/repository_reader.py)

    def manifest(self, repository: ModelRepository, name: str, version: int) -> Manifest:
        """The version's manifest as repository.load reads it (RepositoryError, OSError as it raises them)."""
        key = (str(repository.root), name, version)
        stat = (repository.root / name / str(version) / MANIFEST_FILE).stat()
        identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._entries.get(key)
        if cached is not None and cached[0] == identity:
            return cached[1]
        # A file replaced between the stat and the read is kept under the old identity: the next call reads it again.
        manifest = repository.load(name, version, verify_files=False).manifest
        with self._lock:
            self._entries[key] = (identity, manifest)
        return manifest

    def keep_only(self, repository: ModelRepository, versions: set[tuple[str, int]]) -> None:
        """Forget the manifests of versions no longer listed (removed from the repository, or another repository's)."""
        root = str(repository.root)
        with self._lock:
            self._entries = {key: entry for key, entry in self._entries.items()
                             if key[0] == root and (key[1], key[2]) in versions}
