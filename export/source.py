"""What an export exports: the eval-mode model, from random init or a checkpoint (project, official, timm or
torchvision), and what the manifest records of it: classes, labels, evaluation transform, source and dataset."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from convnext_files import sha256_file
from runtime.repository import DIGITS_DATASET, Preprocess, Source

from .labels import default_labels

if TYPE_CHECKING:  # model/ imports torch; `python -m export tensorrt|list` run without it
    from model.pretrained import PretrainedCheckpoint
    from model.timm_pretrained import TimmPretrained

logger = logging.getLogger(__name__)

# Random init is seeded: the same export twice holds the same weights, so its parity figures (and a failure) repeat.
RANDOM_INIT_SEED = 0
OFFICIAL_DATASETS = {  # model.pretrained's dataset codes, as the manifest (and the web page) says them
    "in1k": "ImageNet-1K", "in22k": "ImageNet-22K", "in22k->in1k": "ImageNet-22K, fine-tuned on ImageNet-1K",
}


class ExportError(ValueError):
    """The export request is inconsistent (unknown model, bad precision, missing metadata...)."""


@dataclass(frozen=True)
class ExportSource:
    """What to export: the built eval-mode module plus the metadata that goes into the manifest."""

    module: object  # torch.nn.Module
    model_name: str
    activation: str
    num_classes: int
    in_chans: int
    preprocess: Preprocess
    labels: tuple[str, ...]
    source: Source


# torchvision's ConvNeXt weights evaluate with their own transform (weights.transforms(): resize 230-236, bilinear).
TORCHVISION_WEIGHTS = {"convnext_tiny": "ConvNeXt_Tiny_Weights", "convnext_small": "ConvNeXt_Small_Weights",
                       "convnext_base": "ConvNeXt_Base_Weights", "convnext_large": "ConvNeXt_Large_Weights"}
# The weights enums whose files (torch hub keeps a download's URL name: convnext_tiny-983f1562.pth) the export knows.
TORCHVISION_WEIGHT_ENUMS = TORCHVISION_WEIGHTS | {"resnet50": "ResNet50_Weights"}
OFFICIAL_SQUASH_FROM_PX = 384  # official datasets.py: at >= 384 px, warp to size x size (no crop) for evaluation


def checkpoint_preprocess(data_config: dict, input_size: int | None, from_checkpoint: bool, source_format: str,
                          model_name: str) -> Preprocess:
    """The evaluation transform the weights were evaluated with: the weights' own when `from_checkpoint` (a project
    run's data_config, a timm tag's pretrained_cfg); for torchvision's ConvNeXt weights, torchvision's; otherwise
    the registry's, warped without a crop at 384 px and above as the official evaluation does."""
    size = int(input_size or data_config["input_size"])
    if not from_checkpoint and source_format == "torchvision" and model_name in TORCHVISION_WEIGHTS and size == 224:
        import torchvision.models

        transform = getattr(torchvision.models, TORCHVISION_WEIGHTS[model_name]).IMAGENET1K_V1.transforms()
        resize_px, crop_px = transform.resize_size[0], transform.crop_size[0]
        return Preprocess(resize_px=resize_px, crop_px=crop_px, crop_pct=crop_px / resize_px,
                          interpolation=transform.interpolation.value, mean=tuple(transform.mean),
                          std=tuple(transform.std))
    if not from_checkpoint and size >= OFFICIAL_SQUASH_FROM_PX:
        data_config = {**data_config, "crop_pct": 1.0, "crop_mode": "squash"}
    return _preprocess_from(data_config, size)


def _preprocess_from(data_config: dict, input_size: int | None) -> Preprocess:
    size = int(input_size or data_config["input_size"])
    crop_pct = float(data_config.get("crop_pct", 0.875))
    return Preprocess(
        resize_px=int(size / crop_pct),
        crop_px=size,
        crop_pct=crop_pct,
        interpolation=data_config.get("interpolation", "bicubic"),
        mean=tuple(float(m) for m in data_config["mean"]),
        std=tuple(float(s) for s in data_config["std"]),
        crop_mode=data_config.get("crop_mode", "center"),
    )


