"""Container entrypoint: export the model unless the repository has it from that checkpoint, check the GPU host, serve.

    python deploy/entrypoint.py prepare   # download the checkpoint, export ONNX (needs torch: the train/export image)
    python deploy/entrypoint.py serve     # check the host (GPU settings), then exec `python -m service`, which
                                          # builds and caches its TensorRT engine itself on first start
    python deploy/entrypoint.py all       # prepare, then serve (one image with both, e.g. a host venv)
    python deploy/entrypoint.py doctor    # the GPU host check alone (`python -m service doctor`; its flags follow)

The service's own variables (CONVNEXT_REPOSITORY, CONVNEXT_MODEL, CONVNEXT_ENGINE, CONVNEXT_PROVIDER, CONVNEXT_HOST,
CONVNEXT_PORT, ...) are read by its Settings class (service/settings.py, `python -m service --help`), here too.
The entrypoint's own, from the environment (an empty one counts as unset; `serve` works the model's name out of the
same variables as `prepare`, so give both the same ones):
  CONVNEXT_ARCHITECTURE      `model.list_models()` name of CONVNEXT_CHECKPOINT's model, where the checkpoint does
                             not name it (an official or torchvision file); an official download's is known. The
                             model is exported under CONVNEXT_MODEL, else under this name, else the official one's
  CONVNEXT_PRETRAINED        official checkpoint name (default: convnext_tiny_1k_224_ema, ImageNet-1K, 82.1% top-1);
                             its architecture, class count (21841 for the 22K ones) and input size go with it. Another
                             name of the same architecture is served under the same model name: `prepare` exports it
                             as a new version (as any checkpoint file no version was exported from; the newest version
                             is served, CONVNEXT_VERSION pins another)
  CONVNEXT_WEIGHTS_BASE_URL  mirror holding the official file names (default: dl.fbaipublicfiles.com)
  CONVNEXT_CHECKPOINT        your own checkpoint: a local path or an http(s)/file URL (overrides CONVNEXT_PRETRAINED)
  CONVNEXT_EXPORT_PRECISIONS ONNX precisions to export (default: fp32,fp16); a version lacking one is exported anew
  CONVNEXT_EXPORT_ARGS       more `python -m export onnx` flags, e.g. "--num-classes 10 --input-size 288"
  CONVNEXT_HOST_CHECK        on a failed host check: hold (default: stay up, not ready, explain on /readyz),
                             exit (status 78), or off (do not check). The check runs when the service's engine
                             (tensorrt) or provider (cuda/tensorrt) needs a GPU (deploy/host_check.py)
  CONVNEXT_CACHE_DIR         where downloads are cached (default: <repository>/.cache)
"""
from __future__ import annotations

import argparse
import fcntl
import os
import re
import shlex
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Keep this file torch-free at import: the GPU service image runs `serve` without torch installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from convnext_common import one_line  # noqa: E402
from convnext_files import SidecarError, checkpoint_name_part, recorded_sha256, sha256_file, sidecar_path  # noqa: E402
from deploy.host_check import EXIT_HOST_CHECK_FAILED, describe, hold, run_doctor  # noqa: E402
from runtime.exported_versions import find_exported  # noqa: E402
from runtime.repository import Manifest, ModelRepository, RepositoryError  # noqa: E402
from service.api_keys import admin_key  # noqa: E402
from service.doctor import requirements_for  # noqa: E402
from service.settings import Settings  # noqa: E402

HOST_CHECK_MODES = ("hold", "exit", "off")
DOWNLOAD_SCHEMES = ("http", "https", "file")  # a CONVNEXT_CHECKPOINT with one of these is downloaded, else a path
# The official file names: convnext_base_22k_1k_384 -> convnext_base, convnext_iso_small_1k_224_ema ->
# convnext_isotropic_small (model/pretrained.py's table; a test holds every entry to it).
OFFICIAL_ARCHITECTURE = re.compile(r"^convnext_(iso_)?([a-z]+)_")


