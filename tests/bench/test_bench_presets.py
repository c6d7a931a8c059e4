"""`python -m bench all` presets: typed, valid, and runnable on the models the registry knows."""
from __future__ import annotations

import dataclasses

import pytest

from bench.presets import GPU_SERVICE, PRESETS
from model.registry import ACTIVATIONS, MODEL_CONFIGS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_names_known_models_and_sane_loads(name):
    preset = PRESETS[name]
    assert preset.name == name
    for model, activation in preset.variants:
        assert model in MODEL_CONFIGS and activation in ACTIVATIONS
    assert list(preset.batch_sizes) == sorted(preset.batch_sizes)
    assert list(preset.concurrency) == sorted(preset.concurrency)
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.rate = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_on_a_gpu_serves_tensorrt_and_keeps_its_models(name):
    gpu = PRESETS[name].on_gpu()
    assert gpu.name == f"{name}-gpu" and gpu.variants == PRESETS[name].variants
    assert gpu.service == GPU_SERVICE and "fp16" in gpu.precisions and gpu.tensorrt_precisions
    assert gpu.max_batch_size in gpu.batch_sizes  # the service efficiency's denominator is timed


@pytest.mark.parametrize("change", [{"batch_sizes": ()}, {"concurrency": (0, 4)}, {"rate": 0.0}, {"requests": 0},
                                    {"batch_sizes": (1, 2)}, {"max_batch_size": 4}])
def test_an_invalid_preset_is_refused_with_what_is_wrong(change):
    with pytest.raises(ValueError, match="preset 'smoke'"):
        dataclasses.replace(PRESETS["smoke"], **change)
