"""Strict checkpoint loading: official / project formats, errors that list the keys, head re-initialisation."""
from __future__ import annotations

import argparse
import json
import logging
import random

import pytest
import timm
import torch

from model import create_model
from model.checkpoints import CheckpointError, convert_state_dict, load_checkpoint, read_checkpoint
from tests.model.random_weights import randomise


@pytest.fixture(scope="module")
def atto_state() -> dict[str, torch.Tensor]:
    """convnext_atto's weights with no two blocks alike: at init a block's tensor loaded in another's place (their
    gammas, norms, biases) compared equal."""
    return {k: v.clone() for k, v in randomise(create_model("convnext_atto", num_classes=1000)).state_dict().items()}


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    """A ResNet-50's weights with BatchNorm statistics off their defaults, so a statistic not loaded would show."""
    torch.manual_seed(0)
    model = create_model("resnet50")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("num_batches_tracked"):
                buffer.fill_(1000)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_weights_equal(model, state_dict, skip=()):
    for key, value in model.state_dict().items():
        if not key.startswith(skip):
            assert torch.equal(value, state_dict[key]), key


def test_official_format_loads_model_and_ema_on_request(atto_state):
    ema = {k: v + 1.0 for k, v in atto_state.items()}
    checkpoint = {"model": atto_state, "model_ema": ema}
    model = create_model("convnext_atto")
    assert load_checkpoint(model, checkpoint).source_format == "native"
    _assert_weights_equal(model, atto_state)
    load_checkpoint(model, checkpoint, use_ema=True)
    _assert_weights_equal(model, ema)


def test_use_ema_without_ema_weights_is_an_error(atto_state):
    with pytest.raises(CheckpointError, match="no 'model_ema'"):
        load_checkpoint(create_model("convnext_atto"), {"model": atto_state}, use_ema=True)


def test_project_checkpoint_file_round_trip_with_metadata(atto_state, tmp_path):
    path = tmp_path / "checkpoint.pth"
    wrapped = {f"module._orig_mod.{k}": v for k, v in atto_state.items()}  # wrappers a careless save leaves
    metadata = {"model_name": "convnext_atto", "model_kwargs": {"num_classes": 1000}, "class_names": ["a", "b"],
                "data_config": {"input_size": 224, "crop_pct": 0.875}}
    torch.save({"model": wrapped, **metadata}, path)
    raw = read_checkpoint(path)
    assert {k: raw[k] for k in metadata} == metadata
    model = create_model("convnext_atto", checkpoint=path)
    _assert_weights_equal(model, atto_state)


def test_a_project_checkpoint_loads_only_into_a_model_with_the_activation_it_was_trained_with(atto_state):
    """GELU and ReLU models have the same weight shapes: the recorded activation (model_kwargs, else the recorded
    model's own) is what tells them apart; a roadmap step's checkpoint into the step before it (only GELU differs)."""
    relu = {"model": atto_state, "model_name": "convnext_atto", "model_kwargs": {"activation": "relu"}}
    with pytest.raises(CheckpointError, match="^the checkpoint's weights .* trained with relu, and this model runs "
                                              r"gelu: .* activation='relu' \(python -m training / export: "
                                              r"--activation relu\)$"):  # the same model: its activation is the fix
        load_checkpoint(create_model("convnext_atto"), relu)
    load_checkpoint(create_model("convnext_atto", activation="relu"), relu)
    gelu_step = {"model": create_model("roadmap_r50_gelu").state_dict(), "model_name": "roadmap_r50_gelu"}
    with pytest.raises(CheckpointError, match="^a checkpoint of roadmap_r50_gelu, the model is roadmap_r50_kernel7: "
                                              "build roadmap_r50_gelu .*trained with gelu, and this model runs relu"):
        load_checkpoint(create_model("roadmap_r50_kernel7"), gelu_step)
    load_checkpoint(create_model("roadmap_r50_gelu"), gelu_step)
    load_checkpoint(create_model("convnext_atto", activation="relu"), {"model": atto_state})  # records nothing


def test_a_checkpoint_of_another_model_says_so_before_anything_else(atto_state):
    """The activation advice once came first (build resnet50 with activation='gelu', which resnet50 refuses)."""
    atto = {"model": atto_state, "model_name": "convnext_atto", "model_kwargs": {}}
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(create_model("resnet50"), atto)
    message = str(error.value)
    assert message.startswith("a checkpoint of convnext_atto, the model is resnet50: build convnext_atto to load it")
    assert "activation" not in message.splitlines()[0] and "missing keys: bn1.bias" in message
    step = {"model": create_model("roadmap_r50_kernel7").state_dict(), "model_name": "roadmap_r50_kernel7"}
    with pytest.raises(CheckpointError, match="^a checkpoint of roadmap_r50_kernel7, the model is convnext_atto: ") \
            as error:
        load_checkpoint(create_model("convnext_atto"), step)
    assert "--activation" not in str(error.value)


