"""docs/architecture.md names every module of the layers it lists file by file: runtime/ (engines/ too), service/ and
deploy/ (a module added without a line there leaves readers a map with a hole)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LISTED_FILE_BY_FILE = ("runtime", "runtime/engines", "service", "deploy")


def test_every_module_of_the_layers_listed_file_by_file_is_named():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"(\w+\.py)\b", text))
    modules = [path for folder in LISTED_FILE_BY_FILE for path in sorted((ROOT / folder).glob("*.py"))]
    unnamed = [str(path.relative_to(ROOT)) for path in modules if path.name not in {"__init__.py", *named}]
    assert not unnamed, f"add a line for each to docs/architecture.md: {unnamed}"
