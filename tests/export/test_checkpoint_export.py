"""A project checkpoint exports with its own model name, kwargs, data config and class names (via the CLI)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import convnext_serve
import model
from export.__main__ import main
from export.source import load_source
from runtime.repository import ModelRepository
from tests.training.test_checkpoint_integrity import WritesAMarker
from training.checkpoint import save_atomic

CLASS_NAMES = ["zero", "one", "two"]
DATA_CONFIG = {"input_size": 32, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
               "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def project_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    net = model.create_model("convnext_atto", num_classes=3, activation="relu").eval()
    # Gammas near 1, as training leaves them: at their 1e-6 init the ReLU vs GELU logits differ by 4e-7, far inside
    # the comparison's 1e-4 (now 0.22), and an export that redrew a checkpoint's gammas would match it too.
    model.draw_layer_scales(net)
    path = tmp_path_factory.mktemp("run") / "checkpoint_best.pth"
    torch.save({"model": net.state_dict(), "model_name": "convnext_atto",
                "model_kwargs": {"num_classes": 3, "activation": "relu", "drop_path_rate": 0.1},
                "data_config": DATA_CONFIG, "class_names": CLASS_NAMES, "epoch": 3}, path)
    return path, net


def test_project_checkpoint_exports_with_its_metadata(project_checkpoint, tmp_path, real_photos, capsys):
    path, net = project_checkpoint
    code = main(["onnx", "--checkpoint", str(path), "--name", "digits", "--repository", str(tmp_path),
                 "--verify-images", str(real_photos[0].parent)])
    assert code == 0, capsys.readouterr().err
    version = ModelRepository(tmp_path).load("digits")
    m = version.manifest
    assert (m.architecture, m.activation, m.num_classes, m.labels) == ("convnext_atto", "relu", 3, tuple(CLASS_NAMES))
    assert (m.preprocess.crop_px, m.preprocess.resize_px, m.preprocess.interpolation) == (32, 32, "bilinear")
    assert m.preprocess.mean == (0.5, 0.5, 0.5) and m.source.format == "project"
    assert m.source.checkpoint == "checkpoint_best.pth" and len(m.source.sha256) == 64
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(version.artifact_path(m.find("onnx", "fp32"))))
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, atol=1e-4, rtol=1e-4)
    assert f"wrote {tmp_path / 'digits' / '1'}\n" in capsys.readouterr().out  # the CLI names the version it wrote


def test_model_that_contradicts_the_checkpoint_is_refused(project_checkpoint, tmp_path, capsys):
    path, _ = project_checkpoint
    code = main(["onnx", "--model", "convnext_tiny", "--checkpoint", str(path), "--name", "x",
                 "--repository", str(tmp_path)])
    assert code == 1
    assert "holds convnext_atto" in capsys.readouterr().err
    assert ModelRepository(tmp_path).models() == []


def test_an_activation_other_than_the_checkpoints_is_refused(project_checkpoint, tmp_path, capsys):
    """Its weights were trained under ReLU: running them under GELU changes every output, and the parity check cannot
    see it (the PyTorch reference is built with the same swapped activation)."""
    path, _ = project_checkpoint
    code = main(["onnx", "--checkpoint", str(path), "--activation", "gelu", "--name", "x",
                 "--repository", str(tmp_path)])
    assert code == 1
    assert "trained with relu; --activation gelu" in capsys.readouterr().err
    assert ModelRepository(tmp_path).models() == []


def test_list_shows_versions_and_parity(exported, capsys):
    assert main(["list", "--repository", str(exported.path.parent.parent)]) == 0
    out = capsys.readouterr().out
    assert "atto/1: convnext_atto" in out and "model.int8.onnx" in out and "(6 real)" in out


def test_ema_flag_exports_the_ema_weights_and_records_it(tmp_path, capsys):
    torch.manual_seed(2)
    trained = model.create_model("convnext_atto", num_classes=3).eval()
    ema = model.create_model("convnext_atto", num_classes=3).eval()  # other random weights: a visible difference
    for net in (trained, ema):  # gammas near 1 (the project checkpoint's reason): the comparison sees the blocks
        model.draw_layer_scales(net)
    path = tmp_path / "checkpoint_last.pth"
    torch.save({"model": trained.state_dict(), "model_ema": ema.state_dict(), "model_name": "convnext_atto",
                "model_kwargs": {"num_classes": 3}, "data_config": DATA_CONFIG, "class_names": CLASS_NAMES}, path)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for flag, net, weights in (([], trained, "model"), (["--ema"], ema, "ema")):
        name = f"digits_{weights}"
        assert main(["onnx", "--checkpoint", str(path), "--name", name, "--repository", str(tmp_path / "repo"),
                     *flag]) == 0, capsys.readouterr().err
        version = ModelRepository(tmp_path / "repo").load(name)
        assert version.manifest.source.weights == weights
        session = ort.InferenceSession(str(version.artifact_path(version.manifest.find("onnx", "fp32"))))
        with torch.no_grad():
            np.testing.assert_allclose(session.run(None, {"input": x})[0], net(torch.from_numpy(x)).numpy(),
                                       atol=1e-4, rtol=1e-4)


def test_convnext_serve_ema_serves_the_ema_weights_under_the_run_folders_name(tmp_path, monkeypatch):
    """The real export through `convnext serve --checkpoint runs/demo/checkpoint_best_ema.pth --ema`: the version is
    named after the run, records the EMA weights and computes the EMA network (the service's exec is recorded)."""
    import os

    torch.manual_seed(3)
    trained = model.create_model("convnext_atto", num_classes=3).eval()
    ema = model.create_model("convnext_atto", num_classes=3).eval()
    for net in (trained, ema):  # gammas near 1, as training leaves them: at 1e-6 the blocks would go unseen
        model.draw_layer_scales(net)
    path = tmp_path / "runs" / "demo" / "checkpoint_best_ema.pth"
    path.parent.mkdir(parents=True)
    torch.save({"model": trained.state_dict(), "model_ema": ema.state_dict(), "model_name": "convnext_atto",
                "model_kwargs": {"num_classes": 3}, "data_config": DATA_CONFIG, "class_names": CLASS_NAMES}, path)
    execs = []
    monkeypatch.setattr(os, "execve", lambda executable, argv, env: execs.append(argv))
    convnext_serve.main(["--checkpoint", str(path), "--ema", "--repository", str(tmp_path / "repo"), "--quiet",
                         "--port", "0", "--grpc-port", "0"])
    assert execs and execs[0][execs[0].index("--model") + 1] == "demo-ema"
    version = ModelRepository(tmp_path / "repo").load("demo-ema")
    assert version.manifest.source.weights == "ema"
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(str(version.artifact_path(version.manifest.find("onnx", "fp32"))))
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x})[0], ema(torch.from_numpy(x)).numpy(), atol=1e-4,
                                   rtol=1e-4)


