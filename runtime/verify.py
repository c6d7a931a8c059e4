"""Parity of an exported artifact against its reference: max abs diff, top-1 / top-5 agreement, thresholds."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.ort_session import create_session, provider_key
from runtime.preprocess import ImageError, preprocess
from runtime.repository import Parity, Preprocess
from runtime.tensorrt_runtime import run_in_chunks

RANDOM_SEED = 0
NUM_RANDOM_INPUTS = 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_PIXELS = 50_000_000
# Inputs per model call in a parity check: its memory is that of this many inputs (PyTorch needs ~13 MB of activations
# per ConvNeXt-T image at 224 px), however many photos --verify-images holds.
VERIFY_CHUNK = 32


class ParityError(RuntimeError):
    """An artifact's outputs are further from the reference than the documented thresholds allow."""


@dataclass(frozen=True)
class ParityThreshold:
    max_rel_abs_diff: float  # max |out - ref| / max(|ref|), over all logits of all inputs
    min_top1_agreement: float  # over the inputs with a clear top-1
    # An input's top-1 is clear when it leads the reference's runner-up by more than this x the logit scale.
    clear_margin_rel: float


# Thresholds per precision. max_abs_diff is judged relative to the reference's logit scale (max |logit|), so a
# random-init model with tiny logits and a trained one with logits of ~20 are judged alike. top-1 agreement is judged
# on the inputs whose top-1 is clear: for fp32/fp16/bf16 a lead of more than twice the allowed difference (two logits,
# each moved by that much, can swap a smaller one). A random-init 1000-class model has near-tied top-1/top-2 logits,
# and bf16 rounding well inside the allowed difference flipped one of its 4 inputs (agreement 0.75). int8 judges every
# input: twice its allowed difference is the whole logit scale, and its low floor is what absorbs rounding flips.
# For fp32/fp16/bf16 the top-1 bound is then implied by the max-diff bound (a clear lead flips only when a logit moved
# by more than the allowed difference): it names what flipped, it refuses nothing the max-diff bound would pass.
# int8 is loose on purpose: post-training static quantization of a random-init or small-data model moves logits a
# lot; its recorded agreement is the figure to read.
PARITY_THRESHOLDS: dict[str, ParityThreshold] = {
    "fp32": ParityThreshold(max_rel_abs_diff=1e-3, min_top1_agreement=1.0, clear_margin_rel=2e-3),
    "fp16": ParityThreshold(max_rel_abs_diff=2e-2, min_top1_agreement=0.99, clear_margin_rel=4e-2),
    "bf16": ParityThreshold(max_rel_abs_diff=6e-2, min_top1_agreement=0.90, clear_margin_rel=1.2e-1),
    "int8": ParityThreshold(max_rel_abs_diff=5e-1, min_top1_agreement=0.50, clear_margin_rel=0.0),
}


@dataclass(frozen=True)
class VerificationInputs:
    """A batch of inputs: seeded random tensors first, then real photos preprocessed the serving way."""

    batch: np.ndarray  # (N, C, H, W) float32
    num_real_images: int


