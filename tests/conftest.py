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
