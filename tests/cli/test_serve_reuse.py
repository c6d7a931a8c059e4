"""`convnext serve --checkpoint FILE` reuses an earlier export of FILE only when it has every precision --precisions
asks for; otherwise it exports a new version (the service could not start at a precision the version lacks).

The export itself is a stand-in that writes a version as the real one would name it (the real export is covered in
tests/export); the reuse decision, the repository and the command line are the real ones. Nothing is served: the
exec of the service is recorded instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime
import pytest

import convnext_serve
from convnext_files import sha256_file
from export.onnx import ONNX_FILES
from model.timm_pretrained import get_timm_pretrained
from runtime.repository import ModelRepository, Source, describe_file
from tests.export.repository_write_worker import fill
from tests.service.conftest import free_port

NAME = "atto"  # repository_name("atto.pth")


def write_export(root: Path, checkpoint: Path, precisions: tuple[str, ...], weights: str = "model",
                 timm_name: str | None = None) -> int:
    """A version of NAME exported from `checkpoint`, with one (placeholder) ONNX file per precision; with a timm name,
    the tag's dataset and evaluation crop, as the real export records them."""
    tag = get_timm_pretrained(timm_name) if timm_name is not None else None
    source = Source(checkpoint=checkpoint.name, sha256=sha256_file(checkpoint), format="timm" if tag else "official",
                    weights=weights, dataset=tag.dataset if tag else None)
    with ModelRepository(root).new_version(NAME) as staged:
        fill(staged, "fp32 weights")
        for precision in precisions[1:]:
            (staged.path / ONNX_FILES[precision]).write_text(f"{precision} weights")
        artifacts = tuple(describe_file(staged.path, ONNX_FILES[p], format="onnx", precision=p) for p in precisions)
        assert staged.manifest is not None
        update = {"name": NAME, "source": source, "artifacts": artifacts}
        if tag is not None:
            size = tag.input_size_px
            update["preprocess"] = staged.manifest.preprocess.model_copy(update={
                "crop_pct": tag.crop_pct, "crop_px": size, "resize_px": int(size / tag.crop_pct)})
            update["input"] = staged.manifest.input.model_copy(update={"height": size, "width": size})
        staged.manifest = staged.manifest.model_copy(update=update)
    return staged.version


@pytest.fixture()
def serve(tmp_path, monkeypatch):
    """convnext serve --checkpoint atto.pth ... -> (the version it serves, the precisions each export was asked for)."""
    checkpoint = tmp_path / "atto.pth"
    checkpoint.write_bytes(b"the checkpoint's bytes")
    root = tmp_path / "models"
    exports: list[tuple[str, ...]] = []
    execs: list[tuple[list[str], dict[str, str]]] = []

    def stand_in_export(repository_root, name, model_name, path, precisions, use_ema=False, timm_name=None):
        exports.append(tuple(precisions))
        number = write_export(Path(repository_root), Path(path), tuple(precisions), "ema" if use_ema else "model",
                              timm_name)
        return ModelRepository(repository_root).load(name, number)

    monkeypatch.setattr(convnext_serve, "export_onnx_version", stand_in_export)
    monkeypatch.setattr(os, "execve", lambda executable, argv, env: execs.append((argv, env)))

    def run(*args: str) -> int | None:
        """The version passed to the service (--model-version), None when none is."""
        convnext_serve.main(["--checkpoint", str(checkpoint), "--model", "convnext_atto", "--repository", str(root),
                             "--quiet", "--host", "127.0.0.1", "--port", str(free_port()), "--grpc-port", "0", *args])
        argv, env = execs[-1]
        assert argv[argv.index("--model") + 1] == NAME
        assert not set(convnext_serve.SERVED_MODEL_VARIABLES) & set(env)  # the service reads neither variable
        return int(argv[argv.index("--model-version") + 1]) if "--model-version" in argv else None

    return run, exports, checkpoint, root


def test_an_export_without_a_precision_asked_for_is_not_reused(serve):
    run, exports, checkpoint, root = serve
    write_export(root, checkpoint, ("fp32",))  # an earlier `convnext serve --checkpoint atto.pth`: fp32 only
    assert run("--precisions", "fp32,fp16", "--precision", "fp16") == 2
    assert exports == [("fp32", "fp16")]
    assert run("--precisions", "fp32,fp16", "--precision", "fp16") == 2  # now it has both: reused
    assert run() == 2  # fp32 alone: the newest version of the file has it
    assert exports == [("fp32", "fp16")]


def test_an_older_export_with_every_precision_is_reused(serve):
    run, exports, checkpoint, root = serve
    write_export(root, checkpoint, ("fp32", "fp16", "int8"))
    write_export(root, checkpoint, ("fp32",))
    assert run("--precisions", "fp32,int8") == 1
    assert exports == []


