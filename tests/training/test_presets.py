"""The presets carry the paper's (Tables 5/6) and the official TRAINING.md values."""
from pathlib import Path

import pytest
import torch

from model import create_model, get_config
from training.config import MODEL_ROWS, resolve
from training.data import data_config_for
from training.run import model_kwargs_for


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


README = Path(__file__).resolve().parents[2] / "README.md"
OFFICIAL_PROCESSES = 8  # TRAINING.md's single-machine commands: --nproc_per_node=8


def _readme_model_rows() -> list[list[str]]:
    lines = README.read_text().splitlines()
    start = lines.index("| preset | model | drop path | layer scale | warmup | EMA | 8 GPUs |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_readme_lists_every_official_command_row():
    listed = {(row[0], row[1].split()[0]) for row in _readme_model_rows()}
    assert {(preset, model) for preset, rows in MODEL_ROWS.items() for model in rows} <= listed
    assert {("in1k", f"convnext_isotropic_{size}") for size in ("small", "base", "large")} <= listed


@pytest.mark.parametrize("row", _readme_model_rows(), ids=lambda row: f"{row[0]}-{row[1]}")
def test_readme_preset_table_agrees_with_the_resolved_config(row):
    preset, model_cell, drop_path, layer_scale, warmup, ema, batch = row
    model, *flags = model_cell.replace("(", "").replace(")", "").split()  # "convnext_tiny (--layer-decay 1.0)"
    overrides = {flag[2:].replace("-", "_"): float(value) for flag, value in zip(flags[::2], flags[1::2], strict=True)}
    config = resolve(preset, {"model": model, **overrides})
    assert config.drop_path == pytest.approx(float(drop_path))
    kwargs = model_kwargs_for(config, 10)
    assert kwargs.get("layer_scale_init", "-") == ("-" if layer_scale == "-" else pytest.approx(float(layer_scale)))
    assert config.warmup_epochs == pytest.approx(float(warmup))
    assert config.ema_decay == (0.0 if ema == "off" else pytest.approx(float(ema)))
    per_process, accum = (int(n) for n in batch.split(" x "))
    assert per_process * accum * OFFICIAL_PROCESSES == config.lr_ref_batch  # the recipe's total batch


@pytest.mark.parametrize("size, drop_path, layer_scale", [("small", 0.1, 0.0), ("base", 0.2, 0.0),
                                                           ("large", 0.5, 1e-6)])
def test_isotropic_in1k_follows_the_official_commands(size, drop_path, layer_scale):
    """TRAINING.md: warmup 50; drop path 0.1/0.2/0.5; --layer_scale_init_value 0 for S/B, the 1e-6 default for L."""
    config = resolve("in1k", {"model": f"convnext_isotropic_{size}"})
    assert (config.drop_path, config.warmup_epochs, config.layer_scale_init) == (drop_path, 50.0, None)
    kwargs = model_kwargs_for(config, 10)
    assert kwargs["layer_scale_init"] == layer_scale
    with torch.device("meta"):  # shapes only: the large model has 306M parameters
        model = create_model(config.model, **kwargs)
    assert all((block.gamma is None) == (layer_scale == 0) for block in model.blocks)


def test_an_explicit_layer_scale_overrides_the_models_own():
    config = resolve("in1k", {"model": "convnext_isotropic_small", "layer_scale_init": 1e-6})
    assert model_kwargs_for(config, 10)["layer_scale_init"] == 1e-6
    assert model_kwargs_for(resolve("in1k", {"model": "convnext_tiny"}), 10)["layer_scale_init"] == 1e-6


@pytest.mark.parametrize("preset", ["finetune", "finetune_384"])
def test_xlarge_fine_tuning_uses_ema_like_the_official_commands(preset):
    assert resolve(preset, {"model": "convnext_xlarge"}).ema_decay == 0.9999
    assert resolve(preset, {"model": "convnext_base"}).ema_decay == 0.0


@pytest.mark.parametrize("preset, crop_mode", [("in1k", "center"), ("finetune", "center"),
                                               ("finetune_384", "squash"), ("finetune_1k_384", "squash")])
def test_evaluation_at_384_squashes_like_the_official_code(preset, crop_mode):
    config = resolve(preset, {"model": "convnext_base"})
    data = data_config_for(config, get_config(config.model).data)
    assert (data.crop_mode, data.input_size == 384, data.crop_pct) == (crop_mode, preset.endswith("384"),
                                                                       1.0 if crop_mode == "squash" else 0.875)


def test_finetune_1k_384_refuses_models_without_an_official_drop_path():
    with pytest.raises(ValueError, match="pass --drop-path for convnext_small"):
        resolve("finetune_1k_384", {"model": "convnext_small"})
    assert resolve("finetune_1k_384", {"model": "convnext_small", "drop_path": 0.6}).drop_path == 0.6


def test_in22k_runs_without_evaluation_like_the_official_commands():
    assert resolve("in22k", {"model": "convnext_base"}).disable_eval is True
    assert resolve("in1k", {"model": "convnext_base"}).disable_eval is False


@pytest.mark.parametrize("field, value", [
    ("crop_mode", "border"), ("model_key", "state_dict"), ("layer_decay", 1.5), ("drop_path", 1.0), ("batch_size", 63),
    ("crop_pct", 0.0), ("crop_pct", 1.2), ("interpolation", "bilinearx"), ("label_smoothing", 1.0),
    ("ema_decay", 1.5), ("ema_decay", -0.5), ("epochs", 0), ("warmup_epochs", -1.0), ("lr_ref_batch", 0),
    ("max_steps_per_epoch", -1), ("input_size", 16),
    ("layer_scale_init", -1e-6), ("layer_scale_init", float("nan")), ("layer_scale_init", float("inf")),
    ("head_init_scale", 0.0), ("head_init_scale", -1.0), ("head_init_scale", float("nan"))])
def test_values_the_recipe_cannot_run_are_refused(field, value):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        resolve("in1k", {field: value})


def test_a_warmup_longer_than_the_run_is_refused_and_one_as_long_accepted():
    """in1k's 20 warmup epochs in a 10-epoch run: the lr would climb all run to half its peak, never decaying."""
    with pytest.raises(ValueError, match="--warmup-epochs 20 is longer than the run's --epochs 10 .*in1k"):
        resolve("in1k", {"epochs": 10})
    assert resolve("in1k", {"epochs": 20}).warmup_epochs == 20


def test_an_input_size_under_the_models_stride_is_refused_before_any_work():
    """Training's first forward pass would fail after the datasets load (minutes on ImageNet)."""
    with pytest.raises(ValueError, match="--input-size 16 is too small for convnext_atto, .* 32x"):
        resolve("demo", {"input_size": 16})
    with pytest.raises(ValueError, match="--input-size 8 is too small for convnext_isotropic_small, .* 16x"):
        resolve("in1k", {"model": "convnext_isotropic_small", "input_size": 8})
    assert resolve("in1k", {"model": "convnext_isotropic_small", "input_size": 16}).input_size == 16


@pytest.mark.parametrize("spec, why", [("bogus", "Unknown AA policy"), ("rand-mX", "section 'mX' has no value"),
                                       ("rand-m9-zz1", "Unknown RandAugment"), ("rand-m9x", "'9x'"),
                                       ("augmix-m5-q", "section 'q'"), ("v0-zz1", "Unknown AutoAugment"),
                                       ("rand-m9-tbogus", "transform set"), ("rand-m9-tweight", "transform set"),
                                       ("rand-t", "transform set"), ("rand-t3a-tweights", "transform set")])
def test_an_auto_augment_spec_timm_would_not_read_whole_is_refused_before_any_work(spec, why):
    with pytest.raises(ValueError, match=f"--auto-augment '{spec}': .*{why}"):
        resolve("in1k", {"auto_augment": spec})


@pytest.mark.parametrize("spec", ["", "rand-m9-mstd0.5-inc1", "rand-m7-n3-tweights", "rand-t3aw", "augmix-m5-w3", "v0",
                                  "original-mstd0.5"])
def test_auto_augment_specs_timm_reads_are_accepted(spec):
    assert resolve("in1k", {"auto_augment": spec}).auto_augment == spec


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "v0", "original", "augmix-m5-w3"])
def test_every_posterize_of_the_training_transform_keeps_zero_bits_as_the_official_runs_pillow(spec):
    """timm asks for posterize(img, 0) at an increasing posterize's top magnitude (the paper's spec, ~1 image in 600)
    or a plain one's bottom; Pillow 13 refuses it, and a run ended mid-epoch. Each such op makes the black image
    Pillow < 13 made; any other bit count is Pillow's posterize."""
    from PIL import Image, ImageOps

    from training.data import train_transform
    from training.transforms import augment_ops

    config = resolve("in1k", {"model": "convnext_atto", "input_size": 32, "auto_augment": spec})
    transform = train_transform(config, data_config_for(config, get_config("convnext_atto").data))
    posterizes = [op for op in augment_ops(transform) if op.name.startswith("Posterize")]
    assert posterizes
    image = Image.new("RGB", (32, 32), (200, 100, 55))
    for op in posterizes:
        op.prob, op.magnitude_std = 1.0, 0.0
        for magnitude in (0.0, 5.0, 10.0):
            op.magnitude = magnitude
            bits = op.level_fn(magnitude, op.hparams)[0]
            expected = image if bits >= 8 else Image.new("RGB", (32, 32)) if bits == 0 else \
                ImageOps.posterize(image, bits)
            assert op(image).tobytes() == expected.tobytes(), (op.name, magnitude, bits)