def variable(name: str) -> str | None:
    """One of the entrypoint's own variables; None when unset or empty (compose's `${CONVNEXT_X:-}` passes an empty
    one, and `CONVNEXT_X=` in a .env or a shell means the default too)."""
    return os.environ.get(name) or None


@dataclass(frozen=True)
class PrepareSettings:
    """The service's Settings (repository, model, engine, provider, host, port) and the entrypoint's own variables."""

    service: Settings
    architecture: str | None
    pretrained: str
    weights_base_url: str | None
    checkpoint: str | None
    precisions: str
    export_args: tuple[str, ...]
    cache_dir: Path
    host_check: str

    @classmethod
    def from_env(cls) -> PrepareSettings:
        """From this process's environment, as the service will read it after the exec."""
        host_check = variable("CONVNEXT_HOST_CHECK") or "hold"
        if host_check not in HOST_CHECK_MODES:
            raise SystemExit(f"CONVNEXT_HOST_CHECK={host_check!r}: choose one of {', '.join(HOST_CHECK_MODES)}")
        try:
            service = Settings()
        except ValueError as err:  # pydantic's ValidationError, or pydantic-settings' for an unparsable variable
            raise SystemExit(f"invalid service settings: {one_line(err)}") from None
        return cls(
            service=service,
            architecture=variable("CONVNEXT_ARCHITECTURE"),
            pretrained=variable("CONVNEXT_PRETRAINED") or "convnext_tiny_1k_224_ema",
            weights_base_url=variable("CONVNEXT_WEIGHTS_BASE_URL"),
            checkpoint=variable("CONVNEXT_CHECKPOINT"),
            precisions=variable("CONVNEXT_EXPORT_PRECISIONS") or "fp32,fp16",
            export_args=tuple(shlex.split(variable("CONVNEXT_EXPORT_ARGS") or "")),
            cache_dir=Path(variable("CONVNEXT_CACHE_DIR") or Path(service.repository) / ".cache"),
            host_check=host_check,
        )

    @property
    def repository(self) -> Path:
        return Path(self.service.repository)

    @property
    def export_precisions(self) -> tuple[str, ...]:
        """CONVNEXT_EXPORT_PRECISIONS as a tuple: a version lacking one of them is exported again (as `convnext serve
        --precisions` does), so adding fp16 exports the same file again rather than starting without it."""
        return tuple(precision.strip() for precision in self.precisions.split(",") if precision.strip())

    @property
    def model_name(self) -> str:
        """The name the model is exported and served under: CONVNEXT_MODEL, else CONVNEXT_ARCHITECTURE, else the
        checkpoint's file name (my_small.pth -> my_small; a training run's checkpoint_best.pth ..., its run folder's:
        .../runs/t/checkpoint_best.pth -> t), else the official checkpoint's architecture (convnext_base_22k_224 ->
        convnext_base). All read from names: `serve` has no torch to look anything up."""
        if self.service.model or self.architecture:
            return self.service.model or self.architecture or ""
        if self.checkpoint is not None:
            stem = checkpoint_name_part(PurePosixPath(urllib.parse.urlparse(self.checkpoint).path)).lower()
            return re.sub(r"[^a-z0-9._-]+", "-", stem).strip("._-")[:64] or "model"
        official = OFFICIAL_ARCHITECTURE.match(self.pretrained)
        if official is None:
            return self.pretrained.lower()
        return f"convnext_{'isotropic_' if official.group(1) else ''}{official.group(2)}"


class PrepareError(Exception):
    """A prepare that cannot go on, said in one line (an unknown CONVNEXT_PRETRAINED)."""


def model_is_prepared(settings: PrepareSettings) -> bool:
    return bool(ModelRepository(settings.repository).versions(settings.model_name))


def official_checkpoint(settings: PrepareSettings):
    """CONVNEXT_PRETRAINED's entry in model.pretrained's table (a PretrainedCheckpoint)."""
    from model.pretrained import get_pretrained

    try:
        return get_pretrained(settings.pretrained)
    except ValueError as error:  # an unknown name: one line that lists the known ones, not a traceback
        raise PrepareError(f"CONVNEXT_PRETRAINED: {one_line(error)}") from None


