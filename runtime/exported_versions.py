"""Which version of a model in the repository was exported from a given source (a file, its digest, its weights)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from runtime.repository import Manifest, ModelRepository, RepositoryError

logger = logging.getLogger(__name__)


def find_exported(repository: ModelRepository, name: str, matches: Callable[[Manifest], bool],
                  precisions: Sequence[str] = ()) -> int | None:
    """The newest version of `name` whose manifest source `matches` and that has an ONNX file of each of `precisions`,
    or None (then a new version is exported)."""
    lacking = []
    for version in reversed(repository.versions(name)):
        try:
            manifest = repository.load(name, version, verify_files=False).manifest
        except RepositoryError:
            continue  # a broken version is not reused; the export writes a new one
        if not matches(manifest):
            continue
        missing = [p for p in precisions if manifest.find("onnx", p) is None]
        if not missing:
            return version
        lacking.append(f"{name}/{version} has no {','.join(missing)}")
    if lacking:
        logger.info("exported from this file before, but not in every precision --precisions asks for (%s): "
                    "exporting a new version", "; ".join(lacking))
    return None
