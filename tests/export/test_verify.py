"""Parity arithmetic and thresholds: disagreeing outputs fail with a message that names the numbers."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.verify import PARITY_THRESHOLDS, ParityError, VerificationInputs, check_parity, compare, verify_against


def _logits(seed=0, n=10, classes=20):
    return np.random.default_rng(seed).standard_normal((n, classes)).astype(np.float32) * 5


def test_identical_outputs_agree_fully():
    ref = _logits()
    parity = compare(ref, ref.copy(), "pytorch-fp32", num_real_images=6)
    assert (parity.max_abs_diff, parity.top1_agreement, parity.top5_agreement) == (0.0, 1.0, 1.0)
    assert check_parity(parity, ref, "fp32", "ONNX fp32") is parity


def test_swapped_top1_fails_fp32_with_the_numbers():
    ref = _logits()
    out = ref.copy()
    out[0] = -out[0]  # flips one prediction
    parity = compare(ref, out, "pytorch-fp32", num_real_images=0)
    assert parity.top1_agreement == pytest.approx(0.9)
    with pytest.raises(ParityError, match=r"top-1 agreement 0\.900 < 1\.000"):
        check_parity(parity, ref, "fp32", "ONNX fp32")


def test_max_abs_diff_is_judged_relative_to_the_logit_scale():
    ref = _logits()
    scale = np.abs(ref).max()
    small = ref + scale * 0.5 * PARITY_THRESHOLDS["fp32"].max_rel_abs_diff
    big = ref + scale * 2 * PARITY_THRESHOLDS["fp32"].max_rel_abs_diff
    check_parity(compare(ref, small, "r", 0), ref, "fp32", "x")
    with pytest.raises(ParityError, match="of the logit scale"):
        check_parity(compare(ref, big, "r", 0), ref, "fp32", "x")
    check_parity(compare(ref, big, "r", 0), ref, "fp16", "x")  # within the looser fp16 bound


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_logits_fail_parity_with_a_parity_error_not_a_validation_error(bad):
    """An fp16 overflow gives NaN/inf logits: a ParityError (a RuntimeError, which the export and the service's start
    end in one line), saying how many, not the manifest schema's complaint about a NaN max abs diff."""
    ref = _logits()
    out = ref.copy()
    out[3, 17] = bad
    inputs = VerificationInputs(np.zeros((len(ref), 3, 4, 4), np.float32), num_real_images=6)
    with pytest.raises(ParityError, match=r"ONNX fp16 \(fp16\) gives NaN or infinite logits \(1 of 200 values, on 1 "
                                          r"of 10 inputs\) where onnxruntime-fp32 gives finite ones"):
        verify_against(ref, lambda batch: out, inputs, "fp16", "onnxruntime-fp32", "ONNX fp16")
    with pytest.raises(ParityError, match=r"the reference \(pytorch-fp32\) gives NaN or infinite logits"):
        compare(out, ref, "pytorch-fp32", num_real_images=0)