def test_the_precision_served_is_exported_without_being_listed(serve):
    """`--precision fp16` alone exports fp32 (the reference) and fp16; OpenVINO's bf16 runs the fp32 file, so it adds
    nothing; an engine that cannot run the precision is refused before any export."""
    run, exports, checkpoint, root = serve
    assert run("--precision", "fp16") == 1
    assert exports == [("fp32", "fp16")]
    assert run("--engine", "openvino", "--precision", "bf16") == 1  # version 1 has fp32: reused
    assert exports == [("fp32", "fp16")]


def test_the_ema_weights_are_their_own_export(serve):
    """--ema serves the checkpoint's EMA weights: an export of its trained weights is not reused for it, nor the other
    way round."""
    run, exports, checkpoint, root = serve
    assert run() == 1
    assert run("--ema") == 2
    assert run("--ema") == 2 and run() == 1
    assert exports == [("fp32",), ("fp32",)]
    assert ModelRepository(root).load(NAME, 2).manifest.source.weights == "ema"


def test_a_timm_tag_is_reused_only_for_the_same_tags_transform(serve):
    """--timm-name sets the evaluation transform (crop) and dataset: an export without it, or under a tag with
    another crop, is not what the service should serve for it."""
    run, exports, checkpoint, root = serve
    assert run() == 1
    assert run("--timm-name", "convnext_tiny.fb_in1k") == 2
    assert run("--timm-name", "convnext_tiny.fb_in1k") == 2
    assert run("--timm-name", "convnext_tiny.fb_in22k_ft_in1k") == 3  # the same crop, other weights' dataset
    assert run("--timm-name", "convnext_tiny.fb_in22k_ft_in1k_384") == 4  # another crop
    assert run() == 4 and len(exports) == 4  # no tag named: the newest export of the file's weights, as before


@pytest.mark.parametrize(("path", "name"), [
    ("runs/t/checkpoint_best.pth", "t"), ("runs/t/checkpoint_best_ema.pth", "t-ema"),
    ("runs/in1k_T/checkpoint_last.pth", "in1k-t-last"),
    ("weights/convnext_tiny_1k_224_ema.pth", "convnext-tiny-1k-224-ema"), ("my_model.pth", "my-model")])
def test_a_training_runs_checkpoint_is_named_after_its_run_folder(path, name):
    """Every run writes checkpoint_best.pth: named by the file, two runs would be two versions of one model, and a
    watcher serving one would switch to the other's weights."""
    assert convnext_serve.default_checkpoint_name(Path(path)) == name


def test_model_ema_and_timm_name_are_refused_with_an_official_name(capsys):
    for flag in (["--ema"], ["--timm-name", "convnext_atto.d2_in1k"], ["--model", "convnext_small"]):
        with pytest.raises(SystemExit) as exit_:
            convnext_serve.main(["--pretrained", "convnext_tiny_1k_224_ema", *flag])
        assert exit_.value.code == 2
        assert "say what a --checkpoint holds" in capsys.readouterr().err


BAD_ARGUMENTS = [
    (["--name", "Bad_Name"], "argument --name: 'Bad_Name' is not a repository name: lower-case letters"),
    (["--precisions", "fp32,fp8"], "argument --precisions: unknown precision fp8; choose from fp32,fp16,bf16,int8"),
    (["--precisions", "fp16"], "'fp16' leaves out fp32, the reference every other precision is verified against; "
                               "pass --precisions fp32,fp16"),
    (["--model", "convnext_nosuch"], "--model: unknown model 'convnext_nosuch'; choose one of: convnext_atto"),
]


@pytest.mark.parametrize(("flags", "refusal"), BAD_ARGUMENTS, ids=[" ".join(f) for f, _ in BAD_ARGUMENTS])
def test_an_argument_the_export_would_refuse_is_refused_before_the_checkpoint_is_read(serve, capsys, flags, refusal):
    """With the export's own checks, at parsing (status 2): not once the checkpoint is hashed, downloaded or built."""
    run, exports, checkpoint, root = serve
    with pytest.raises(SystemExit) as exit_:
        convnext_serve.main(["--checkpoint", str(checkpoint), "--repository", str(root), "--quiet", "--port",
                             str(free_port()), "--grpc-port", "0", *flags])
    assert exit_.value.code == 2 and exports == []
    assert refusal in capsys.readouterr().err


def test_a_bad_name_is_refused_before_the_download(tmp_path, capsys):
    """A mirror where nothing listens: the download, had it been tried, would fail with status 1."""
    mirror = f"http://127.0.0.1:{free_port()}/"  # outside the kernel's own picks: nothing listens there
    with pytest.raises(SystemExit) as exit_:
        convnext_serve.main(["--pretrained", "convnext_tiny_1k_224_ema", "--name", "Bad_Name", "--mirror", mirror,
                             "--cache-dir", str(tmp_path / "cache"), "--repository", str(tmp_path / "models"),
                             "--port", str(free_port()), "--grpc-port", "0"])
    assert exit_.value.code == 2
    assert "argument --name: 'Bad_Name' is not a repository name" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "models").exists()