def test_the_best_ema_checkpoint_exported_without_ema_warns_that_it_takes_the_trained_weights(tmp_path, caplog):
    net = model.create_model("convnext_atto", num_classes=3)
    kept = {"model": net.state_dict(), "model_ema": net.state_dict(), "model_name": "convnext_atto",
            "model_kwargs": {"num_classes": 3}, "data_config": DATA_CONFIG, "class_names": CLASS_NAMES}
    for name in ("checkpoint_best_ema.pth", "checkpoint_best.pth"):
        torch.save(kept, tmp_path / name)
    with caplog.at_level("WARNING", logger="export.source"):
        load_source(None, tmp_path / "checkpoint_best_ema.pth", use_ema=True)
        load_source(None, tmp_path / "checkpoint_best.pth")
        assert "pass --ema" not in caplog.text
        load_source(None, tmp_path / "checkpoint_best_ema.pth")
    assert "checkpoint_best_ema.pth was kept for its EMA weights" in caplog.text and "pass --ema" in caplog.text


def test_ema_flag_on_a_checkpoint_without_ema_weights_is_refused(project_checkpoint, tmp_path, capsys):
    path, _ = project_checkpoint
    assert main(["onnx", "--checkpoint", str(path), "--name", "x", "--repository", str(tmp_path), "--ema"]) == 1
    assert "no 'model_ema' entry" in capsys.readouterr().err


