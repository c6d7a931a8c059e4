"""The container entrypoint on the host: download, export, serve on CPU (a second prepare skips it all); with GPU
settings on this GPU-less machine, the start-up host check's failure (stay up not ready, or exit 78)."""
from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
from compose_yaml import ROOT
from entrypoint_settings import ENTRYPOINT, load_entrypoint, settings_from
from threaded_server import serving

from tests.service.conftest import free_port

OFFICIAL_FILE = "convnext_tiny_1k_224_ema.pth"
OTHER_OFFICIAL_FILE = "convnext_tiny_22k_1k_224.pth"  # the same architecture: served under the same model name


class CountingMirror(http.server.ThreadingHTTPServer):
    """A local stand-in for dl.fbaipublicfiles.com that counts the files it hands out."""

    def __init__(self, folder: Path):
        self.downloads: list[str] = []
        handler = functools.partial(_Handler, directory=str(folder))
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.downloads.append(self.path)
        super().do_GET()

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """An official-format checkpoint ({"model": state_dict}, 1000 classes) of a small ConvNeXt, served over HTTP."""
    import torch

    from model import create_model

    folder = tmp_path_factory.mktemp("mirror")
    torch.save({"model": create_model("convnext_atto").state_dict()}, folder / OFFICIAL_FILE)
    torch.manual_seed(1)
    torch.save({"model": create_model("convnext_atto").state_dict()}, folder / OTHER_OFFICIAL_FILE)
    server = CountingMirror(folder)
    with serving(server):
        yield server


