"""timm's pretrained tags of the ConvNeXts built here, with the evaluation transform each was measured with (timm
1.0.31's pretrained_cfg), and the tag a checkpoint's path names."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .registry import IMAGENET_MEAN, IMAGENET_STD

# OpenAI CLIP's normalisation, which timm's CLIP ConvNeXt weights keep (timm.data OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IN1K, IN12K, IN22K = "ImageNet-1K", "ImageNet-12K", "ImageNet-22K"  # timm's in12k: 11821 classes of ImageNet-22K
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass(frozen=True)
class TimmPretrained:
    """A timm pretrained tag of a ConvNeXt built here and its pretrained_cfg's evaluation fields (timm 1.0.31
    timm/models/convnext.py default_cfgs; the defaults are its _cfg's: 224 px, crop_pct 0.875, bicubic, center)."""

    name: str  # timm's "<model>.<tag>", e.g. "convnext_tiny.in12k_ft_in1k"; <model> is a list_models() name
    dataset: str  # what the weights were trained on, as the manifest says it
    input_size_px: int = 224
    crop_pct: float = 0.875
    crop_mode: str = "center"
    num_classes: int = 1000
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    test_input_size_px: int | None = None  # timm's test_input_size / test_crop_pct: its best top-1, at a larger size
    test_crop_pct: float | None = None

    @property
    def model_name(self) -> str:
        return self.name.split(".", 1)[0]

    def data_config(self, input_size_px: int | None = None) -> dict:
        """The evaluation transform at `input_size_px` (default: the tag's size); at the tag's test size, its test
        crop (timm's resolve_data_config with use_test_size)."""
        size = input_size_px or self.input_size_px
        at_test_size = size == self.test_input_size_px and self.test_crop_pct is not None
        return {"input_size": size, "crop_pct": self.test_crop_pct if at_test_size else self.crop_pct,
                "crop_mode": self.crop_mode, "interpolation": "bicubic", "mean": self.mean, "std": self.std}


def _timm_table() -> dict[str, TimmPretrained]:
    """Every timm tag of these models that has a classifier head (not the DINOv3 / EUPE feature extractors)."""
    test_288 = {"test_input_size_px": 288, "test_crop_pct": 1.0}
    squash_384 = {"input_size_px": 384, "crop_pct": 1.0, "crop_mode": "squash"}
    ft = f"{IN22K}, fine-tuned on {IN1K}"
    rows = []
    for size in ("tiny", "small", "base", "large", "xlarge"):  # the official weights, as timm names them
        model = f"convnext_{size}"
        rows += [TimmPretrained(f"{model}.fb_in22k_ft_in1k", ft, **test_288),
                 TimmPretrained(f"{model}.fb_in22k_ft_in1k_384", ft, **squash_384),
                 TimmPretrained(f"{model}.fb_in22k", IN22K, num_classes=21841)]
        if size != "xlarge":
            rows.append(TimmPretrained(f"{model}.fb_in1k", IN1K, **test_288))
    for model in ("convnext_tiny", "convnext_small", "convnext_nano"):  # timm's ImageNet-12K runs: crop_pct 0.95
        rows += [TimmPretrained(f"{model}.in12k_ft_in1k", f"{IN12K}, fine-tuned on {IN1K}", crop_pct=0.95, **test_288),
                 TimmPretrained(f"{model}.in12k", IN12K, crop_pct=0.95, num_classes=11821)]
    rows += [TimmPretrained(f"{model}.in12k_ft_in1k_384", f"{IN12K}, fine-tuned on {IN1K}", **squash_384)
             for model in ("convnext_tiny", "convnext_small")]
    rows += [TimmPretrained(name, IN1K, test_input_size_px=288, test_crop_pct=0.95)
             for name in ("convnext_atto.d2_in1k", "convnext_femto.d1_in1k", "convnext_pico.d1_in1k")]
    rows += [TimmPretrained("convnext_nano.d1h_in1k", IN1K, crop_pct=0.95, **test_288),
             TimmPretrained("convnext_nano.r384_in12k_ft_in1k", f"{IN12K}, fine-tuned on {IN1K}", 384, 1.0),
             TimmPretrained("convnext_nano.r384_in12k", IN12K, 384, 1.0, num_classes=11821),
             TimmPretrained("convnext_nano.r384_ad_in12k", IN12K, 384, 1.0, num_classes=11821)]
    clip = {"mean": CLIP_MEAN, "std": CLIP_STD, "crop_pct": 1.0}
    laion, laion_a = "LAION-2B (CLIP)", "LAION-Aesthetics (CLIP)"
    rows += [
        TimmPretrained("convnext_base.clip_laion2b_augreg_ft_in12k_in1k", f"{laion}, fine-tuned on {IN12K} and {IN1K}",
                       256, **clip),
        TimmPretrained("convnext_base.clip_laion2b_augreg_ft_in12k_in1k_384",
                       f"{laion}, fine-tuned on {IN12K} and {IN1K}", 384, crop_mode="squash", **clip),
        TimmPretrained("convnext_base.clip_laion2b_augreg_ft_in1k", f"{laion}, fine-tuned on {IN1K}", 256, **clip),
        TimmPretrained("convnext_base.clip_laiona_augreg_ft_in1k_384", f"{laion_a}, fine-tuned on {IN1K}", 384, **clip),
        TimmPretrained("convnext_base.clip_laion2b_augreg_ft_in12k", f"{laion}, fine-tuned on {IN12K}", 256,
                       num_classes=11821, **clip),
    ]
    embedding = "(CLIP image tower: 640 embedding dimensions, not classes)"  # the head is CLIP's projection
    towers = (("clip_laion2b", "LAION-2B", 256), ("clip_laion2b_augreg", "LAION-2B", 256),
              ("clip_laiona", "LAION-Aesthetics", 256), ("clip_laiona_320", "LAION-Aesthetics", 320),
              ("clip_laiona_augreg_320", "LAION-Aesthetics", 320))
    rows += [TimmPretrained(f"convnext_base.{tag}", f"{data} {embedding}", px, num_classes=640, **clip)
             for tag, data, px in towers]
    return {row.name: row for row in rows}


TIMM_PRETRAINED: dict[str, TimmPretrained] = _timm_table()


def get_timm_pretrained(name: str) -> TimmPretrained:
    try:
        return TIMM_PRETRAINED[name]
    except KeyError:
        model = name.split(".", 1)[0]
        known = sorted(n for n in TIMM_PRETRAINED if n.startswith(model + ".")) or sorted(TIMM_PRETRAINED)
        raise ValueError(f"{name!r} is not a timm ConvNeXt pretrained tag this project knows; choose one of: "
                         f"{', '.join(known)}") from None


def tags_and_crops(model_name: str) -> str:
    """`model_name`'s timm tags and their crop_pct, for a message: "convnext_nano.in12k_ft_in1k 0.95, ..."."""
    return ", ".join(f"{t.name} {t.crop_pct:g}" for t in TIMM_PRETRAINED.values() if t.model_name == model_name)


def find_timm_pretrained(checkpoint: str | Path) -> TimmPretrained | None:
    """The timm tag a checkpoint's path names, nearest the file first: the Hugging Face cache's
    `models--timm--<name>/snapshots/<revision>/pytorch_model.bin`, or a file or folder called `<name>` (.pth, .pt,
    .bin); None when no part of the path is one."""
    for part in reversed(Path(checkpoint).parts):
        name = part.removeprefix("models--timm--")
        for suffix in CHECKPOINT_SUFFIXES:
            name = name.removesuffix(suffix)
        if name in TIMM_PRETRAINED:
            return TIMM_PRETRAINED[name]
    return None