def timm_pretrained_of(checkpoint: str | Path | None, timm_name: str | None,
                       is_project: bool) -> TimmPretrained | None:
    """The timm pretrained tag a checkpoint holds: `timm_name` (--timm-name), else the one its path names; None for
    a project checkpoint (it carries its own transform) and for weights of no known tag."""
    from model.timm_pretrained import find_timm_pretrained, get_timm_pretrained

    if timm_name is None:
        return find_timm_pretrained(checkpoint) if checkpoint is not None and not is_project else None
    if checkpoint is None:
        raise ExportError(f"--timm-name {timm_name} says which timm weights a --checkpoint holds: pass the checkpoint")
    if is_project:
        raise ExportError("a project checkpoint carries its own model and evaluation transform; drop --timm-name")
    try:
        return get_timm_pretrained(timm_name)
    except ValueError as error:
        raise ExportError(f"--timm-name: {error}") from None


def official_pretrained_of(checkpoint: str | Path | None, asked_model: str | None) -> PretrainedCheckpoint | None:
    """The official checkpoint a file is by its name (downloads keep the official names: convnext_base_22k_224.pth),
    so its architecture, class count (21841 for the 22K heads) and input size are the export's defaults; None for
    another name, or when --model asks for another architecture (the flags say what the file holds, then)."""
    from model.pretrained import PRETRAINED_CHECKPOINTS

    official = PRETRAINED_CHECKPOINTS.get(Path(checkpoint).stem) if checkpoint is not None else None
    if official is None or (asked_model is not None and asked_model != official.model_name):
        return None
    return official


def check_model_name(model_name: str) -> None:
    """An ExportError naming the models model/ builds when `model_name` is not one of them."""
    import model as models

    if model_name not in models.list_models():
        raise ExportError(f"unknown model {model_name!r}; choose one of: {', '.join(models.list_models())}")


def check_input_size(model_name: str, input_size: int) -> None:
    """An ExportError when `input_size` px is below the model's total stride: its last feature map would be empty."""
    from model.flops import input_size_refusal

    refusal = input_size_refusal(model_name, input_size)
    if refusal is not None:
        raise ExportError(refusal)