def test_read_checkpoint_rejects_missing_and_garbage_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        read_checkpoint(garbage)


def test_a_safetensors_file_is_named_as_such(tmp_path):
    header = json.dumps({"head.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    for name in ("model.safetensors", "model.pth"):  # recognised by its content, whatever its name
        path = tmp_path / name
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
        with pytest.raises(CheckpointError, match="is a safetensors file, which is not supported"):
            read_checkpoint(path)


def test_a_legacy_torch_save_file_still_loads(atto_state, tmp_path):
    path = tmp_path / "resnet50-0676ba61.pth"  # torchvision's older weights predate torch.save's zip format
    torch.save({"model": atto_state}, path, _use_new_zipfile_serialization=False)
    model = create_model("convnext_atto", checkpoint=path)
    _assert_weights_equal(model, atto_state)


def test_missing_key_is_listed(atto_state):
    partial = {k: v for k, v in atto_state.items() if k != "stages.2.3.pwconv1.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys: stages\.2\.3\.pwconv1\.weight"):
        load_checkpoint(create_model("convnext_atto"), partial)


def test_unexpected_key_is_listed(atto_state):
    extra = {**atto_state, "stages.3.9.gamma": torch.ones(320)}
    with pytest.raises(CheckpointError, match=r"unexpected keys: stages\.3\.9\.gamma"):
        load_checkpoint(create_model("convnext_atto"), extra)


def test_shape_mismatch_outside_the_head_is_listed_with_shapes(atto_state):
    model = create_model("convnext_atto", in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"downsample_layers\.0\.0\.weight \(checkpoint \(40, 3, 4, 4\), model "
                                              r"\(40, 1, 4, 4\)\)"):
        load_checkpoint(model, atto_state)
    _assert_weights_equal(model, before)  # nothing was loaded: no silent partial load


def test_other_class_count_reinitialises_only_the_head(atto_state, caplog):
    model = create_model("convnext_atto", num_classes=10)
    with caplog.at_level(logging.WARNING, logger="model.checkpoints"):
        result = load_checkpoint(model, {"model": atto_state})
    assert result.head_reinitialised
    assert "re-initialised the head 'head' only" in caplog.text
    _assert_weights_equal(model, atto_state, skip=("head.",))
    assert model.head.weight.shape == (10, 320)
    assert not torch.equal(model.head.weight, atto_state["head.weight"][:10])
    assert 0.01 < model.head.weight.std() < 0.03  # trunc-normal std 0.02, as the model initialises it
    assert torch.count_nonzero(model.head.bias) == 0


def test_convert_state_dict_is_pure(atto_state):
    timm_style = {"stem.0.weight": atto_state["downsample_layers.0.0.weight"]}
    snapshot = dict(timm_style)
    converted, source_format = convert_state_dict(timm_style, create_model("convnext_atto"))
    assert source_format == "timm"
    assert list(converted) == ["downsample_layers.0.0.weight"]
    assert timm_style == snapshot


def test_a_batchnorm_checkpoint_from_before_num_batches_tracked_loads_strictly(resnet_state, tmp_path):
    # PyTorch < 0.4.1 wrote no num_batches_tracked; BatchNorm's load hook fills it in, as strict=True accepts.
    older = {k: v for k, v in resnet_state.items() if not k.endswith(".num_batches_tracked")}
    assert len(older) == len(resnet_state) - 53  # every BatchNorm of the ResNet-50
    path = tmp_path / "resnet50-19c8e357.pth"
    torch.save(older, path, _use_new_zipfile_serialization=False)  # as old as torch.save's format allows
    model, reference = create_model("resnet50"), create_model("resnet50")
    assert load_checkpoint(model, path).source_format == "torchvision"
    reference.load_state_dict(resnet_state)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), reference.eval()(images), rtol=0, atol=0)
    _assert_weights_equal(model, older, skip=tuple(k for k in resnet_state if k not in older))


def test_a_missing_batchnorm_statistic_is_still_listed(resnet_state):
    partial = {k: v for k, v in resnet_state.items() if k != "layer2.0.bn1.running_var"}
    with pytest.raises(CheckpointError, match=r"(?m)missing keys: layer2\.0\.bn1\.running_var$"):
        load_checkpoint(create_model("resnet50"), partial)


