"""Parity arithmetic and thresholds: disagreeing outputs fail with a message that names the numbers."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from runtime.preprocess import ImageError
from runtime.repository import Preprocess
from runtime.verify import (
    PARITY_THRESHOLDS,
    VERIFY_CHUNK,
    ParityError,
    VerificationInputs,
    check_parity,
    compare,
    image_paths_in,
    run_onnxruntime,
    verification_inputs,
    verify_against,
)

SPEC = Preprocess(resize_px=37, crop_px=32, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _logits(seed=0, n=10, classes=20):
    return np.random.default_rng(seed).standard_normal((n, classes)).astype(np.float32) * 5


def test_identical_outputs_agree_fully():
    ref = _logits()
    parity = compare(ref, ref.copy(), "pytorch-fp32", num_real_images=6)
    assert (parity.max_abs_diff, parity.top1_agreement, parity.top5_agreement) == (0.0, 1.0, 1.0)
    assert check_parity(parity, ref, ref, "fp32", "ONNX fp32") is parity


def test_swapped_top1_fails_fp32_with_the_numbers():
    ref = _logits()
    out = ref.copy()
    out[0] = -out[0]  # flips one prediction
    parity = compare(ref, out, "pytorch-fp32", num_real_images=0)
    assert parity.top1_agreement == pytest.approx(0.9)
    with pytest.raises(ParityError, match=r"top-1 agreement 0\.900 < 1\.000: top-1 differs on 1 of 10 inputs with a "
                                          r"clear top-1"):
        check_parity(parity, ref, out, "fp32", "ONNX fp32")


def test_max_abs_diff_is_judged_relative_to_the_logit_scale():
    ref = _logits()
    scale = np.abs(ref).max()
    small = ref + scale * 0.5 * PARITY_THRESHOLDS["fp32"].max_rel_abs_diff
    big = ref + scale * 2 * PARITY_THRESHOLDS["fp32"].max_rel_abs_diff
    check_parity(compare(ref, small, "r", 0), ref, small, "fp32", "x")
    with pytest.raises(ParityError, match="of the logit scale"):
        check_parity(compare(ref, big, "r", 0), ref, big, "fp32", "x")
    check_parity(compare(ref, big, "r", 0), ref, big, "fp16", "x")  # within the looser fp16 bound


def _led(leads, classes=20):
    """Logits of scale 10 whose top-1 (class 0) leads the runner-up (class 1) by leads[i] on input i."""
    logits = np.random.default_rng(0).uniform(-5, 5, (len(leads), classes))
    logits[:, 0] = 10.0
    logits[:, 1] = 10.0 - np.asarray(leads)
    return logits


def _swapped(logits, rows):
    """`logits` with top-1 and runner-up swapped on `rows`, each moved by just over half their lead."""
    out = logits.copy()
    for row in rows:
        lead = logits[row, 0] - logits[row, 1]
        out[row, 0] -= 0.51 * lead
        out[row, 1] += 0.51 * lead
    return out


def test_a_near_tie_that_rounding_inside_the_allowed_difference_flips_fails_no_check():
    """A random-init 1000-class model's near-tied top-1, flipped by bf16 rounding 10x inside the allowed difference."""
    ref = _led([5.0, 3.0, 1.5, 0.03])  # leads of 0.5, 0.3, 0.15 and 0.003 of the logit scale
    out = _swapped(ref, [3])
    parity = compare(ref, out, "onnxruntime-fp32", num_real_images=4)
    assert parity.top1_agreement == 0.75  # recorded over all inputs: the flip is on record
    assert check_parity(parity, ref, out, "bf16", "ONNX bf16") is parity


def test_a_flipped_clear_top1_fails_with_how_many_inputs_had_one():
    ref = _led([5.0, 3.0, 1.5, 0.03])
    out = _swapped(ref, [0, 3])
    with pytest.raises(ParityError, match=r"top-1 agreement 0\.667 < 0\.900: top-1 differs on 1 of 3 inputs with a "
                                          r"clear top-1 \(a lead over the runner-up above 0\.12 of the logit scale\)"):
        check_parity(compare(ref, out, "onnxruntime-fp32", 4), ref, out, "bf16", "ONNX bf16")


def test_int8_judges_every_input_however_near_its_top1():
    """Twice int8's allowed difference is the whole logit scale: judged by lead, no input would count. Its flips of
    near-ties count, and 6 of 10 fail it though every logit is well inside its allowed difference."""
    ref = _led([0.1] * 10)
    out = _swapped(ref, range(6))
    parity = compare(ref, out, "onnxruntime-fp32", 10)
    assert parity.max_abs_diff / 10 < PARITY_THRESHOLDS["int8"].max_rel_abs_diff / 50
    with pytest.raises(ParityError, match=r"top-1 agreement 0\.400 < 0\.500: top-1 differs on 6 of 10 inputs\."):
        check_parity(parity, ref, out, "int8", "ONNX int8")
    check_parity(compare(ref, _swapped(ref, range(5)), "r", 10), ref, _swapped(ref, range(5)), "int8", "x")


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


