"""Reduced-precision ONNX variants of a verified fp32 model: fp16 (GPU providers), bf16 (TensorRT 11) and int8."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.repository import Parity, Preprocess
from runtime.verify import VerificationInputs, preprocess_images, run_onnxruntime, verify_against

from .bf16 import FP16_OP_BLOCK_LIST, MAX_REFERENCE_INPUTS, convert_bf16, run_reference

NUM_CALIBRATION_RANDOM = 8
logger = logging.getLogger(__name__)


def convert_fp16(fp32_path: Path, fp16_path: Path) -> None:
    """fp16 weights and activations, fp32 inputs/outputs (keep_io_types) and fp32 normalisation ops."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(fp32_path))
    with warnings.catch_warnings(record=True) as caught:  # one line for the converter's warning per clamped tensor
        warnings.simplefilter("always", UserWarning)
        model16 = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=list(FP16_OP_BLOCK_LIST) + list(float16.DEFAULT_OP_BLOCK_LIST),
        )
    clamped = 0
    for warning in caught:
        if "truncated" in str(warning.message):
            clamped += 1
        else:  # anything else the converter says is passed on as it was
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if clamped:
        logger.info("fp16: the converter clamps values outside float16's range (magnitudes under 1e-07 or over "
                    "65504) %d times; the parity check measures the effect", clamped)
    onnx.checker.check_model(model16)
    onnx.save(model16, str(fp16_path))


class _ArrayReader:
    """onnxruntime.quantization.CalibrationDataReader over a (N, C, H, W) array, one image at a time."""

    def __init__(self, input_name: str, batch: np.ndarray):
        self.input_name = input_name
        self.items = iter(batch[i : i + 1] for i in range(len(batch)))

    def get_next(self):
        item = next(self.items, None)
        return None if item is None else {self.input_name: item}

    def rewind(self):  # pragma: no cover - not used by MinMax calibration
        raise NotImplementedError


def calibration_batch(spec: Preprocess, image_paths: Sequence[Path]) -> np.ndarray:
    """Real photos preprocessed the serving way; seeded random inputs only when there are none."""
    real = preprocess_images(list(image_paths), spec) if len(spec.mean) == 3 else None
    if real is not None and len(real):
        return real
    logger.warning("int8 calibration runs on %d random tensors: no photos found (pass --calibration-images, or "
                   "install scikit-image/scikit-learn for their sample photos); activation ranges fitted to noise "
                   "may clip real images", NUM_CALIBRATION_RANDOM)
    rng = np.random.default_rng(1)
    shape = (NUM_CALIBRATION_RANDOM, len(spec.mean), spec.crop_px, spec.crop_px)
    return rng.standard_normal(shape).astype(np.float32)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Static int8, QDQ format, per-channel weights, MinMax calibration over `calibration`.

    Symmetric for activations as well as weights (every zero point 0): TensorRT's explicit quantization takes only
    symmetric Q/DQ, and ONNX Runtime's default for activations is asymmetric.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
    try:
        quantize_static(
            str(prepared), str(int8_path), _ArrayReader(input_name, calibration),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"], extra_options={"ActivationSymmetric": True},
        )
    finally:
        prepared.unlink(missing_ok=True)


def make_variant(
    precision: str,
    fp32_path: Path,
    out_path: Path,
    onnx_reference: np.ndarray,
    inputs: VerificationInputs,
    spec: Preprocess,
    calibration_images: Sequence[Path],
) -> Parity:
    """Write the `precision` variant of `fp32_path` and verify it against ONNX Runtime fp32."""
    if precision == "fp16":
        convert_fp16(fp32_path, out_path)
    elif precision == "int8":
        quantize_int8(fp32_path, out_path, calibration_batch(spec, calibration_images))
    elif precision == "bf16":

        convert_bf16(fp32_path, out_path)
        keep = min(MAX_REFERENCE_INPUTS, len(inputs.batch))  # the real photos are last: keep those
        subset = VerificationInputs(inputs.batch[-keep:], min(inputs.num_real_images, keep))
        return verify_against(
            onnx_reference[-keep:], lambda b: run_reference(out_path, b), subset, precision, "onnxruntime-fp32",
            "ONNX bf16 (reference evaluator)",
        )
    else:
        raise ValueError(f"no ONNX variant for precision {precision!r}; choose fp16, bf16 or int8")
    return verify_against(
        onnx_reference, lambda b: run_onnxruntime(out_path, b), inputs, precision, "onnxruntime-fp32",
        f"ONNX {precision}",
    )