def default_image_paths() -> list[Path]:
    """The real photographs shipped by scikit-learn / scikit-image, when those packages are importable."""
    paths: list[Path] = []
    try:
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
        paths += [folder / "china.jpg", folder / "flower.jpg"]
    except ImportError:
        pass
    try:
        import skimage

        folder = Path(skimage.__file__).parent / "data"
        paths += [folder / n for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
    except ImportError:
        pass
    return [p for p in paths if p.is_file()]


def image_paths_in(folder: str | Path, flag: str = "--verify-images") -> list[Path]:
    """The image files in `folder` (not in its subfolders), by name; errors name `flag`, the option it came from.

    macOS's AppleDouble files (`._IMG_1.jpg`, the metadata it writes beside IMG_1.jpg on other file systems) are not
    images, whatever their name ends with: they are left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        error = NotADirectoryError if folder.exists() else FileNotFoundError
        raise error(f"{flag} {folder} {'is not a folder' if folder.exists() else 'does not exist'}; pass a folder of "
                    "JPEG/PNG files")
    paths = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("._") and p.is_file())
    if not paths:
        raise FileNotFoundError(f"{flag}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return paths


def preprocess_images(paths: Sequence[Path], spec: Preprocess) -> np.ndarray:
    """Images -> (N, C, crop, crop) float32, exactly as the service preprocesses them; an ImageError names the file
    (one bad file in a folder of hundreds)."""
    arrays = []
    for path in map(Path, paths):
        try:
            arrays.append(preprocess(path.read_bytes(), spec, MAX_PIXELS))
        except ImageError as error:
            raise ImageError(error.code, f"{path}: {error.message} (remove it from {path.parent}, or replace "
                                         "it)") from None
    channels = len(spec.mean)
    if not arrays:
        return np.zeros((0, channels, spec.crop_px, spec.crop_px), np.float32)
    return np.stack(arrays).astype(np.float32)


def verification_inputs(
    spec: Preprocess, image_paths: Sequence[Path] | None, num_random: int = NUM_RANDOM_INPUTS
) -> VerificationInputs:
    """Fixed seeded random inputs (standard normal, the normalised-image scale) plus real photos if given."""
    channels = len(spec.mean)
    rng = np.random.default_rng(RANDOM_SEED)
    random = rng.standard_normal((num_random, channels, spec.crop_px, spec.crop_px)).astype(np.float32)
    real = np.zeros((0,) + random.shape[1:], np.float32)
    if channels == 3:  # photos are RGB; single-channel models verify on random inputs only
        real = preprocess_images(list(image_paths or []), spec)
    return VerificationInputs(np.concatenate([random, real]), num_real_images=len(real))


def _refuse_non_finite(logits: np.ndarray, whose: str, advice: str) -> None:
    """A ParityError when `logits` hold NaN or infinity: no difference or agreement can be measured on them."""
    bad = ~np.isfinite(logits)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise ParityError(f"{whose} NaN or infinite logits ({int(bad.sum())} of {bad.size} values, on {rows} of "
                          f"{len(logits)} inputs){advice}")


def in_chunks(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, size: int = VERIFY_CHUNK) -> np.ndarray:
    """run(batch), computed `size` inputs at a time and concatenated: the same outputs, at the memory of `size`."""
    return run_in_chunks(run, batch, 1, size, 0)


def compare(reference: np.ndarray, output: np.ndarray, reference_name: str, num_real_images: int,
            what: str = "the artifact") -> Parity:
    """Parity of `output` logits (of `what`) against `reference` logits, both (N, num_classes)."""
    if reference.shape != output.shape:
        raise ParityError(f"output shape {output.shape} differs from the reference's {reference.shape}")
    _refuse_non_finite(reference, f"the reference ({reference_name}) gives",
                       ": the model itself is broken; check its weights")
    _refuse_non_finite(output, f"{what} gives", f" where {reference_name} gives finite ones: a value past its "
                       "precision's range (fp16 overflows past 65504)? Check the export (precision block list) or use "
                       "another precision")
    reference = reference.astype(np.float64)
    output = output.astype(np.float64)
    k = min(5, reference.shape[1])
    top1 = float(np.mean(reference.argmax(1) == output.argmax(1)))
    ref_top5 = np.argsort(-reference, axis=1)[:, :k]
    out_top5 = np.argsort(-output, axis=1)[:, :k]
    top5 = float(np.mean([set(a) == set(b) for a, b in zip(ref_top5, out_top5, strict=True)]))
    return Parity(
        reference=reference_name,
        num_inputs=len(reference),
        num_real_images=num_real_images,
        max_abs_diff=float(np.max(np.abs(reference - output))),
        top1_agreement=top1,
        top5_agreement=top5,
    )


def _clear_top1(reference: np.ndarray, output: np.ndarray, margin: float) -> tuple[int, int]:
    """(clear, agreeing): how many inputs' reference top-1 leads its runner-up by more than `margin` (logits), and on
    how many of those `output` has the same top-1."""
    if reference.shape[1] == 1:  # one class: nothing to flip
        leads = np.full(len(reference), np.inf)
    else:
        top2 = np.sort(reference, axis=1)[:, -2:]
        leads = top2[:, 1] - top2[:, 0]
    clear = leads > margin
    agreeing = reference.argmax(1) == output.argmax(1)
    return int(clear.sum()), int((clear & agreeing).sum())


def check_parity(parity: Parity, reference: np.ndarray, output: np.ndarray, precision: str, what: str) -> Parity:
    """Raise ParityError when `parity` (of `output` against `reference`) is outside the thresholds for `precision`;
    return it otherwise. Its recorded top-1 agreement is over all inputs; the check's is over the clear ones."""
    threshold = PARITY_THRESHOLDS[precision]
    scale = max(float(np.max(np.abs(reference))), 1e-6)
    relative = parity.max_abs_diff / scale
    problems = []
    if relative > threshold.max_rel_abs_diff:
        problems.append(
            f"max abs diff {parity.max_abs_diff:.3g} is {relative:.3g} of the logit scale {scale:.3g} "
            f"(allowed {threshold.max_rel_abs_diff:g})"
        )
    clear, agreeing = _clear_top1(reference.astype(np.float64), output.astype(np.float64),
                                 threshold.clear_margin_rel * scale)
    agreement = agreeing / clear if clear else 1.0
    if agreement < threshold.min_top1_agreement:
        judged = (f"inputs with a clear top-1 (a lead over the runner-up above {threshold.clear_margin_rel:g} of the "
                  "logit scale)" if threshold.clear_margin_rel else "inputs")
        problems.append(f"top-1 agreement {agreement:.3f} < {threshold.min_top1_agreement:.3f}: top-1 differs on "
                        f"{clear - agreeing} of {clear} {judged}")
    if problems:
        raise ParityError(
            f"{what} ({precision}) does not match {parity.reference} on {parity.num_inputs} inputs: "
            + "; ".join(problems)
            + ". Check the export (opset, precision block list) or the calibration images."
        )
    return parity


def run_onnxruntime(
    onnx_path: Path, batch: np.ndarray, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> np.ndarray:
    """Logits of `batch` (VERIFY_CHUNK inputs per run) on the first of `providers`; ProviderError when ONNX Runtime
    cannot load that provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The first provider names the session's chain (runtime/ort_session.py); parity on a GPU provider that quietly
    # ran on CPU would verify the wrong thing.
    session = create_session(onnx_path, provider_key(providers[0]), options)
    input_name = session.get_inputs()[0].name
    return in_chunks(lambda chunk: session.run(None, {input_name: chunk})[0], batch)


def verify_against(
    reference: np.ndarray,
    run: Callable[[np.ndarray], np.ndarray],
    inputs: VerificationInputs,
    precision: str,
    reference_name: str,
    what: str,
) -> Parity:
    return verify_outputs(reference, run(inputs.batch), inputs, precision, reference_name, what)


def verify_outputs(reference: np.ndarray, output: np.ndarray, inputs: VerificationInputs, precision: str,
                   reference_name: str, what: str) -> Parity:
    """The parity of `output`, `what`'s logits of `inputs`, against `reference`; ParityError outside the thresholds
    for `precision`."""
    parity = compare(reference, output, reference_name, inputs.num_real_images, f"{what} ({precision})")
    return check_parity(parity, reference, output, precision, what)