def test_the_papers_training_transform_runs_on_every_draw(real_photos):
    """3000 draws of the paper's training transform (RandAugment rand-m9-mstd0.5-inc1, Random Erasing) on a photo:
    ~5 of them asked Pillow 13 for a 0-bit posterize and raised."""
    import random

    from PIL import Image

    from training.data import train_transform

    config = resolve("in1k", {"model": "convnext_atto", "input_size": 32})
    transform = train_transform(config, data_config_for(config, get_config("convnext_atto").data))
    photo = Image.open(real_photos[0]).convert("RGB").resize((48, 48))
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(3000):
        assert transform(photo).shape == (3, 32, 32)


def test_activation_is_a_training_flag_recorded_in_the_model_kwargs():
    """README: retraining with ReLU is `--activation relu`; the checkpoint records it, so the export builds the
    model it was trained as."""
    relu = resolve("demo", {"model": "convnext_atto", "activation": "relu"})
    kwargs = model_kwargs_for(relu, 10)
    assert kwargs["activation"] == "relu"
    model = create_model(relu.model, **kwargs)
    assert any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.GELU) for m in model.modules())
    assert model_kwargs_for(resolve("demo", {"model": "convnext_atto"}), 10)["activation"] == "gelu"
    assert model_kwargs_for(resolve("in1k", {"model": "resnet50"}), 10)["activation"] == "relu"
    with pytest.raises(ValueError, match="--activation must be one of gelu, relu"):
        resolve("demo", {"activation": "swish"})