def checkpoint_file_name(settings: PrepareSettings) -> str:
    """The file name the export records as the manifest's source.checkpoint, known before any download: the official
    file's (convnext_tiny_22k_224.pth), the URL's (its download keeps the name), or the local file's."""
    if settings.checkpoint is None:
        return official_checkpoint(settings).filename
    parsed = urllib.parse.urlparse(settings.checkpoint)
    if parsed.scheme in DOWNLOAD_SCHEMES:
        return Path(parsed.path).name or "checkpoint.pth"
    return Path(settings.checkpoint).name


def fetch_checkpoint(settings: PrepareSettings) -> Path:
    """A local checkpoint file: the given path, a downloaded URL, or the official ConvNeXt weights."""
    from model.pretrained import OFFICIAL_BASE_URL, download_file, download_pretrained

    if settings.checkpoint is None:
        return download_pretrained(
            official_checkpoint(settings).name, settings.cache_dir,
            base_url=settings.weights_base_url or OFFICIAL_BASE_URL,
        )
    if urllib.parse.urlparse(settings.checkpoint).scheme in DOWNLOAD_SCHEMES:
        # A file:// URL's file is here: its bytes now, not a copy cached from it before (a run trained again in place)
        return download_file(settings.checkpoint, settings.cache_dir / checkpoint_file_name(settings),
                             sha256=local_checkpoint_sha256(settings))
    path = Path(settings.checkpoint)
    if not path.is_file():
        raise SystemExit(f"CONVNEXT_CHECKPOINT={path} is not a file; mount it into the container or give a URL")
    return path