def test_an_unknown_timm_name_is_refused_at_parsing_before_the_export(serve, capsys):
    run, exports, checkpoint, root = serve
    with pytest.raises(SystemExit) as exit_:
        convnext_serve.main(["--checkpoint", str(checkpoint), "--repository", str(root), "--quiet",
                             "--port", str(free_port()), "--grpc-port", "0", "--timm-name", "convnext_atto.bogus"])
    assert exit_.value.code == 2 and exports == []
    assert "error: --timm-name: 'convnext_atto.bogus' is not a timm ConvNeXt pretrained tag" in capsys.readouterr().err


def test_an_unknown_pretrained_name_is_refused_at_parsing_before_the_download(tmp_path, capsys):
    """The mirror's port has nothing listening: a download, had one been tried, would end with status 1."""
    with pytest.raises(SystemExit) as exit_:
        convnext_serve.main(["--pretrained", "convnext_nosuch", "--mirror", f"http://127.0.0.1:{free_port()}/",
                             "--cache-dir", str(tmp_path / "cache"), "--repository", str(tmp_path / "models"),
                             "--port", str(free_port()), "--grpc-port", "0"])
    assert exit_.value.code == 2
    assert "error: --pretrained: unknown pretrained checkpoint 'convnext_nosuch'; choose one of: " in \
        capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "models").exists()


REFUSED_BEFORE_THE_EXPORT = [
    ("openvino", "fp16", [], "the OpenVINO engine runs precision fp32/bf16/int8"),
    ("openvino", "fp32", ["--provider", "cuda"], "the OpenVINO engine runs on the CPU, not provider 'cuda'"),
    ("openvino", "fp32", ["--ort-streams", "2"], "--ort-streams 2 is ONNX Runtime's"),
    ("auto", "fp16", [], "engine auto chooses between fp32 CPU engines, not provider 'cpu' at precision 'fp16'"),
    ("auto", "fp32", ["--provider", "cuda"], "engine auto chooses between fp32 CPU engines, not provider 'cuda'"),
    ("onnxruntime", "fp32", ["--provider", "cuda"], "CUDAExecutionProvider is not in this onnxruntime build"),
    ("onnxruntime", "fp32", ["--provider", "cuda", "--ort-streams", "2"], "ONNX Runtime streams must be 1"),
    ("tensorrt", "int8", [], "--engine tensorrt builds fp32/fp16/bf16 engines, not int8"),
    ("tensorrt", "fp16", ["--max-batch-size", "8192"], "--engine tensorrt --max-batch-size 8192"),
    ("onnxruntime", "bf16", [], "ONNX Runtime's CPU provider has no bfloat16 Conv kernel"),  # not after the bf16 export
    ("tensorrt", "fp16", [], "--engine tensorrt: TensorRT is not installed"),  # not on this machine
]


@pytest.mark.parametrize(("engine", "precision", "flags", "refusal"), REFUSED_BEFORE_THE_EXPORT,
                         ids=[" ".join([e, p, *f]) for e, p, f, _ in REFUSED_BEFORE_THE_EXPORT])
def test_settings_the_engine_refuses_are_refused_before_the_export(serve, capsys, monkeypatch, engine, precision, flags,
                                                                   refusal):
    run, exports, checkpoint, root = serve
    # An onnxruntime build without the CUDA provider (onnxruntime-gpu lists it even without a GPU).
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    code = convnext_serve.main(["--checkpoint", str(checkpoint), "--model", "convnext_atto", "--repository", str(root),
                                "--quiet", "--port", str(free_port()), "--grpc-port", "0", "--engine", engine,
                                "--precision", precision, *flags])
    assert code == 1 and exports == []
    assert refusal in capsys.readouterr().err



def test_with_a_watcher_the_newest_version_is_served_unpinned_and_an_older_one_pinned(serve, tmp_path, monkeypatch):
    """--watch-interval-s: the version exported is the newest, so the service starts on the newest without a pinned
    version and its watcher follows later exports; a CONVNEXT_VERSION left in the environment does not pin it either.
    An older version found for the file (a newer one of the name exported from another file) is pinned, as without a
    watcher: the command serves what it exported or found."""
    run, exports, checkpoint, root = serve
    monkeypatch.setenv("CONVNEXT_VERSION", "1")
    assert run("--watch-interval-s", "5") is None
    assert run() == 1  # no watcher: pinned
    other = tmp_path / "other.pth"
    other.write_bytes(b"another checkpoint's bytes")
    assert write_export(root, other, ("fp32",)) == 2
    assert run("--watch-interval-s", "5") == 1
    assert exports == [("fp32",)]