def entrypoint_env(repository: Path, mirror: CountingMirror, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVNEXT_")}
    env.update({
        "CONVNEXT_REPOSITORY": str(repository),
        "CONVNEXT_MODEL": "convnext_tiny",
        "CONVNEXT_ARCHITECTURE": "convnext_atto",  # the stand-in checkpoint's architecture (ConvNeXt-T in production)
        "CONVNEXT_WEIGHTS_BASE_URL": mirror.base_url,
        "CONVNEXT_EXPORT_PRECISIONS": "fp32",
        "CONVNEXT_EXPORT_ARGS": "--input-size 32",
        "CONVNEXT_HOST": "127.0.0.1",
        "CONVNEXT_PORT": str(port),
        "CONVNEXT_GRPC_PORT": "0",  # no fixed port: tests run side by side
        "CONVNEXT_ENGINE": "onnxruntime",
        "CONVNEXT_PROVIDER": "cpu",
        "CONVNEXT_PRECISION": "fp32",
        "CONVNEXT_INTRA_OP_THREADS": "1",
        "CONVNEXT_PREPROCESS_WORKERS": "1",
        "CONVNEXT_WARMUP_RUNS": "0",
    })
    return env


def start_and_wait_ready(env: dict[str, str], log: Path, deadline_s: float = 120) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, str(ENTRYPOINT), "all"], env=env, cwd=ROOT,
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{env['CONVNEXT_PORT']}/readyz"
    stop_at = time.monotonic() + deadline_s
    while time.monotonic() < stop_at:
        if process.poll() is not None:
            raise AssertionError(f"the entrypoint exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"/readyz never answered 200 within {deadline_s} s:\n{log.read_text()}")


def stop_cleanly(process: subprocess.Popen, log: Path) -> None:
    """SIGTERM, as tini forwards it on `docker stop`: the exec'd service drains and shuts its lifespan down."""
    process.send_signal(signal.SIGTERM)
    try:
        returncode = process.wait(timeout=60)
    except subprocess.TimeoutExpired:  # a shutdown that hangs fails the test, and leaves no server behind
        process.kill()
        process.wait()
        raise
    # uvicorn re-raises the signal it handled after a graceful shutdown, so -SIGTERM is a clean exit too.
    assert returncode in (0, -signal.SIGTERM), log.read_text()
    assert "Application shutdown complete" in log.read_text()


def test_entrypoint_prepares_the_model_once_then_serves(tmp_path, mirror, real_photos):
    repository = tmp_path / "models"
    env = entrypoint_env(repository, mirror, free_port())

    first = start_and_wait_ready(env, tmp_path / "first.log")
    try:
        assert mirror.downloads == [f"/{OFFICIAL_FILE}"]
        response = httpx.post(f"http://127.0.0.1:{env['CONVNEXT_PORT']}/classify",
                              files=[("files", (real_photos[0].name, real_photos[0].read_bytes()))], timeout=30)
        assert response.status_code == 200
        assert response.json()["model"] == {"name": "convnext_tiny", "version": 1}
        health = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")], capture_output=True,
                                text=True, timeout=30, env={**os.environ, "CONVNEXT_PORT": env["CONVNEXT_PORT"]})
        assert health.returncode == 0, health.stderr  # Docker's HEALTHCHECK: the real service's /healthz is "ok"
    finally:
        stop_cleanly(first, tmp_path / "first.log")
    manifest = (repository / "convnext_tiny" / "1" / "manifest.json").read_text()
    assert '"architecture": "convnext_atto"' in manifest and '"format": "official"' in manifest

    # The next `docker compose up` runs the prepare container again: it must find the model and fetch nothing.
    second = subprocess.run([sys.executable, str(ENTRYPOINT), "prepare"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "already in" in second.stdout
    assert mirror.downloads == [f"/{OFFICIAL_FILE}"]
    assert [p.name for p in (repository / "convnext_tiny").iterdir() if not p.name.startswith(".")] == ["1"]


def run_prepare(env: dict[str, str], **variables: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ENTRYPOINT), "prepare"], env={**env, **variables}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def newest_source(repository: Path, name: str) -> tuple[int, dict]:
    from runtime.repository import ModelRepository

    newest = ModelRepository(repository).load(name, verify_files=False).manifest
    return newest.version, newest.source.model_dump()


def test_another_official_checkpoint_of_the_same_architecture_is_exported_as_a_new_version(tmp_path, mirror):
    """convnext_tiny_1k_224_ema, _22k_1k_224 (and _22k_224, 21841 classes; _22k_1k_384, 384 px) are all served as
    convnext_tiny: a prepare that found the name and skipped kept the old weights serving after CONVNEXT_PRETRAINED
    changed. The newest version's checkpoint file decides; the same file again is skipped, as before."""
    repository = tmp_path / "models"
    env = entrypoint_env(repository, mirror, 0)
    first = run_prepare(env)
    assert first.returncode == 0, first.stdout + first.stderr
    version, source = newest_source(repository, "convnext_tiny")
    assert (version, source["checkpoint"], source["dataset"]) == (1, OFFICIAL_FILE, "ImageNet-1K")
    changed = run_prepare(env, CONVNEXT_PRETRAINED=OTHER_OFFICIAL_FILE.removesuffix(".pth"))
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert (f"prepare: convnext_tiny version 1 in {repository} was exported from {OFFICIAL_FILE}, not "
            f"{OTHER_OFFICIAL_FILE}: exporting {OTHER_OFFICIAL_FILE} as a new version") in changed.stdout
    version, source = newest_source(repository, "convnext_tiny")
    assert (version, source["checkpoint"], source["dataset"]) == (
        2, OTHER_OFFICIAL_FILE, "ImageNet-22K, fine-tuned on ImageNet-1K")
    again = run_prepare(env, CONVNEXT_PRETRAINED=OTHER_OFFICIAL_FILE.removesuffix(".pth"))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (f"prepare: convnext_tiny is already in {repository} (version 2, from {OTHER_OFFICIAL_FILE}); skipping"
            in again.stdout)
    assert newest_source(repository, "convnext_tiny")[0] == 2
    assert mirror.downloads.count(f"/{OTHER_OFFICIAL_FILE}") == 1


def version_exported_from(tiny_repository: Path, repository: Path, name: str, checkpoint: str | None,
                          version: int = 1, sha256: str | None = None) -> None:
    """A copy of the tiny model as `name` `version`, its manifest saying it was exported from `checkpoint` (of that
    sha256, when given)."""
    import shutil

    shutil.copytree(tiny_repository / "tiny" / "1", repository / name / str(version))
    manifest_path = repository / name / str(version) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(name=name, version=version)
    manifest["source"].update(checkpoint=checkpoint, sha256=sha256)
    manifest_path.write_text(json.dumps(manifest))


def test_a_version_exported_by_hand_after_the_prepared_one_is_not_exported_over(tmp_path, tiny_repository,
                                                                                monkeypatch, capsys):
    """An operator's fine-tune exported by hand into the deploy's model name as version 2: the next replica's prepare
    (a scale-up, a reschedule) compared only the newest version's file with the variables' and exported the official
    file again as version 3, so replicas started before served the fine-tune and those after the official weights.
    A version exported from the variables' file exists: nothing is exported, the newest is served, and the line says
    how to serve the other."""
    entrypoint = load_entrypoint()
    repository = tmp_path / "models"
    version_exported_from(tiny_repository, repository, "convnext_tiny", OFFICIAL_FILE, version=1)
    version_exported_from(tiny_repository, repository, "convnext_tiny", "my_finetune_best.pth", version=2)
    settings = settings_from(entrypoint, monkeypatch, {"CONVNEXT_REPOSITORY": str(repository),
                                                        "CONVNEXT_EXPORT_PRECISIONS": "fp32"})
    monkeypatch.setattr(entrypoint, "export_model", lambda _: pytest.fail("exported over the hand-exported version"))
    assert entrypoint.prepare(settings) == 0
    assert (f"prepare: convnext_tiny version 1 in {repository} was exported from {OFFICIAL_FILE}, but version 2, "
            "from my_finetune_best.pth, is newer and is the one served; skipping (to serve version 1: "
            f"CONVNEXT_VERSION=1, or move version 2 out of {repository / 'convnext_tiny'})") in capsys.readouterr().out
    assert entrypoint.ModelRepository(repository).versions("convnext_tiny") == [1, 2]
    assert "--model-version" not in entrypoint.service_command(settings)  # the newest, unpinned, as before
    pinned = settings_from(entrypoint, monkeypatch, {"CONVNEXT_REPOSITORY": str(repository), "CONVNEXT_VERSION": "1"})
    assert pinned.service.version == 1  # the variable the line names is the service's own


def test_with_a_version_pinned_the_line_names_the_pinned_one_as_served(tmp_path, tiny_repository, monkeypatch,
                                                                      capsys):
    """CONVNEXT_VERSION=1 set, as the line above advises: every start still said version 2 "is newer and is the one
    served", and a new file's export did not say it would not be served. The pinned version is the one named."""
    entrypoint = load_entrypoint()
    repository = tmp_path / "models"
    version_exported_from(tiny_repository, repository, "convnext_tiny", OFFICIAL_FILE, version=1)
    version_exported_from(tiny_repository, repository, "convnext_tiny", "my_finetune_best.pth", version=2)
    env = {"CONVNEXT_REPOSITORY": str(repository), "CONVNEXT_EXPORT_PRECISIONS": "fp32"}
    monkeypatch.setattr(entrypoint, "export_model", lambda _: pytest.fail("exported although version 1 is there"))
    assert entrypoint.prepare(settings_from(entrypoint, monkeypatch, {**env, "CONVNEXT_VERSION": "1"})) == 0
    assert capsys.readouterr().out == (f"prepare: convnext_tiny is already in {repository} (version 1, pinned by "
                                       f"CONVNEXT_VERSION, from {OFFICIAL_FILE}); skipping\n")
    assert entrypoint.prepare(settings_from(entrypoint, monkeypatch, {
        **env, "CONVNEXT_VERSION": "2", "CONVNEXT_CHECKPOINT": "/ckpt/my_finetune_best.pth",
        "CONVNEXT_MODEL": "convnext_tiny"})) == 0
    assert "(version 2, pinned by CONVNEXT_VERSION, from my_finetune_best.pth); skipping" in capsys.readouterr().out
    assert entrypoint.prepare(settings_from(entrypoint, monkeypatch, {**env, "CONVNEXT_VERSION": "2"})) == 0
    assert (f"prepare: convnext_tiny version 1 in {repository} was exported from {OFFICIAL_FILE}, but version 2, from "
            "my_finetune_best.pth, is the one CONVNEXT_VERSION pins; skipping (to serve version 1: CONVNEXT_VERSION=1)"
            "\n") == capsys.readouterr().out
    exports = []
    monkeypatch.setattr(entrypoint, "export_model", lambda settings: exports.append(settings) or 0)
    new_file = settings_from(entrypoint, monkeypatch, {**env, "CONVNEXT_VERSION": "1",
                                                       "CONVNEXT_PRETRAINED": OTHER_OFFICIAL_FILE.removesuffix(".pth")})
    assert entrypoint.prepare(new_file) == 0 and exports == [new_file]
    assert (f"prepare: convnext_tiny version 1, pinned by CONVNEXT_VERSION, in {repository} was exported from "
            f"{OFFICIAL_FILE}, not {OTHER_OFFICIAL_FILE}: exporting {OTHER_OFFICIAL_FILE} as a new version, which is "
            "not served while CONVNEXT_VERSION=1 is set") in capsys.readouterr().out


def test_a_precision_added_to_export_precisions_exports_the_same_file_again(tmp_path, tiny_repository, monkeypatch,
                                                                            capsys):
    """CONVNEXT_EXPORT_PRECISIONS raised from fp32 to fp32,fp16 after the first prepare: a version from the file
    existed, so prepare skipped and the service had no fp16 to start on (convnext serve --precisions exported
    again). A version lacking one of the precisions is exported again, and the line says why."""
    entrypoint = load_entrypoint()
    repository = tmp_path / "models"
    version_exported_from(tiny_repository, repository, "convnext_tiny", OFFICIAL_FILE)  # fp32 only
    env = {"CONVNEXT_REPOSITORY": str(repository), "CONVNEXT_EXPORT_PRECISIONS": "fp32"}
    exports = []
    monkeypatch.setattr(entrypoint, "export_model", lambda settings: exports.append(settings) or 0)
    assert entrypoint.prepare(settings_from(entrypoint, monkeypatch, env)) == 0 and exports == []
    capsys.readouterr()
    raised = settings_from(entrypoint, monkeypatch, {**env, "CONVNEXT_EXPORT_PRECISIONS": "fp32, fp16"})
    assert entrypoint.prepare(raised) == 0 and exports == [raised]
    assert raised.export_precisions == ("fp32", "fp16")
    assert (f"prepare: convnext_tiny version 1 in {repository} was exported from {OFFICIAL_FILE}, but not in each of "
            f"CONVNEXT_EXPORT_PRECISIONS=fp32, fp16: exporting {OFFICIAL_FILE} as a new version\n"
            ) == capsys.readouterr().out


@pytest.mark.parametrize("checkpoint", ["https://host/runs/runA/checkpoint_best.pth",
                                        "/ckpt/runs/runA/checkpoint_best.pth",
                                        "file:///ckpt/runs/runA/checkpoint_best.pth"])
def test_a_runs_checkpoint_prepared_before_is_skipped_another_file_under_its_name_exported(
        checkpoint, tmp_path, tiny_repository, monkeypatch, capsys):
    """A training run's checkpoint_best.pth is served as its run folder's name (runa): prepared once, skipped after,
    as before, wherever the file is; another file named into that model (CONVNEXT_MODEL) is a new version."""
    entrypoint = load_entrypoint()
    repository = tmp_path / "models"
    version_exported_from(tiny_repository, repository, "runa", "checkpoint_best.pth")
    settings = settings_from(entrypoint, monkeypatch, {"CONVNEXT_REPOSITORY": str(repository),
                                                        "CONVNEXT_CHECKPOINT": checkpoint,
                                                        "CONVNEXT_EXPORT_PRECISIONS": "fp32"})  # the copy's
    assert settings.model_name == "runa"
    monkeypatch.setattr(entrypoint, "export_model", lambda _: pytest.fail("exported although the model was there"))
    assert entrypoint.prepare(settings) == 0
    assert "prepare: runa is already in" in capsys.readouterr().out
    exports = []
    monkeypatch.setattr(entrypoint, "export_model", lambda settings: exports.append(settings) or 0)
    other = settings_from(entrypoint, monkeypatch, {"CONVNEXT_REPOSITORY": str(repository), "CONVNEXT_MODEL": "runa",
                                                     "CONVNEXT_CHECKPOINT": checkpoint.replace("best", "last")})
    assert entrypoint.prepare(other) == 0 and exports == [other]
    assert "was exported from checkpoint_best.pth, not checkpoint_last.pth" in capsys.readouterr().out


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_a_run_trained_again_in_its_folder_is_exported_anew_by_its_bytes(as_url, tmp_path, tiny_repository,
                                                                         monkeypatch, capsys):
    """A run trained again in its folder writes new weights under the same checkpoint_best.pth: prepare compared only
    the file's name, skipped, and the service kept serving the old weights. Where the file is here (a path or a
    file:// URL), its bytes decide too: the same bytes skip, new bytes are a new version, and the line says so."""
    from convnext_files import sha256_file

    entrypoint = load_entrypoint()
    repository, checkpoint = tmp_path / "models", tmp_path / "runs" / "runA" / "checkpoint_best.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"the first training's weights")
    first = sha256_file(checkpoint)
    version_exported_from(tiny_repository, repository, "runa", "checkpoint_best.pth", sha256=first)
    settings = settings_from(entrypoint, monkeypatch, {
        "CONVNEXT_REPOSITORY": str(repository), "CONVNEXT_EXPORT_PRECISIONS": "fp32",
        "CONVNEXT_CHECKPOINT": checkpoint.as_uri() if as_url else str(checkpoint)})
    monkeypatch.setattr(entrypoint, "export_model", lambda _: pytest.fail("exported the same bytes again"))
    assert entrypoint.prepare(settings) == 0
    assert capsys.readouterr().out == (f"prepare: runa is already in {repository} (version 1, from "
                                       "checkpoint_best.pth); skipping\n")

    checkpoint.write_bytes(b"the second training's weights")  # trained again, in the same folder
    second = sha256_file(checkpoint)
    exports = []
    monkeypatch.setattr(entrypoint, "export_model", lambda settings: exports.append(settings) or 0)
    assert entrypoint.prepare(settings) == 0 and exports == [settings]
    assert capsys.readouterr().out == (
        f"prepare: runa version 1 in {repository} was exported from checkpoint_best.pth with other bytes (sha256 "
        f"{first[:12]}..., the file's now {second[:12]}...): exporting checkpoint_best.pth as a new version\n")

    version_exported_from(tiny_repository, repository, "runa", "checkpoint_best.pth", version=2, sha256=second)
    monkeypatch.setattr(entrypoint, "export_model", lambda _: pytest.fail("exported over the new version"))
    assert entrypoint.prepare(settings) == 0
    assert "(version 2, from checkpoint_best.pth); skipping" in capsys.readouterr().out
    checkpoint.write_bytes(b"the first training's weights")  # put back: its version is there, the newer one served
    assert entrypoint.prepare(settings) == 0
    assert capsys.readouterr().out == (
        f"prepare: runa version 1 in {repository} was exported from checkpoint_best.pth, but version 2, from "
        f"checkpoint_best.pth with other bytes (sha256 {second[:12]}..., the file's now {first[:12]}...), is newer "
        f"and is the one served; skipping (to serve version 1: CONVNEXT_VERSION=1, or move version 2 out of "
        f"{repository / 'runa'})\n")


def test_serve_without_a_prepared_model_says_how_to_prepare(tmp_path, mirror):
    env = entrypoint_env(tmp_path / "empty", mirror, free_port())
    before = list(mirror.downloads)  # the module's mirror: other tests download from it too
    result = subprocess.run([sys.executable, str(ENTRYPOINT), "serve"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "prepare" in result.stderr
    assert mirror.downloads == before  # serve fetches nothing


# What the serve extra installs and the train image (deploy/requirements.py train export cpu) does not, as modules.
SERVE_ONLY_MODULES = ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "prometheus_client", "grpc",
                      "httptools", "uvloop", "watchfiles", "websockets")
WITHOUT_SERVE_PACKAGES = f"""
import importlib.abc, runpy, sys
class NotInTheTrainImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {SERVE_ONLY_MODULES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the train image)")
sys.meta_path.insert(0, NotInTheTrainImage())
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_entrypoint_starts_in_the_train_image_without_the_web_stack():
    """compose's prepare and the k8s init container run the entrypoint in the train image, which has no FastAPI,
    uvicorn, prometheus-client or grpc: its imports (the host check's key check included) must not need them."""
    train = subprocess.run([sys.executable, str(ROOT / "deploy" / "requirements.py"), "train", "export", "cpu"],
                           capture_output=True, text=True, check=True).stdout
    assert not any(package in train for package in ("fastapi", "uvicorn", "prometheus", "grpcio", "multipart"))
    result = subprocess.run([sys.executable, "-c", WITHOUT_SERVE_PACKAGES, str(ENTRYPOINT)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "prepare" in result.stdout


def test_own_checkpoint_from_a_file_url_is_used_instead_of_the_official_one(tmp_path, mirror, monkeypatch):
    import torch

    entrypoint = load_entrypoint()
    own = tmp_path / "mine.pth"
    torch.save({"mine": 1}, own)  # a torch.save file: the download refuses anything else
    env = entrypoint_env(tmp_path / "models", mirror, 0)
    before = list(mirror.downloads)
    for source in (own.as_uri(), str(own)):
        settings = settings_from(entrypoint, monkeypatch, {**env, "CONVNEXT_CHECKPOINT": source})
        path = entrypoint.fetch_checkpoint(settings)
        assert path.read_bytes() == own.read_bytes()
    assert mirror.downloads == before


def test_checkpoint_urls_of_the_same_file_name_each_give_their_own_file(tmp_path, mirror, monkeypatch):
    """CONVNEXT_CHECKPOINT=.../runB/checkpoint_best.pth after runA's: the cache (by file name) once gave runA's."""
    import torch

    entrypoint = load_entrypoint()
    env = entrypoint_env(tmp_path / "models", mirror, 0)
    for run in ("runA", "runB", "runA"):
        (tmp_path / run).mkdir(exist_ok=True)
        torch.save({"run": run}, tmp_path / run / "checkpoint_best.pth")
        url = (tmp_path / run / "checkpoint_best.pth").as_uri()
        settings = settings_from(entrypoint, monkeypatch, {**env, "CONVNEXT_CHECKPOINT": url})
        assert torch.load(entrypoint.fetch_checkpoint(settings), weights_only=True)["run"] == run
    missing = settings_from(entrypoint, monkeypatch, {**env, "CONVNEXT_CHECKPOINT": str(tmp_path / "nope.pth")})
    with pytest.raises(SystemExit, match="not a file"):
        entrypoint.fetch_checkpoint(missing)


def test_a_file_url_checkpoint_trained_again_is_fetched_anew_not_from_the_cache(tmp_path, mirror, monkeypatch):
    """The cache held the first training's copy of a file:// checkpoint and handed it back after the file was
    trained again in place: prepare saw new bytes, exported a new version, and the export read the old copy (and at
    every start again). The file's bytes now are what is fetched."""
    import torch

    entrypoint = load_entrypoint()
    checkpoint = tmp_path / "runs" / "runA" / "checkpoint_best.pth"
    checkpoint.parent.mkdir(parents=True)
    settings = settings_from(entrypoint, monkeypatch, {**entrypoint_env(tmp_path / "models", mirror, 0),
                                                        "CONVNEXT_CHECKPOINT": checkpoint.as_uri()})
    for training in ("first", "second"):
        torch.save({"training": training}, checkpoint)
        fetched = entrypoint.fetch_checkpoint(settings)
        assert fetched.parent == settings.cache_dir
        assert torch.load(fetched, weights_only=True)["training"] == training


def test_a_training_checkpoints_sidecar_stands_for_its_hash_unless_the_file_is_newer(tmp_path, monkeypatch):
    """Every start hashed the checkpoint under the prepare lock (replicas in turn); training writes a `.sha256`
    sidecar after each checkpoint, which is read instead, unless the file was replaced after it."""
    from convnext_files import sha256_file, write_sidecar

    entrypoint = load_entrypoint()
    checkpoint = tmp_path / "checkpoint_best.pth"
    checkpoint.write_bytes(b"weights")
    settings = settings_from(entrypoint, monkeypatch, {"CONVNEXT_REPOSITORY": str(tmp_path / "models"),
                                                        "CONVNEXT_CHECKPOINT": str(checkpoint)})
    assert entrypoint.local_checkpoint_sha256(settings) == sha256_file(checkpoint)  # no sidecar: hashed
    recorded = "ab" * 32  # not the file's hash: read, not computed, is what this shows
    write_sidecar(checkpoint, recorded)
    assert entrypoint.local_checkpoint_sha256(settings) == recorded
    newer = entrypoint.sidecar_path(checkpoint).stat().st_mtime_ns + 10**9
    time.sleep(0.02)  # a clock tick of a coarse file system: the change below comes after the sidecar
    os.utime(checkpoint, ns=(newer, newer))  # the file copied over after the sidecar was written
    assert entrypoint.local_checkpoint_sha256(settings) == sha256_file(checkpoint)


def test_a_checkpoint_moved_over_after_its_sidecar_is_hashed_though_its_mtime_is_older(tmp_path, monkeypatch):
    """`mv`, `cp -p`, rsync and tar keep the older file's mtime: a run's file moved over the checkpoint after the
    sidecar was written looked older than it, and the sidecar's stale hash was taken for its bytes (prepare skipped
    the new weights). The inode's change time is what the sidecar must not be older than."""
    from convnext_files import sha256_file, write_sidecar

    entrypoint = load_entrypoint()
    checkpoint, older = tmp_path / "checkpoint_best.pth", tmp_path / "older.pth"
    checkpoint.write_bytes(b"the first training's weights")
    write_sidecar(checkpoint, sha256_file(checkpoint))
    older.write_bytes(b"weights from elsewhere")
    long_ago = entrypoint.sidecar_path(checkpoint).stat().st_mtime_ns - 10**12
    os.utime(older, ns=(long_ago, long_ago))
    time.sleep(0.02)  # a clock tick of a coarse file system: the move comes after the sidecar
    os.replace(older, checkpoint)
    settings = settings_from(entrypoint, monkeypatch, {"CONVNEXT_REPOSITORY": str(tmp_path / "models"),
                                                        "CONVNEXT_CHECKPOINT": checkpoint.as_uri()})
    assert entrypoint.local_checkpoint_sha256(settings) == sha256_file(checkpoint)


def test_a_checkpoint_prepare_cannot_read_ends_it_in_one_line(tmp_path, tiny_repository, monkeypatch, capsys):
    """A file the container's user may not read (a root-owned 0600 file on the volume, an NFS EIO): a traceback
    from the hash, before the export could say what was wrong. One line now, status 1. (The tests run as root, who
    reads a 0600 file: the hash's own error is raised in its place.)"""
    entrypoint = load_entrypoint()
    repository, checkpoint = tmp_path / "models", tmp_path / "runs" / "runA" / "checkpoint_best.pth"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights")
    version_exported_from(tiny_repository, repository, "runa", "checkpoint_best.pth")
    settings = settings_from(entrypoint, monkeypatch, {"CONVNEXT_REPOSITORY": str(repository),
                                                        "CONVNEXT_CHECKPOINT": str(checkpoint)})

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(entrypoint, "sha256_file", unreadable)
    monkeypatch.setattr(entrypoint, "export_model", lambda _: pytest.fail("exported a file it cannot read"))
    assert entrypoint.prepare(settings) == 1
    assert capsys.readouterr().err == (f"prepare: error: {checkpoint} (CONVNEXT_CHECKPOINT={checkpoint}) cannot be "
                                       "read here (Permission denied); check the volume and the file's permissions "
                                       "for this container's user\n")


def test_a_file_url_of_another_host_is_not_hashed_as_a_local_file(tmp_path, monkeypatch):
    """file://otherhost/srv/x.pth is no file of this host (urllib refuses to fetch it): its local namesake's hash
    decided whether to export."""
    entrypoint = load_entrypoint()
    checkpoint = tmp_path / "checkpoint_best.pth"
    checkpoint.write_bytes(b"weights")
    for host, hashed in (("otherhost.invalid", False), ("10.0.0.7", False), ("127.0.0.2", False), ("[::1]", False),
                         ("localhost:8000", False), ("localhost", True), ("LOCALHOST", True), ("127.0.0.1", True),
                         ("", True)):  # as urllib opens them
        settings = settings_from(entrypoint, monkeypatch, {"CONVNEXT_REPOSITORY": str(tmp_path / "models"),
                                                            "CONVNEXT_CHECKPOINT": f"file://{host}{checkpoint}"})
        assert (entrypoint.local_checkpoint_sha256(settings) is not None) is hashed, host
        try:  # what urllib does with it, which the download does
            urllib.request.urlopen(settings.checkpoint).close()
            opened = True
        except urllib.error.URLError:
            opened = False
        assert opened is hashed, host


def test_a_checkpoint_url_that_is_no_checkpoint_ends_prepare_in_one_line(tmp_path, mirror):
    """A login page or a safetensors file behind CONVNEXT_CHECKPOINT: the download's own advice, not a traceback."""
    page = tmp_path / "checkpoint_best.pth"
    page.write_text("<html>sign in</html>")
    env = {**entrypoint_env(tmp_path / "models", mirror, 0), "CONVNEXT_CHECKPOINT": page.as_uri()}
    result = subprocess.run([sys.executable, str(ENTRYPOINT), "prepare"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("prepare: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "not a torch.save checkpoint" in result.stderr


def test_an_unknown_official_checkpoint_name_ends_prepare_in_one_line(tmp_path, mirror, tiny_repository):
    """A typo in CONVNEXT_PRETRAINED: one line naming the variable and the known names, the exit status of a failed
    download, not a traceback; on an empty volume and on one holding the model (whose source it is compared with)."""
    repository = tmp_path / "models"
    env = entrypoint_env(repository, mirror, 0)
    for prepared in (False, True):
        if prepared:
            version_exported_from(tiny_repository, repository, "convnext_tiny", OFFICIAL_FILE)
        result = run_prepare(env, CONVNEXT_PRETRAINED="convnext_tiny_1k_224_em")
        assert result.returncode == 1, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("prepare: error: CONVNEXT_PRETRAINED: unknown pretrained checkpoint "
                                        "'convnext_tiny_1k_224_em'; choose one of: ")
        assert "convnext_tiny_1k_224_ema," in result.stderr


def test_the_entrypoint_reads_the_services_settings_with_their_defaults(tmp_path, monkeypatch):
    from service.settings import Settings

    entrypoint = load_entrypoint()
    settings = settings_from(entrypoint, monkeypatch, {"CONVNEXT_ENGINE": "tensorrt", "CONVNEXT_PORT": "9000"})
    assert settings.service == Settings()  # the same class, so the same defaults as `python -m service`
    assert (settings.service.engine, settings.service.port, settings.repository) == ("tensorrt", 9000, Path("models"))
    assert settings.model_name == "convnext_tiny"  # no CONVNEXT_MODEL: the exported architecture's name
    renamed = settings_from(entrypoint, monkeypatch,
                            {"CONVNEXT_MODEL": "mine", "CONVNEXT_ARCHITECTURE": "convnext_atto"})
    assert (renamed.model_name, renamed.architecture) == ("mine", "convnext_atto")
    with pytest.raises(SystemExit, match="invalid service settings: .*port"):
        settings_from(entrypoint, monkeypatch, {"CONVNEXT_PORT": "99999"})


def test_every_entrypoint_variable_set_empty_means_its_default(monkeypatch, tmp_path):
    """An empty variable counts as unset (an empty CONVNEXT_CACHE_DIR was the working directory, read-only under k8s;
    an empty CONVNEXT_HOST_CHECK stopped the start; an empty CONVNEXT_EXPORT_PRECISIONS exported none)."""
    entrypoint = load_entrypoint()
    own = [line.split()[0] for line in entrypoint.__doc__.split("The entrypoint's own", 1)[1].splitlines()[1:]
           if line.startswith("  CONVNEXT_")]
    assert len(own) == 8  # the docstring's list, every variable from_env reads
    repository = {"CONVNEXT_REPOSITORY": str(tmp_path)}
    empty = settings_from(entrypoint, monkeypatch, {**repository, **dict.fromkeys(own, "")})
    assert empty == settings_from(entrypoint, monkeypatch, repository)
    assert (empty.cache_dir, empty.precisions, empty.host_check) == (tmp_path / ".cache", "fp32,fp16", "hold")


def test_an_official_checkpoint_exports_as_its_own_architecture_without_a_model_flag(monkeypatch, tmp_path):
    """CONVNEXT_PRETRAINED=convnext_base_22k_224 alone: exported (and served) as convnext_base, and the export is
    not told --model (compose used to pass convnext_tiny), so it takes the file's architecture and 21841 classes."""
    from model.pretrained import PRETRAINED_CHECKPOINTS

    entrypoint = load_entrypoint()
    for name, official in PRETRAINED_CHECKPOINTS.items():  # the name is read without torch (the serve image)
        settings = settings_from(entrypoint, monkeypatch, {"CONVNEXT_PRETRAINED": name, "CONVNEXT_ARCHITECTURE": ""})
        assert (settings.architecture, settings.model_name) == (None, official.model_name)
    base = settings_from(entrypoint, monkeypatch, {"CONVNEXT_PRETRAINED": "convnext_base_22k_224"})
    command = entrypoint.export_command(base, tmp_path / "convnext_base_22k_224.pth")
    assert "--model" not in command and command[command.index("--name") + 1] == "convnext_base"
    assert entrypoint.service_command(base)[-2:] == ["--model", "convnext_base"]  # not the repository's first model
    own = settings_from(entrypoint, monkeypatch, {"CONVNEXT_ARCHITECTURE": "convnext_small",
                                                  "CONVNEXT_CHECKPOINT": "/checkpoints/mine.pth"})
    assert entrypoint.export_command(own, Path("/checkpoints/mine.pth"))[4:6] == ["--model", "convnext_small"]
    # A checkpoint of your own, named by neither variable: its file name, never the unused CONVNEXT_PRETRAINED's.
    # A training run's checkpoint_best.pth names no model: its run folder does (two runs, two models; with one name
    # the second run was never exported, its model taken for prepared).
    for checkpoint, name in [("/checkpoints/My Small.pth", "my-small"),
                             ("https://host/w/run_7.best.pth", "run_7.best"),
                             ("https://host/runs/runA/checkpoint_best.pth", "runa"),
                             ("file:///ckpt/runs/in1k_T/checkpoint_best_ema.pth", "in1k_t-ema"),
                             ("https://host/runs/runA/checkpoint_last.pth", "runa-last"),
                             ("/checkpoint_last.pth", "checkpoint_last")]:
        unnamed = settings_from(entrypoint, monkeypatch, {"CONVNEXT_CHECKPOINT": checkpoint})
        assert unnamed.model_name == name and entrypoint.service_command(unnamed)[-1] == name


def gpu_env(repository: Path, port: int, **overrides: str) -> dict[str, str]:
    """GPU serving settings, as the GPU image sets them, for a prepared repository on this GPU-less machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVNEXT_")}
    env.update({"CONVNEXT_REPOSITORY": str(repository), "CONVNEXT_MODEL": "tiny", "CONVNEXT_HOST": "127.0.0.1",
                "CONVNEXT_PORT": str(port), "CONVNEXT_GRPC_PORT": "0", "CONVNEXT_ENGINE": "tensorrt",
                "CONVNEXT_PROVIDER": "cuda", **overrides})
    return env


def wait_for_healthz(process: subprocess.Popen, port: int, log: Path, deadline_s: float = 120) -> httpx.Response:
    stop_at = time.monotonic() + deadline_s
    while time.monotonic() < stop_at:
        if process.poll() is not None:
            raise AssertionError(f"the entrypoint exited with {process.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"/healthz never answered within {deadline_s} s:\n{log.read_text()}")


def test_serve_on_a_host_that_fails_the_gpu_check_stays_up_not_ready_and_says_why(tmp_path, tiny_repository):
    port = free_port()
    log = tmp_path / "serve.log"
    env = gpu_env(tiny_repository, port, CONVNEXT_API_KEY="host-check-key")
    process = subprocess.Popen([sys.executable, str(ENTRYPOINT), "serve"], env=env, cwd=ROOT, stdout=log.open("w"),
                               stderr=subprocess.STDOUT)
    try:
        healthz = wait_for_healthz(process, port, log)
        # Alive (a Kubernetes liveness probe passes: no restart loop) ...
        assert healthz.status_code == 200 and healthz.json()["status"] == "host_check_failed"
        # ... never ready, with the reason where `kubectl describe` and load balancers look ...
        readyz = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert readyz.status_code == 503
        reason = readyz.json()["reason"]
        assert "driver: no NVIDIA driver is visible" in reason and "tensorrt: TensorRT is not installed" in reason
        assert "fix: install NVIDIA driver >= 580" in reason
        classify = httpx.post(f"http://127.0.0.1:{port}/classify", content=b"x", timeout=5)
        assert classify.status_code == 503 and classify.json()["error"]["code"] == "host_check_failed"
        # The probes stay open; the report describes the host, so it wants the service's key like /admin does.
        assert httpx.get(f"http://127.0.0.1:{port}/doctor", timeout=5).status_code == 401
        wrong = httpx.get(f"http://127.0.0.1:{port}/doctor", headers={"X-API-Key": "nope"}, timeout=5)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
        report = httpx.get(f"http://127.0.0.1:{port}/doctor", headers={"Authorization": "Bearer host-check-key"},
                           timeout=5)
        assert report.json()["ok"] is False
        # ... and Docker's HEALTHCHECK marks it unhealthy, with the reason.
        health = subprocess.run([sys.executable, str(ROOT / "deploy" / "healthcheck.py")], capture_output=True,
                                text=True, timeout=30, env={**os.environ, "CONVNEXT_PORT": str(port)})
        assert health.returncode == 1 and "host_check_failed" in health.stderr
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=30)
    text = log.read_text()
    assert returncode == 0, text
    assert "host check FAILED" in text and "FAIL tensorrt" in text and "Traceback" not in text
    assert "export tensorrt" not in text  # the service builds its engine itself; the entrypoint no longer does


def test_serve_with_host_check_exit_exits_78_with_the_reason(tmp_path, tiny_repository):
    env = gpu_env(tiny_repository, free_port(), CONVNEXT_ENGINE="onnxruntime", CONVNEXT_HOST_CHECK="exit")
    result = subprocess.run([sys.executable, str(ENTRYPOINT), "serve"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 78, result.stdout + result.stderr
    assert "FAIL ort CUDAExecutionProvider" in result.stderr
    assert "host check failed: exiting with status 78" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_host_check_mode_is_refused(tiny_repository):
    env = gpu_env(tiny_repository, free_port(), CONVNEXT_HOST_CHECK="skip")
    result = subprocess.run([sys.executable, str(ENTRYPOINT), "serve"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "CONVNEXT_HOST_CHECK='skip': choose one of hold, exit, off" in result.stderr


def test_the_entrypoint_runs_the_doctor_alone(tiny_repository):
    result = subprocess.run([sys.executable, str(ENTRYPOINT), "doctor", "--require", "gpu", "--json"], cwd=ROOT,
                            env=gpu_env(tiny_repository, 0), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert json.loads(result.stdout)["required"] == ["gpu"]


def test_a_prepare_that_finds_another_one_exporting_waits_for_it_then_skips(tmp_path, tiny_repository, monkeypatch,
                                                                             capsys):
    """Replicas' init containers start together on the first rollout: the second waits for the first's export
    instead of exporting the same version 1 over it."""
    import fcntl

    entrypoint = load_entrypoint()
    repository = tmp_path / "models"
    settings = settings_from(entrypoint, monkeypatch, {"CONVNEXT_REPOSITORY": str(repository),
                                                        "CONVNEXT_MODEL": "tiny", "CONVNEXT_EXPORT_PRECISIONS": "fp32"})
    monkeypatch.setattr(entrypoint, "export_model", lambda _: pytest.fail("exported although the model was there"))
    repository.mkdir()
    results: list[int] = []
    with open(repository / ".prepare-tiny.lock", "a") as first:  # the first replica, exporting
        fcntl.flock(first, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: results.append(entrypoint.prepare(settings)))
        waiting.start()
        time.sleep(0.5)
        assert waiting.is_alive() and results == []  # the second one waits for the lock
        version_exported_from(tiny_repository, repository, "tiny", OFFICIAL_FILE)  # the first one's export lands
    waiting.join(10)
    assert results == [0]
    assert "tiny is already in" in capsys.readouterr().out
