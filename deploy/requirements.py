"""Print pip requirements from pyproject.toml's extras, one a line, so the images install exactly the pinned set.

    python deploy/requirements.py serve gpu      # the GPU image: onnxruntime-gpu[cuda,cudnn], TensorRT, cuda-python
    python deploy/requirements.py serve cpu      # the CPU image: onnxruntime (CPU)
"""
from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# One ONNX Runtime per environment: both packages install the same onnxruntime/ folder.
ONNXRUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu")


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].strip().lower()


def requirements(extras: list[str], without: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The core dependencies plus each extra's, minus the packages named in `without`, de-duplicated in order."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    excluded = {name.lower() for name in without}
    chosen: dict[str, str] = {}
    for requirement in [*project["dependencies"], *(r for extra in extras for r in optional[extra])]:
        name = requirement_name(requirement)
        if name not in excluded:
            chosen.setdefault(name, requirement)
    both = [name for name in ONNXRUNTIME_PACKAGES if name in chosen]
    if len(both) > 1:
        raise SystemExit(f"extras {extras} install both {both[0]} and {both[1]}, which overwrite each other: "
                         "choose the cpu or the gpu extra")
    return list(chosen.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="+")
    parser.add_argument("--without", action="append", default=[], help="a package to leave out (repeatable)")
    args = parser.parse_args(argv)
    print("\n".join(requirements(args.extras, args.without)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
