"""Image build step: fail early and clearly when NVIDIA's package index (TensorRT's libraries) is unreachable.

tensorrt-cu13 and tensorrt-cu13-libs on PyPI are placeholders: pip fetches the real TensorRT libraries from
pypi.nvidia.com at install time. Without this check an offline build dies deep inside pip with a wheel-stub error.

    python deploy/check_nvidia_index.py [--index-url https://pypi.nvidia.com]
"""
from __future__ import annotations

import argparse
import re
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
DEFAULT_INDEX_URL = "https://pypi.nvidia.com"
LIBS_PACKAGE = "tensorrt-cu13-libs"


def pinned_tensorrt_version(pyproject: Path = PYPROJECT) -> str:
    """The tensorrt-cu13 version the gpu extra pins, e.g. '11.4.0.106'."""
    gpu = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["gpu"]
    for requirement in gpu:
        match = re.fullmatch(r"tensorrt-cu13==([\w.]+)", requirement)
        if match:
            return match.group(1)
    raise SystemExit("pyproject.toml's gpu extra pins no tensorrt-cu13==VERSION")


def problem(index_url: str, version: str, timeout_s: float = 20.0) -> str | None:
    """Why `index_url` cannot supply tensorrt-cu13-libs `version` (None when it can)."""
    page = f"{index_url.rstrip('/')}/{LIBS_PACKAGE}/"
    try:
        with urllib.request.urlopen(page, timeout=timeout_s) as response:
            listing = response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return f"{page} is unreachable ({getattr(error, 'reason', error)})"
    wheel = f"{LIBS_PACKAGE.replace('-', '_')}-{version}-"
    if wheel.lower() not in listing.lower():
        return f"{page} answers but lists no {wheel}*.whl"
    return None


def explain(reason: str, index_url: str, version: str) -> str:
    return "\n".join([
        "=" * 100,
        f"Cannot build the GPU image: {reason}.",
        f"tensorrt-cu13=={version} on PyPI does not contain TensorRT: its {LIBS_PACKAGE} downloads the real",
        f"libraries from {index_url} while pip installs it, so the build needs that index.",
        "Fix one of:",
        f"  - let the build reach {index_url} over HTTPS (behind a proxy: docker build --build-arg HTTPS_PROXY=...)",
        "  - mirror it and build with --build-arg NVIDIA_PYPI_URL=https://your-mirror/simple",
        "  - or serve on CPU: docker compose -f docker-compose.yml -f docker-compose.cpu.yml up",
        "=" * 100,
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-url", default=DEFAULT_INDEX_URL)
    args = parser.parse_args(argv)
    version = pinned_tensorrt_version()
    reason = problem(args.index_url, version)
    if reason is not None:
        print(explain(reason, args.index_url, version), file=sys.stderr)
        return 1
    print(f"{args.index_url} has {LIBS_PACKAGE} {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