@contextmanager
def seeded_torch_rng(seed: int) -> Iterator[None]:
    """torch's CPU generator seeded with `seed` inside the block and put back as it was after it, so the caller's
    random numbers go on as if the block had not run (the CUDA generators are not touched: no CUDA context)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield


def load_source(model_name: str | None, checkpoint: str | Path | None, *, num_classes: int | None = None,
                activation: str | None = None, input_size: int | None = None, labels: Sequence[str] | None = None,
                use_ema: bool = False, dataset: str | None = None, timm_name: str | None = None,
                init_seed: int = RANDOM_INIT_SEED) -> ExportSource:
    """Build the eval-mode model and collect its manifest metadata (checkpoint metadata wins where present).

    `timm_name` ("convnext_tiny.in12k_ft_in1k") says which timm pretrained weights the checkpoint holds, when its
    path does not (see model.timm_pretrained.find_timm_pretrained): their model, class count and evaluation transform.
    Without a checkpoint, the random weights (layer-scale gammas near 1, so that every block shapes the logits) and
    the BatchNorm statistics are drawn from `init_seed`.
    """
    import model as models
    from model.timm_pretrained import tags_and_crops

    if use_ema and checkpoint is None:
        raise ExportError("--ema needs a --checkpoint that holds EMA weights (a run trained with ema_decay > 0)")
    if num_classes is not None and num_classes < 1:
        raise ExportError(f"--num-classes {num_classes}: a classifier needs at least 1 class")
    raw: dict = models.read_checkpoint(checkpoint) if checkpoint is not None else {}
    is_project = "model_name" in raw
    tag = timm_pretrained_of(checkpoint, timm_name, is_project)
    official = official_pretrained_of(checkpoint, model_name) if not is_project and tag is None else None
    held = raw["model_name"] if is_project else (tag.model_name if tag is not None else None)
    model_name = _model_name_of(model_name or (official.model_name if official is not None else None), held)
    known_classes = tag.num_classes if tag is not None else (official.num_classes if official is not None else None)
    kwargs = _model_kwargs(raw, model_name, checkpoint is not None, num_classes, activation, known_classes)
    if input_size is None and official is not None:
        input_size = official.input_size_px  # e.g. 384 for convnext_base_1k_384: the official squash at 384
    if input_size is not None:
        check_input_size(model_name, input_size)
    with seeded_torch_rng(init_seed):
        module = models.create_model(model_name, **kwargs)
        if checkpoint is None:  # at their 1e-6 init the blocks barely touch the logits: parity would not see them
            drawn = models.draw_layer_scales(module)
            if drawn:
                logger.info("random init: %d layer-scale gammas drawn near 1, not 1e-6, so every block shapes the "
                            "logits parity compares", drawn)
    source_format = "random"
    if checkpoint is not None:
        source_format = _load_weights(module, raw, use_ema, model_name, kwargs)
        if not use_ema and Path(checkpoint).stem.endswith("_ema") and isinstance(raw.get("model_ema"), dict):
            logger.warning("%s was kept for its EMA weights (training's checkpoint_best_ema.pth: the best EMA val "
                           "top-1), but without --ema the export takes its trained weights, not the EMA ones; pass "
                           "--ema to export those", checkpoint)
    if source_format == "timm" and tag is None:
        logger.warning("%s holds timm weights, and neither its path nor --timm-name says which: the manifest gets "
                       "%s's registry transform (crop_pct 0.875), not the one timm evaluates them with (%s); pass "
                       "--timm-name with their timm name", checkpoint, model_name, tags_and_crops(model_name))
    module.eval()
    src = _export_source(module, model_name, kwargs, raw, checkpoint, source_format, tag, input_size=input_size,
                         labels=labels, use_ema=use_ema, dataset=dataset)
    if checkpoint is None:  # random init: BatchNorm statistics as training would leave them, so fp16 keeps the logits
        with seeded_torch_rng(init_seed):
            models.calibrate_batch_norms(module, src.preprocess.crop_px, src.in_chans)
    return src


def _model_kwargs(raw: dict, model_name: str, has_checkpoint: bool, num_classes: int | None,
                  activation: str | None, known_classes: int | None) -> dict:
    """create_model's keyword arguments: the checkpoint's, with the asked class count (else the one its timm tag or
    official name says) and activation (refused when it is not the one the checkpoint's weights were trained with)."""
    import model as models

    kwargs = dict(raw.get("model_kwargs") or {})
    if num_classes is not None or known_classes is not None:
        kwargs["num_classes"] = num_classes if num_classes is not None else known_classes
    if activation is not None:
        trained = models.trained_activation(model_name, kwargs)
        if has_checkpoint and activation != trained:  # parity would not see it: both sides share the swap
            raise ExportError(f"the checkpoint's weights were trained with {trained}; --activation {activation} would "
                              f"run them under another activation and change every output. Retrain with "
                              f"`python -m training --activation {activation}` (or drop --activation)")
        kwargs["activation"] = activation
    kwargs.pop("drop_path_rate", None)  # eval export: no stochastic depth
    return kwargs


def _load_weights(module, raw: dict, use_ema: bool, model_name: str, kwargs: dict) -> str:
    """Load the checkpoint into `module`; its Source.format ("project", "official", "timm", "torchvision")."""
    import model as models

    loaded = models.load_checkpoint(module, raw, use_ema=use_ema)
    if loaded.head_reinitialised:  # fine-tuning wants a new head; an export would ship a random classifier
        classes = kwargs.get("num_classes", 1000)
        raise ExportError(f"the checkpoint's classifier head does not fit {model_name} with {classes} classes "
                          "(see the warning above for its shape): pass --num-classes with the checkpoint's class "
                          "count (e.g. 21841 for an ImageNet-22K checkpoint)")
    # "native" covers the official facebookresearch checkpoints (same names as ours)
    return "project" if "model_name" in raw else loaded.source_format.replace("native", "official")


def _export_source(module, model_name: str, kwargs: dict, raw: dict, checkpoint: str | Path | None,
                   source_format: str, tag: TimmPretrained | None, *, input_size: int | None,
                   labels: Sequence[str] | None, use_ema: bool, dataset: str | None) -> ExportSource:
    """The manifest's metadata of the built model: classes, channels, labels, evaluation transform and source."""
    import model as models

    cfg = models.get_config(model_name)
    own = raw.get("data_config") or (tag.data_config(input_size) if tag is not None else None)
    from_checkpoint = own is not None  # the weights' own evaluation transform: a project run's, a timm tag's
    data_config = dict(own or asdict(cfg.data))
    num_classes = int(kwargs.get("num_classes", 1000))
    in_chans = int(kwargs.get("in_chans", data_config.get("in_chans", 3)))
    labels = _labels_of(labels if labels is not None else raw.get("class_names"), num_classes)
    if len(data_config["mean"]) != in_chans:
        raise ExportError(f"data_config mean has {len(data_config['mean'])} entries for {in_chans} input channels")
    source = Source(
        checkpoint=Path(checkpoint).name if checkpoint is not None else None,
        sha256=sha256_file(Path(checkpoint)) if checkpoint is not None else None,
        format=source_format,
        weights="ema" if use_ema else "model",
        dataset=dataset or dataset_of(raw, checkpoint, source_format, num_classes, tag),
        pretrained=pretrained_of(checkpoint, source_format, model_name, num_classes, tag),
    )
    preprocess = checkpoint_preprocess(data_config, input_size, from_checkpoint, source_format, model_name)
    return ExportSource(module, model_name, kwargs.get("activation") or cfg.default_activation, num_classes, in_chans,
                        preprocess, labels, source)


def _model_name_of(asked: str | None, held: str | None) -> str:
    """The model to build: the one the checkpoint holds (a project run's, a timm tag's), else --model."""
    if held is not None and asked is not None and asked != held:
        raise ExportError(f"--model {asked} but the checkpoint holds {held}; drop --model")
    model_name = held or asked
    if model_name is None:
        raise ExportError("no model name: pass --model (project checkpoints carry their model name, and so do timm "
                          "checkpoints whose timm name is known: --timm-name)")
    check_model_name(model_name)
    return model_name


def _labels_of(labels: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    """The given class names (the caller's, a project checkpoint's), else export.labels.default_labels: ImageNet-1K's,
    -22K's or -12K's by the class count, or class_0..class_{N-1}."""
    labels = tuple(str(label) for label in labels) if labels is not None else default_labels(num_classes)
    if len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels for {num_classes} classes; pass one label per class")
    return labels


def pretrained_of(checkpoint: str | Path | None, source_format: str, model_name: str, num_classes: int,
                  timm_pretrained: TimmPretrained | None = None) -> str | None:
    """The published weights a checkpoint is, known only by its name (its timm tag, the official file name, the file
    name torchvision downloads its weights to) with the class count they have; None for any other checkpoint, whatever
    its format (a model fine-tuned with the official repository or timm has their key names too)."""
    from model.pretrained import PRETRAINED_CHECKPOINTS

    if checkpoint is None or source_format == "project":
        return None
    if timm_pretrained is not None:
        return timm_pretrained.name if timm_pretrained.num_classes == num_classes else None
    if source_format == "official":
        official = PRETRAINED_CHECKPOINTS.get(Path(checkpoint).stem)
        matches = official is not None and (official.model_name, official.num_classes) == (model_name, num_classes)
        return official.name if matches else None
    if source_format == "torchvision" and num_classes == 1000 and model_name in TORCHVISION_WEIGHT_ENUMS:
        import torchvision.models

        weights = getattr(torchvision.models, TORCHVISION_WEIGHT_ENUMS[model_name])
        return next((str(entry) for entry in weights if Path(entry.url).name == Path(checkpoint).name), None)
    return None


def dataset_of(raw: dict, checkpoint: str | Path | None, source_format: str, num_classes: int,
               timm_pretrained: TimmPretrained | None = None) -> str | None:
    """What the weights were trained on, as far as the checkpoint tells: a project run records its data folder
    (none: the digits demo), an official file is named in the pretrained table, timm's weights by their tag; None
    when unknown (random init)."""
    from model.pretrained import PRETRAINED_CHECKPOINTS

    if source_format == "project":
        data_dir = (raw.get("config") or {}).get("data_dir")
        return Path(data_dir).name if data_dir else DIGITS_DATASET
    if timm_pretrained is not None and timm_pretrained.num_classes == num_classes:
        return timm_pretrained.dataset
    official = PRETRAINED_CHECKPOINTS.get(Path(checkpoint).stem) if checkpoint is not None else None
    if official is not None and official.num_classes == num_classes:
        return OFFICIAL_DATASETS[official.dataset]
    if source_format != "random" and num_classes == 1000:  # the labels are ImageNet-1K's (export/labels.py)
        return "ImageNet-1K"
    return None