@contextmanager
def prepare_lock(settings: PrepareSettings) -> Iterator[None]:
    """One prepare per model at a time across the replicas sharing the repository (the first rollout starts every
    replica's init container at once): the others wait here, then find the model exported. flock: released when
    the holder exits, however it exits."""
    settings.repository.mkdir(parents=True, exist_ok=True)
    with open(settings.repository / f".prepare-{settings.model_name}.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def prepare(settings: PrepareSettings) -> int:
    from model.pretrained import DownloadError

    try:
        with prepare_lock(settings):
            return export_model(settings) if export_needed(settings) else 0
    except (DownloadError, PrepareError) as error:  # one line saying what to do, as the CLIs end, not a traceback
        print(f"prepare: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 1


def export_needed(settings: PrepareSettings) -> bool:
    """Whether to export, said in a line when there is a version already. The model's name does not say its weights
    (convnext_tiny_1k_224_ema, _22k_224 and _22k_1k_384 are all served as convnext_tiny, for the clients that call
    it by that name), so a checkpoint file that no version was exported from, in each of CONVNEXT_EXPORT_PRECISIONS,
    gets a new version; of a file one was exported from, prepare has nothing to do: the newest version is served (a
    version exported by hand after it, a fine-tune, stays served as every replica's, not exported over at the next
    replica's start), or the one CONVNEXT_VERSION pins."""
    repository, name = ModelRepository(settings.repository), settings.model_name
    versions = repository.versions(name)
    if not versions:
        return True
    wanted, pinned = checkpoint_file_name(settings), settings.service.version
    served = pinned or versions[-1]
    served_as = f"version {served}" + (", pinned by CONVNEXT_VERSION" if pinned else "")
    digest = local_checkpoint_sha256(settings)
    try:
        served_manifest = repository.load(name, served, verify_files=False).manifest
    except RepositoryError as error:  # the service says so at its start; prepare leaves the version alone
        print(f"prepare: {name} is already in {settings.repository} ({served_as}, whose manifest does not load: "
              f"{one_line(error)}); skipping", flush=True)
        return False
    served_from = source_named(served_manifest, wanted, digest)

    def from_wanted(manifest: Manifest) -> bool:  # that file, and where it is here, its bytes as they are now
        return manifest.source.checkpoint == wanted and (digest is None or manifest.source.sha256 == digest)

    found = find_exported(repository, name, from_wanted, settings.export_precisions)
    if found == served:
        print(f"prepare: {name} is already in {settings.repository} ({served_as}, from {wanted}); skipping",
              flush=True)
    elif found is not None:
        served_because = "is the one CONVNEXT_VERSION pins" if pinned else "is newer and is the one served"
        move_newest = "" if pinned else f", or move version {served} out of {settings.repository / name}"
        print(f"prepare: {name} version {found} in {settings.repository} was exported from {wanted}, but version "
              f"{served}, from {served_from}, {served_because}; skipping (to serve version {found}: "
              f"CONVNEXT_VERSION={found}{move_newest})", flush=True)
    else:
        in_fewer = find_exported(repository, name, from_wanted)  # from that file, in fewer precisions
        why = (f"{name} version {in_fewer} in {settings.repository} was exported from {wanted}, but not in each of "
               f"CONVNEXT_EXPORT_PRECISIONS={settings.precisions}" if in_fewer is not None else
               f"{name} {served_as}{',' if pinned else ''} in {settings.repository} was exported from {served_from}"
               + ("" if served_manifest.source.checkpoint == wanted else f", not {wanted}"))
        unserved = (f", which is not served while CONVNEXT_VERSION={pinned} is set (unset it, or set it to the new "
                    "version, to serve it)" if pinned else "")
        print(f"prepare: {why}: exporting {wanted} as a new version{unserved}", flush=True)
    return found is None


def local_checkpoint_sha256(settings: PrepareSettings) -> str | None:
    """The sha256 of CONVNEXT_CHECKPOINT's file when it is here (a path, or a file:// URL of this host): a run trained
    again in its folder keeps its file's name, so the bytes decide whether a version was exported from it. None for
    an official name or an http(s) URL (their name decides: finding out would cost a download at every start), a
    file:// URL naming another host, and a path not mounted here (the export or the download says so, if needed).

    A training checkpoint's `.sha256` sidecar, written after the file (training/checkpoint.py: save_atomic), is read
    instead of hashing the file again at every start (~15 s for a 3 GB ConvNeXt-L checkpoint on a slow volume, each
    replica in turn under the prepare lock); not when the file's inode changed after it (ctime: `mv`, `cp -p` and
    rsync keep an older file's mtime, never its ctime; after a chown of the volume, the file is hashed at every
    start)."""
    if settings.checkpoint is None:
        return None
    parsed = urllib.parse.urlparse(settings.checkpoint)
    if parsed.scheme == "file":
        if not names_this_host(parsed.netloc):
            return None
        path = Path(urllib.request.url2pathname(parsed.path))
    elif parsed.scheme in DOWNLOAD_SCHEMES:
        return None
    else:
        path = Path(settings.checkpoint)
    try:
        if not path.is_file():
            return None
        sidecar = sidecar_path(path)
        try:
            if sidecar.is_file() and sidecar.stat().st_mtime_ns >= path.stat().st_ctime_ns:
                return recorded_sha256(path) or sha256_file(path)
        except (SidecarError, FileNotFoundError):  # garbled (the export then says so), or replaced meanwhile
            pass
        return sha256_file(path)
    except OSError as error:  # the file's or its sidecar's: the one named
        raise PrepareError(f"{error.filename or path} (CONVNEXT_CHECKPOINT={settings.checkpoint}) cannot be read here "
                           f"({error.strerror or error}); check the volume and the file's permissions for this "
                           "container's user") from None


def names_this_host(host: str) -> bool:
    """A file:// URL's host that urllib opens as a local file, decided as urllib.request.FileHandler decides it: none,
    or one whose IPv4 address is localhost's or this host's name's (LOCALHOST, 127.0.0.1, this host's name; not
    [::1], not a host with a port)."""
    if not host:
        return True
    try:
        return socket.gethostbyname(host) in urllib.request.FileHandler().get_names()
    except OSError:  # unknown, or not a host name at all
        return False


def source_named(manifest: Manifest, wanted: str, digest: str | None) -> str:
    """The checkpoint a version was exported from, for prepare's line; a file of the wanted name with other bytes than
    the wanted file's now is said to be one, with both digests' first 12 digits."""
    source = manifest.source
    if source.checkpoint is None:
        return "no checkpoint (random weights)"
    if digest is not None and source.checkpoint == wanted and source.sha256 != digest:
        return (f"{wanted} with other bytes (sha256 {(source.sha256 or 'not recorded')[:12]}..., the file's now "
                f"{digest[:12]}...)")
    return source.checkpoint


def export_model(settings: PrepareSettings) -> int:
    checkpoint = fetch_checkpoint(settings)
    print(f"prepare: exporting {checkpoint} as {settings.model_name} ({settings.precisions})", flush=True)
    returncode = subprocess.run(export_command(settings, checkpoint), check=False).returncode
    if returncode != 0 and settings.checkpoint is not None and settings.architecture is None:
        print("prepare: if the export above asks for --model, set CONVNEXT_ARCHITECTURE to the checkpoint's model (a "
              "`python -m model table` or `python -m model roadmap` name): only project checkpoints, official file "
              "names and known timm files carry it", file=sys.stderr, flush=True)
    return returncode


def export_command(settings: PrepareSettings, checkpoint: Path) -> list[str]:
    """`python -m export onnx` for the checkpoint. --model only when CONVNEXT_ARCHITECTURE is set: a project
    checkpoint names its model, and an official download's name says its model, class count and input size."""
    return [
        sys.executable, "-m", "export", "onnx",
        *(["--model", settings.architecture] if settings.architecture else []),
        "--checkpoint", str(checkpoint),
        "--name", settings.model_name,
        "--repository", str(settings.repository),
        "--precisions", settings.precisions,
        *settings.export_args,
    ]


def check_host(settings: PrepareSettings) -> int | None:
    """Run the doctor for the GPU settings; None when serving may go ahead, else the exit status to return."""
    service = settings.service
    if settings.host_check == "off" or not requirements_for(service.engine, service.provider):
        return None
    report = run_doctor(service.engine, service.provider)
    print(describe(report), file=sys.stderr, flush=True)
    if report["ok"]:
        return None
    if settings.host_check == "exit":
        print(f"host check failed: exiting with status {EXIT_HOST_CHECK_FAILED}", file=sys.stderr, flush=True)
        return EXIT_HOST_CHECK_FAILED
    return hold(report, settings.service.host, settings.service.port, admin_key(settings.service))


def service_command(settings: PrepareSettings) -> list[str]:
    """`python -m service` for the prepared model: --model names it, not the repository's first (the volume may hold
    others, e.g. one prepared under another CONVNEXT_MODEL or CONVNEXT_PRETRAINED)."""
    return [sys.executable, "-m", "service", "--repository", str(settings.repository), "--model", settings.model_name]


def serve(settings: PrepareSettings) -> int:
    """Replace this process with the service, so it receives SIGTERM directly (tini is PID 1 in the image)."""
    if not model_is_prepared(settings):
        raise SystemExit(
            f"no model {settings.model_name!r} in {settings.repository}: run `deploy/entrypoint.py prepare` first "
            "(docker compose runs the `prepare` service before this one)"
        )
    returncode = check_host(settings)
    if returncode is not None:
        return returncode
    os.execv(sys.executable, service_command(settings))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "serve", "all", "doctor"))
    parser.add_argument("doctor_args", nargs=argparse.REMAINDER, help="doctor only: its flags (--json, --require)")
    args = parser.parse_args(argv)
    if args.step == "doctor":
        os.execv(sys.executable, [sys.executable, "-m", "service", "doctor", *args.doctor_args])
    if args.doctor_args:
        parser.error(f"{args.step} takes no further arguments (got {args.doctor_args})")
    settings = PrepareSettings.from_env()
    if args.step in ("prepare", "all"):
        returncode = prepare(settings)
        if returncode != 0 or args.step == "prepare":
            return returncode
    return serve(settings)  # returns only when the host check failed: serve() execs the service


if __name__ == "__main__":
    raise SystemExit(main())
