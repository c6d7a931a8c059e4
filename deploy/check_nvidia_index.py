"""Image build step: fail early and clearly when NVIDIA's package index (TensorRT's libraries) is unreachable.

tensorrt-cu13 and tensorrt-cu13-libs on PyPI are placeholders: pip fetches the real TensorRT libraries from
pypi.nvidia.com at install time. Without this check an offline build dies deep inside pip with a wheel-stub error.

    python deploy/check_nvidia_index.py [--index-url https://pypi.nvidia.com] [--machine aarch64]

The wheel must be there for this machine's architecture (the image's: x86_64 or aarch64), not just for some.
"""
from __future__ import annotations

import argparse
import platform
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


def problem(index_url: str, version: str, machine: str, timeout_s: float = 20.0) -> str | None:
    """Why `index_url` cannot supply tensorrt-cu13-libs `version` for `machine` (None when it can)."""
    page = f"{index_url.rstrip('/')}/{LIBS_PACKAGE}/"
    try:
        with urllib.request.urlopen(page, timeout=timeout_s) as response:
            listing = response.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as error:
        return f"{page} is unreachable ({getattr(error, 'reason', error)})"
    wheel = f"{LIBS_PACKAGE.replace('-', '_')}-{version}-"
    wheels = set(re.findall(rf"{re.escape(wheel)}[\w.-]*?\.whl", listing, re.IGNORECASE))
    if not wheels:
        return f"{page} answers but lists no {wheel}*.whl"
    # A wheel's platform tag ends its name: ..._x86_64.whl, ..._aarch64.whl
    if not any(name.lower().endswith(f"_{machine.lower()}.whl") for name in wheels):
        return f"{page} lists {wheel}*.whl only for other platforms ({', '.join(sorted(wheels))}), none for {machine}"
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
    parser.add_argument("--machine", default=platform.machine(), help="wheel architecture (default: this machine's)")
    args = parser.parse_args(argv)
    version = pinned_tensorrt_version()
    reason = problem(args.index_url, version, args.machine)
    if reason is not None:
        print(explain(reason, args.index_url, version), file=sys.stderr)
        return 1
    print(f"{args.index_url} has {LIBS_PACKAGE} {version} for {args.machine}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
