"""Container entrypoint: prepare the model repository if the model is missing, then exec the service.

    python deploy/entrypoint.py prepare   # download the checkpoint, export ONNX (needs torch: the train/export image)
    python deploy/entrypoint.py serve     # exec `python -m service` (the service builds/caches TensorRT engines itself)
    python deploy/entrypoint.py all       # prepare, then serve (one image with both, e.g. a host venv)

Settings come from the environment (the service reads its own CONVNEXT_* settings too):
  CONVNEXT_REPOSITORY        model repository folder (default: models)
  CONVNEXT_MODEL             model name in the repository (default: convnext_tiny)
  CONVNEXT_ARCHITECTURE      `model.list_models()` name to export (default: convnext_tiny)
  CONVNEXT_PRETRAINED        official checkpoint name (default: convnext_tiny_1k_224_ema, ImageNet-1K, 82.1% top-1)
  CONVNEXT_WEIGHTS_BASE_URL  mirror holding the official file names (default: dl.fbaipublicfiles.com)
  CONVNEXT_CHECKPOINT        your own checkpoint: a local path or an http(s)/file URL (overrides CONVNEXT_PRETRAINED)
  CONVNEXT_EXPORT_PRECISIONS ONNX precisions to export (default: fp32,fp16)
  CONVNEXT_EXPORT_ARGS       more `python -m export onnx` flags, e.g. "--num-classes 10 --input-size 288"
  CONVNEXT_ENGINE            tensorrt: `serve` builds the engine first unless the repository has a fitting one
  CONVNEXT_CACHE_DIR         where downloads are cached (default: <repository>/.cache)
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

# Keep this file torch-free at import: the GPU service image runs `serve` without torch installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from export.repository import ModelRepository  # noqa: E402


@dataclass(frozen=True)
class PrepareSettings:
    repository: Path
    model_name: str
    architecture: str
    pretrained: str
    weights_base_url: str | None
    checkpoint: str | None
    precisions: str
    export_args: tuple[str, ...]
    cache_dir: Path
    engine: str
    precision: str
    max_batch_size: int

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "PrepareSettings":
        repository = Path(env.get("CONVNEXT_REPOSITORY", "models"))
        return cls(
            repository=repository,
            model_name=env.get("CONVNEXT_MODEL", "convnext_tiny"),
            architecture=env.get("CONVNEXT_ARCHITECTURE", "convnext_tiny"),
            pretrained=env.get("CONVNEXT_PRETRAINED", "convnext_tiny_1k_224_ema"),
            weights_base_url=env.get("CONVNEXT_WEIGHTS_BASE_URL") or None,
            checkpoint=env.get("CONVNEXT_CHECKPOINT") or None,
            precisions=env.get("CONVNEXT_EXPORT_PRECISIONS", "fp32,fp16"),
            export_args=tuple(shlex.split(env.get("CONVNEXT_EXPORT_ARGS", ""))),
            cache_dir=Path(env.get("CONVNEXT_CACHE_DIR", repository / ".cache")),
            engine=env.get("CONVNEXT_ENGINE", "onnxruntime"),
            precision=env.get("CONVNEXT_PRECISION", "fp32"),
            max_batch_size=int(env.get("CONVNEXT_MAX_BATCH_SIZE", "8")),
        )


def model_is_prepared(settings: PrepareSettings) -> bool:
    return bool(ModelRepository(settings.repository).versions(settings.model_name))


def fetch_checkpoint(settings: PrepareSettings) -> Path:
    """A local checkpoint file: the given path, a downloaded URL, or the official ConvNeXt weights."""
    from model.pretrained import OFFICIAL_BASE_URL, download_file, download_pretrained

    if settings.checkpoint is None:
        return download_pretrained(
            settings.pretrained, settings.cache_dir, base_url=settings.weights_base_url or OFFICIAL_BASE_URL
        )
    parsed = urllib.parse.urlparse(settings.checkpoint)
    if parsed.scheme in ("http", "https", "file"):
        filename = Path(parsed.path).name or "checkpoint.pth"
        return download_file(settings.checkpoint, settings.cache_dir / filename)
    path = Path(settings.checkpoint)
    if not path.is_file():
        raise SystemExit(f"CONVNEXT_CHECKPOINT={path} is not a file; mount it into the container or give a URL")
    return path


def prepare(settings: PrepareSettings) -> int:
    if model_is_prepared(settings):
        print(f"prepare: {settings.model_name} is already in {settings.repository}; skipping", flush=True)
        return 0
    checkpoint = fetch_checkpoint(settings)
    print(f"prepare: exporting {checkpoint} as {settings.model_name} ({settings.precisions})", flush=True)
    command = [
        sys.executable, "-m", "export", "onnx",
        "--model", settings.architecture,
        "--checkpoint", str(checkpoint),
        "--name", settings.model_name,
        "--repository", str(settings.repository),
        "--precisions", settings.precisions,
        *settings.export_args,
    ]
    return subprocess.run(command, check=False).returncode


def build_tensorrt_engine(settings: PrepareSettings) -> int:
    """Build (or reuse) the TensorRT engine for this GPU, cached in the repository (`export tensorrt` skips when one
    fits). Runs in the serving image, which has TensorRT but no torch; export/tensorrt.py needs no torch."""
    command = [
        sys.executable, "-m", "export", "tensorrt",
        "--repository", str(settings.repository),
        "--name", settings.model_name,
        "--precision", settings.precision,
        "--max-batch", str(settings.max_batch_size),
        "--opt-batch", str(min(8, settings.max_batch_size)),
    ]
    return subprocess.run(command, check=False).returncode


def serve(settings: PrepareSettings) -> None:
    """Replace this process with the service, so it receives SIGTERM directly (tini is PID 1 in the image)."""
    if not model_is_prepared(settings):
        raise SystemExit(
            f"no model {settings.model_name!r} in {settings.repository}: run `deploy/entrypoint.py prepare` first "
            "(docker compose runs the `prepare` service before this one)"
        )
    if settings.engine == "tensorrt":
        returncode = build_tensorrt_engine(settings)
        if returncode != 0:
            raise SystemExit(f"building the TensorRT engine failed (exit {returncode}); see the log above")
    os.execv(sys.executable, [sys.executable, "-m", "service", "--repository", str(settings.repository)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("prepare", "serve", "all"))
    args = parser.parse_args(argv)
    settings = PrepareSettings.from_env(dict(os.environ))
    if args.step in ("prepare", "all"):
        returncode = prepare(settings)
        if returncode != 0 or args.step == "prepare":
            return returncode
    serve(settings)
    return 0  # not reached: serve() execs


if __name__ == "__main__":
    raise SystemExit(main())