@pytest.mark.parametrize("naming", ["native", "timm"])
def test_a_convnext_checkpoint_given_for_resnet50_is_not_called_torchvisions(atto_state, naming):
    state = atto_state if naming == "native" else timm.create_model("convnext_atto", pretrained=False).state_dict()
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(create_model("resnet50"), {"model": state})
    message = str(error.value)
    assert message.startswith(f"checkpoint ({naming} format) does not fit the model:")
    assert "torchvision" not in message


@pytest.fixture(scope="module")
def saved_formats(tmp_path_factory) -> dict[str, bytes]:
    """A small checkpoint's bytes (weights, metadata, pickled args) in torch.save's zip and legacy (pre-1.6) formats."""
    folder = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    checkpoint = {"model": {"a.weight": torch.randn(4, 4), "b.bias": torch.zeros(3)}, "model_name": "convnext_atto",
                  "epoch": 3, "args": argparse.Namespace(lr=0.1)}
    torch.save(checkpoint, folder / "zip.pth")
    torch.save(checkpoint, folder / "legacy.pth", _use_new_zipfile_serialization=False)
    return {name: (folder / f"{name}.pth").read_bytes() for name in ("zip", "legacy")}


@pytest.mark.parametrize("file_format", ["zip", "legacy"])
def test_a_checkpoint_cut_off_anywhere_is_a_checkpoint_error_naming_the_file(saved_formats, tmp_path, file_format):
    """A cut-off legacy file once crashed the reader (IndexError on EOFError's empty message, the unpickler's own
    IndexError or struct.error): every cut point is a CheckpointError that says the file is damaged or truncated."""
    data = saved_formats[file_format]
    cuts = [1, 2, 10, 50, 100, 300] + [len(data) * i // 16 for i in range(2, 16)] + [len(data) - 10, len(data) - 1]
    path = tmp_path / "cut.pth"
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="damaged or truncated|truncated or not a torch.save file") as error:
            read_checkpoint(path)
        assert str(path) in str(error.value), cut


@pytest.mark.parametrize("file_format", ["zip", "legacy"])
def test_a_checkpoint_with_damaged_bytes_is_read_or_refused_never_a_crash(saved_formats, tmp_path, file_format):
    """Bytes flipped in the pickled part (a zip's data.pkl, a legacy file's head): the unpickler raised KeyError,
    IndexError, TypeError, struct.error and the legacy loader AssertionError, each a traceback in the CLIs."""
    data = saved_formats[file_format]
    start = data.find(b"\x80\x02", data.find(b"data.pkl")) if file_format == "zip" else 0
    rng = random.Random(0)
    path = tmp_path / "damaged.pth"
    for _ in range(300):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            damaged[start + rng.randrange(600)] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            read_checkpoint(path)  # a flip in a string or a number may still read: the sha256 sidecar catches those
        except CheckpointError:
            pass


def test_a_pickle_no_writer_makes_is_called_damaged_and_real_code_is_still_called_code(saved_formats, tmp_path):
    """The weights-only unpickler refuses both: an opcode that does not exist or a GLOBAL that names no Python object
    is damage (delete and copy again), a GLOBAL naming a real function is a file holding code."""
    data = saved_formats["zip"]
    start = data.find(b"\x80\x02", data.find(b"data.pkl"))
    path = tmp_path / "damaged.pth"
    path.write_bytes(data[:start + 2] + b"\xff" + data[start + 3:])  # opcode 0xff: "Unsupported operand 255"
    with pytest.raises(CheckpointError, match="is damaged or truncated .*Unsupported operand"):
        read_checkpoint(path)
    rebuild = data.find(b"torch._utils")
    path.write_bytes(data[:rebuild] + b"}q (X" + data[rebuild + 5:])  # the name of a GLOBAL garbled
    with pytest.raises(CheckpointError, match="is damaged or truncated"):
        read_checkpoint(path)

    for protocol in (4, 5):  # intact, but in opcodes (FRAME...) the weights-only loader does not read
        torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "new.pth", pickle_protocol=protocol)
        with pytest.raises(CheckpointError, match="uses pickle opcode FRAME .*torch.save.s default protocol"):
            read_checkpoint(tmp_path / "new.pth")

    class Code:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"model": Code()}, tmp_path / "code.pth")
    with pytest.raises(CheckpointError, match="possibly code"):
        read_checkpoint(tmp_path / "code.pth")


def test_a_zip_whose_end_record_names_other_disks_is_a_checkpoint_error(saved_formats, tmp_path):
    damaged = bytearray(saved_formats["zip"])
    locator = damaged.rfind(b"PK\x06\x07")  # zip64 end-of-central-directory locator: total number of disks
    damaged[locator + 16] = 2  # zipfile.is_zipfile raised BadZipFile ("zipfiles that span multiple disks")
    path = tmp_path / "disks.pth"
    path.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="truncated or not a torch.save file"):
        read_checkpoint(path)
