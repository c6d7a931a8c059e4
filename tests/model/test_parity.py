"""Our ConvNeXt / ResNet-50 load timm's and torchvision's state dicts and compute the same logits (eval mode)."""
from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from model import create_model
from model.checkpoints import load_checkpoint
from tests.model.random_weights import randomise

REFERENCES = {
    "timm convnext_tiny": (lambda: timm.create_model("convnext_tiny", pretrained=False), "convnext_tiny", "timm"),
    "timm convnext_atto (1x1-conv MLP)": (lambda: timm.create_model("convnext_atto", pretrained=False),
                                          "convnext_atto", "timm"),
    "torchvision convnext_tiny": (lambda: torchvision.models.convnext_tiny(weights=None), "convnext_tiny",
                                  "torchvision"),
    "torchvision resnet50": (lambda: torchvision.models.resnet50(weights=None), "resnet50", "torchvision"),
}


@pytest.mark.parametrize("reference_name", REFERENCES)
def test_reference_state_dict_loads_and_logits_match(reference_name):
    build_reference, our_name, expected_format = REFERENCES[reference_name]
    reference = randomise(build_reference())  # layer scale near 1: a mis-mapped block shows
    ours = create_model(our_name).eval()
    result = load_checkpoint(ours, reference.state_dict())
    assert result.source_format == expected_format
    assert not result.head_reinitialised
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(images), ours(images)
    assert expected.abs().mean() > 0.1  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
