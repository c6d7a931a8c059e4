"""Fixtures shared by every test package: real photographs shipped by scikit-learn and scikit-image."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def pytest_configure(config):
    """Test servers start many at a time (and other checkouts' beside them): none takes the fixed gRPC port 8001.

    Through the environment, so `python -m service` subprocesses inherit it; tests/service/test_grpc.py gives its
    servers a free port.
    """
    os.environ.setdefault("CONVNEXT_GRPC_PORT", "0")
    # pytest-xdist workers share the cores: torch's OpenMP threads in each (and in the processes they start) take
    # their share. With each worker's torch on every core, a training test of 4 s alone took 74 s beside another
    # worker (7 s on its share).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


# The longest files (serial seconds on CI's 2-core machine, session 20) run first: pytest-xdist (`make test` runs a
# worker per core) hands files out in collection order, and one of these begun last kept a worker busy for a minute or
# two after the other had run out of files.
LONG_FILES = (
    "tests/test_main_job.py",  # 44 s, one test
    "tests/training/test_resume_ddp.py",  # 61 s
    "tests/deploy/test_deploy_entrypoint.py",  # 62 s
    "tests/cli/test_cli_errors.py",  # 52 s, most of it one module fixture
    "tests/service/test_lingering_close.py",  # 43 s
    "tests/bench/test_cpu_benches.py",  # 37 s
    "tests/export/test_roadmap_export.py",  # 34 s
    "tests/bench/test_bench_smoke.py",  # 30 s
    "tests/training/test_crash_resume.py",  # 28 s, one test
    "tests/deploy/test_deploy_writable_paths.py",  # 27 s
    "tests/export/test_repository_writes.py",  # 27 s
    "tests/cli/test_serve_pretrained.py",  # 21 s, one test
    "tests/reliability/test_overload.py",  # 16 s, one test
)


def pytest_collection_modifyitems(session, config, items):
    """LONG_FILES' tests first, in that order, then the rest as collected (a stable sort: files stay whole)."""
    rank = {name: place for place, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONG_FILES)))  # the file, from rootdir


def _real_photo_sources() -> list[Path]:
    try:
        import skimage
        import sklearn.datasets
    except ImportError as error:
        # Only GPU-only tests may skip: a missing dev extra (a GPU host may install only the gpu extra) fails every
        # test that needs the photos, with how to install it, rather than skipping them out of sight.
        pytest.fail(f"real photos need scikit-learn and scikit-image ({error}): a GPU host (gpu host without the "
                    "dev extra) lacks them; install the dev extra there (pip install -e '.[dev]')", pytrace=False)

    sklearn_images = Path(sklearn.datasets.__file__).parent / "images"
    skimage_data = Path(skimage.__file__).parent / "data"
    return [
        sklearn_images / "china.jpg",  # a temple, JPEG
        sklearn_images / "flower.jpg",  # a flower, JPEG
        skimage_data / "chelsea.png",  # a cat, PNG
        skimage_data / "coffee.png",  # a cup of coffee, PNG
        skimage_data / "astronaut.png",  # a person, PNG
        skimage_data / "rocket.jpg",  # a rocket on its pad, JPEG
    ]


@pytest.fixture(scope="session")
def real_photos(tmp_path_factory) -> list[Path]:
    """Real photographs (JPEG and PNG files, 300..640 px) copied into a temporary folder."""
    folder = tmp_path_factory.mktemp("photos")
    photos = []
    for source in _real_photo_sources():
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: install the dev extra (scikit-learn, scikit-image)")
        photos.append(Path(shutil.copy(source, folder / source.name)))
    return photos
