"""The presets carry the paper's (Tables 5/6) and the official TRAINING.md values."""
import pytest

from training.config import resolve


@pytest.mark.parametrize(
    "preset, model, expected",
    [
        ("in1k", "convnext_tiny", dict(base_lr=4e-3, lr_ref_batch=4096, weight_decay=0.05, epochs=300,
                                       warmup_epochs=20, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
                                       re_prob=0.25, drop_path=0.1, ema_decay=0.9999)),
        ("in1k", "convnext_small", dict(drop_path=0.4)),
        ("in1k", "convnext_base", dict(drop_path=0.5)),
        ("in1k", "convnext_large", dict(drop_path=0.5)),
        ("in22k", "convnext_base", dict(epochs=90, warmup_epochs=5, ema_decay=0.0, drop_path=0.1)),
        ("finetune", "convnext_base", dict(base_lr=5e-5, weight_decay=1e-8, epochs=30, warmup_epochs=0,
                                           layer_decay=0.8, mixup=0.0, cutmix=0.0, head_init_scale=0.001,
                                           drop_path=0.2)),
        ("finetune", "convnext_large", dict(drop_path=0.3)),
        ("finetune", "convnext_xlarge", dict(drop_path=0.4)),
        ("finetune_384", "convnext_base", dict(input_size=384, crop_pct=1.0, layer_decay=0.8)),
        ("finetune_1k_384", "convnext_base", dict(input_size=384, crop_pct=1.0, layer_decay=0.7, drop_path=0.8)),
        ("finetune_1k_384", "convnext_large", dict(drop_path=0.95)),
    ],
)
def test_preset_values_match_the_paper(preset, model, expected):
    config = resolve(preset, {"model": model})
    for field, value in expected.items():
        assert getattr(config, field) == pytest.approx(value), field
