"""ImageFolder data: val/ must hold train/'s class folders, or its labels would be numbered differently."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from model import get_config
from training.config import PRESETS
from training.data import build_datasets, data_config_for


def _image_folder(root, classes_by_split: dict[str, tuple[str, ...]]):
    """One 16 px PNG per class folder of each split: ImageFolder needs a file in every class it lists."""
    rng = np.random.default_rng(0)
    for split, classes in classes_by_split.items():
        for label in classes:
            (root / split / label).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / label / "0.png")
    return root


def _datasets(data_dir):
    config = dataclasses.replace(PRESETS["demo"], data_dir=str(data_dir))
    return build_datasets(config, data_config_for(config, get_config(config.model).data), augment=False)


def test_the_same_class_folders_give_val_the_training_labels(tmp_path):
    datasets = _datasets(_image_folder(tmp_path, {"train": ("ant", "bee", "cat"), "val": ("ant", "bee", "cat")}))
    assert datasets.class_names == ["ant", "bee", "cat"]
    assert [label for _, label in datasets.val.samples] == [0, 1, 2]


@pytest.mark.parametrize(("val_classes", "missing", "extra"), [
    (("ant", "cat"), "bee", "none"),  # cat would be label 1 in val/, 2 in training
    (("ant", "bee", "bug", "cat"), "none", "bug"),  # bug would take cat's label 2
], ids=["a-class-missing-from-val", "a-class-only-in-val"])
def test_a_val_folder_with_other_classes_is_refused_naming_them(tmp_path, val_classes, missing, extra):
    data_dir = _image_folder(tmp_path, {"train": ("ant", "bee", "cat"), "val": val_classes})
    with pytest.raises(ValueError, match="has other class folders than") as error:
        _datasets(data_dir)
    message = str(error.value)
    assert f"missing from val/: {missing};" in message and f"only in val/: {extra})" in message
    assert str(data_dir / "val") in message and "give val/ the same class folders as train/" in message
