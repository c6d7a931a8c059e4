"""What a served model is and knows, from its manifest: architecture, source, dataset, classes (/models, web page)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from runtime.repository import DIGITS_DATASET, Manifest

IMAGENET_PRETRAINED = "convnext_tiny_1k_224_ema"
SERVE_IMAGENET_COMMAND = f"convnext serve --pretrained {IMAGENET_PRETRAINED}"
SAMPLE_LABELS = 5
PUBLISHERS = {"official": "the official", "timm": "timm's", "torchvision": "torchvision's"}
FORMAT_NAMES = {"official": "the official ConvNeXt repository's", "timm": "timm's", "torchvision": "torchvision's"}


class ModelCard(BaseModel):
    """The card's schema in /openapi.json (describe() builds it)."""

    architecture: str
    source: Literal["demo", "official", "checkpoint", "random"]
    checkpoint: str | None
    pretrained: str | None
    dataset: str | None
    num_classes: int
    sample_labels: list[str]
    summary: str
    serve_imagenet_command: str | None


def dataset_of(manifest: Manifest) -> str | None:
    """The manifest's dataset; for manifests written before the field existed, what the source and labels imply."""
    source = manifest.source
    if source.dataset is not None:
        return source.dataset
    if source.format == "project" and manifest.labels == tuple(str(i) for i in range(10)):
        return DIGITS_DATASET  # the demo model exported by an older `make demo-model`
    if source.format in ("official", "timm", "torchvision") and manifest.num_classes == 1000:
        return "ImageNet-1K"
    return None


def source_kind(manifest: Manifest, dataset: str | None) -> str:
    """"demo" (the offline digits model), "official" (published pretrained weights), "checkpoint" or "random".

    Published weights only when the export knew them (source.pretrained): an official, timm or torchvision format
    says how the keys are named, which a model fine-tuned on anything with those code bases shares. A manifest
    written before source.pretrained existed so describes its checkpoint by format until exported again."""
    if manifest.source.format == "random":
        return "random"
    if manifest.source.format == "project" and dataset == DIGITS_DATASET:
        return "demo"
    return "official" if manifest.source.pretrained is not None else "checkpoint"


def describe(manifest: Manifest) -> dict:
    """A JSON-ready card: the facts plus one sentence a person reads on the web page."""
    dataset = dataset_of(manifest)
    kind = source_kind(manifest, dataset)
    samples = list(manifest.labels[:SAMPLE_LABELS])
    more = ", …" if manifest.num_classes > len(samples) else ""
    knows = f"recognises {manifest.num_classes} classes ({', '.join(samples)}{more})"
    checkpoint, source_format = manifest.source.checkpoint, manifest.source.format
    in_format = f" (in {FORMAT_NAMES[source_format]} format)" if source_format in FORMAT_NAMES else ""
    summary = {
        # The digits set is light ink on a dark background and training never inverts it: a digit drawn dark on
        # light (on paper, or a transparent drawing, which the service puts on white) is not recognised as it is.
        "demo": f"The offline demo model: {manifest.architecture} trained on handwritten digits, light digits on a "
                f"dark background like scikit-learn's 8x8 digits; it {knows}. Invert a dark-on-light drawing (ink on "
                "paper) first. It only knows digits: any photo gets a digit.",
        "official": f"{manifest.architecture} with {PUBLISHERS.get(source_format, 'the published')} "
                    f"{dataset or 'pretrained'} weights {manifest.source.pretrained} ({checkpoint}); it {knows}.",
        "checkpoint": f"{manifest.architecture} from the checkpoint {checkpoint}{in_format}"
                      + (f", trained on {dataset}" if dataset else "") + f"; it {knows}.",
        "random": f"{manifest.architecture} with random (untrained) weights: its {manifest.num_classes} classes "
                  f"({', '.join(samples)}{more}) are placeholders and its answers mean nothing.",
    }[kind]
    return {
        "architecture": manifest.architecture,
        "source": kind,
        "checkpoint": checkpoint,
        "pretrained": manifest.source.pretrained,
        "dataset": dataset,
        "num_classes": manifest.num_classes,
        "sample_labels": samples,
        "summary": summary,
        # The demo knows digits only: point at the one command that serves a model of everyday photos.
        "serve_imagenet_command": SERVE_IMAGENET_COMMAND if kind in ("demo", "random") else None,
    }