class _BatchSizes:
    """Wraps a callable taking a batch first, recording each batch's size."""

    def __init__(self, run):
        self.run, self.sizes = run, []

    def __call__(self, batch, *args, **kwargs):
        self.sizes.append(len(batch))
        return self.run(batch, *args, **kwargs)


def test_pytorch_reference_logits_are_computed_a_chunk_at_a_time():
    """A --verify-images folder of many photos is not one batch through PyTorch (~13 MB per ConvNeXt-T image)."""
    import torch

    from export.onnx import pytorch_logits

    torch.manual_seed(0)
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5)).eval()
    module = _BatchSizes(linear)
    batch = np.random.default_rng(0).standard_normal((2 * VERIFY_CHUNK + 6, 3, 4, 4)).astype(np.float32)
    logits = pytorch_logits(module, batch)
    assert module.sizes == [VERIFY_CHUNK, VERIFY_CHUNK, 6]
    with torch.no_grad():
        np.testing.assert_allclose(logits, linear(torch.from_numpy(batch)).numpy(), rtol=1e-6, atol=1e-6)


class _RecordingSession:
    """An ONNX Runtime session that records the batch size of each run."""

    def __init__(self, session):
        self.session, self.sizes = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, outputs, feeds):
        self.sizes.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


def test_onnxruntime_logits_are_computed_a_chunk_at_a_time(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    import runtime.verify as verify

    path = tmp_path / "flatten.onnx"  # logits = the input, flattened
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["logits"], axis=1)], "flatten",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 48])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))
    sessions: list[_RecordingSession] = []
    real_create_session = verify.create_session
    monkeypatch.setattr(verify, "create_session",
                        lambda *args: sessions.append(_RecordingSession(real_create_session(*args))) or sessions[-1])
    batch = np.random.default_rng(0).standard_normal((VERIFY_CHUNK + 1, 3, 4, 4)).astype(np.float32)
    logits = run_onnxruntime(path, batch)
    np.testing.assert_array_equal(logits, batch.reshape(len(batch), -1))
    assert [session.sizes for session in sessions] == [[VERIFY_CHUNK, 1]]


def test_macos_appledouble_files_are_not_taken_for_photos(tmp_path, real_photos):
    """Copied from a Mac to a USB stick or a network share, IMG_1.jpg gets a `._IMG_1.jpg` of metadata beside it."""
    shutil.copy(real_photos[0], tmp_path / "IMG_1.jpg")
    (tmp_path / "._IMG_1.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64))
    paths = image_paths_in(tmp_path)
    assert [p.name for p in paths] == ["IMG_1.jpg"]
    assert verification_inputs(SPEC, paths).num_real_images == 1


@pytest.mark.parametrize(("name", "content"), [("notes.png", b"a text file, named .png"),
                                                ("cut.jpg", None)], ids=["text-as-png", "truncated-jpeg"])
def test_a_bad_file_among_the_photos_is_named(tmp_path, real_photos, name, content):
    for photo in real_photos[:2]:
        shutil.copy(photo, tmp_path / photo.name)
    jpeg = next(p for p in real_photos if p.suffix == ".jpg").read_bytes()
    (tmp_path / name).write_bytes(content if content is not None else jpeg[: len(jpeg) // 3])
    with pytest.raises(ImageError, match=f"^{tmp_path / name}: .* \\(remove it from {tmp_path}, or replace it\\)$"):
        verification_inputs(SPEC, image_paths_in(tmp_path))


@pytest.mark.parametrize("precisions", [("fp32",), ("fp32", "fp16")], ids=["fp32-only", "fp32-and-fp16"])
def test_the_fp32_onnx_model_runs_once_over_the_verification_inputs(tmp_path, monkeypatch, precisions):
    """Its parity run's logits are the other precisions' reference too; with fp32 alone nothing else needs them."""
    import export.onnx
    from export.onnx import export_onnx_version

    runs = []
    real_run = export.onnx.run_onnxruntime

    def recorded_run(path, batch, *args, **kwargs):  # the real run, recorded
        runs.append((path.name, len(batch)))
        return real_run(path, batch, *args, **kwargs)

    monkeypatch.setattr(export.onnx, "run_onnxruntime", recorded_run)
    version = export_onnx_version(tmp_path, "atto", "convnext_atto", num_classes=3, input_size=32,
                                  precisions=precisions, verify_images=[])
    assert runs == [("model.onnx", 4)]
    assert [a.precision for a in version.manifest.artifacts] == list(precisions)