@pytest.fixture()
def corrupted_checkpoint(project_checkpoint, tmp_path):
    """The project checkpoint saved with its sha256 sidecar, then one byte of its tensor data flipped."""
    _, net = project_checkpoint
    path = tmp_path / "checkpoint_last.pth"
    save_atomic({"model": net.state_dict(), "model_name": "convnext_atto", "model_kwargs": {"num_classes": 3},
                 "data_config": DATA_CONFIG, "class_names": CLASS_NAMES}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # still a valid zip: only the sidecar's hash can tell
    path.write_bytes(bytes(data))
    return path


def test_export_refuses_a_checkpoint_that_does_not_match_its_sidecar(corrupted_checkpoint, tmp_path, capsys):
    code = main(["onnx", "--checkpoint", str(corrupted_checkpoint), "--name", "x", "--repository", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("python -m export: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(corrupted_checkpoint) in err and "does not match its recorded sha256" in err
    assert ModelRepository(tmp_path).models() == []


@pytest.mark.parametrize("damage", ["truncated", "code-carrying"])
def test_export_refuses_a_truncated_or_code_carrying_checkpoint_without_sidecar(project_checkpoint, tmp_path, capsys,
                                                                                 damage):
    """No sidecar to check against (an older run, a downloaded file): what the file holds is refused, and a pickled
    payload is never run (torch.load(..., weights_only=True) only)."""
    source, net = project_checkpoint
    path, marker = tmp_path / "checkpoint_last.pth", tmp_path / "marker"
    if damage == "truncated":
        path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    else:
        torch.save({"model": net.state_dict(), "model_name": "convnext_atto", "model_kwargs": {"num_classes": 3},
                    "data_config": DATA_CONFIG, "class_names": CLASS_NAMES, "hook": WritesAMarker(marker)}, path)
    code = main(["onnx", "--checkpoint", str(path), "--name", "x", "--repository", str(tmp_path / "models")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("python -m export: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(path) in err and ("truncated" if damage == "truncated" else "refused unexecuted") in err
    assert not marker.exists()  # the payload (`touch marker` when unpickled) never ran
    assert ModelRepository(tmp_path / "models").models() == []


def test_convnext_serve_refuses_a_checkpoint_that_does_not_match_its_sidecar(corrupted_checkpoint, tmp_path, capsys):
    code = convnext_serve.main(["--checkpoint", str(corrupted_checkpoint), "--model", "convnext_atto",
                                "--repository", str(tmp_path / "repo"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("convnext serve: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert str(corrupted_checkpoint) in err and "does not match its recorded sha256" in err


def test_a_checkpoint_whose_head_does_not_fit_is_refused_not_exported_with_a_random_head(tmp_path, capsys):
    """An official-style checkpoint (no metadata) of 21841 classes exported as the default 1000: fine-tuning
    re-initialises such a head, an export must not (it would publish a random classifier as ImageNet-1K)."""
    torch.manual_seed(3)
    path = tmp_path / "convnext_atto_22k_224.pth"
    torch.save({"model": model.create_model("convnext_atto", num_classes=21841).state_dict()}, path)
    code = main(["onnx", "--model", "convnext_atto", "--checkpoint", str(path), "--name", "x", "--input-size", "32",
                 "--repository", str(tmp_path / "models")])
    assert code == 1
    assert "pass --num-classes with the checkpoint's class count" in capsys.readouterr().err
    assert ModelRepository(tmp_path / "models").models() == []
