"""`convnext serve --pretrained NAME | --checkpoint PATH`: download (resumable, verified) -> export ONNX -> serve.

The service never imports torch, so this front runs the download and the export in its own process, then replaces
itself (exec) with `convnext serve` without either flag, i.e. `python -m service`: the server holds none of the
export's memory. A version of the same repository name exported from the same file, with an ONNX file of every
precision --precisions asks for, is served as it is, without a download (so a second start works offline); one with
fewer precisions is not (the service could not start at a precision it lacks): a new version is exported. The
service's settings and ports are checked first, so a taken port fails at once, not after the export.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from convnext_common import CliParser, add_version_argument, one_line
from convnext_files import checkpoint_name_part, sha256_file
from export.__main__ import precision_list_argument, repository_name_argument
from export.onnx import export_onnx_version
from export.source import ExportError, check_model_name
from model.checkpoints import CheckpointError
from model.pretrained import (
    OFFICIAL_BASE_URL,
    DownloadError,
    default_cache_dir,
    download_pretrained,
    get_pretrained,
)
from model.timm_pretrained import TimmPretrained, get_timm_pretrained
from runtime.engines.base import EngineError
from runtime.engines.factory import check_engine_settings
from runtime.exported_versions import find_exported
from runtime.repository import Manifest, ModelRepository, RepositoryError
from service.__main__ import StartRefused, startable_settings
from service.engine_builds import engine_options
from service.settings import Settings

PROG = "convnext serve"
# The service's settings for which model to serve: this command names the model itself (and the version, unless it
# starts the service unpinned for its watcher), so these are dropped: they neither override nor pin what it serves.
SERVED_MODEL_VARIABLES = ("CONVNEXT_MODEL", "CONVNEXT_VERSION")
LOCAL_HINT = "to serve a local checkpoint instead: convnext serve --checkpoint PATH [--model ARCHITECTURE]"
logger = logging.getLogger("convnext_serve")


class ServeSetupError(Exception):
    """The model could not be made ready to serve; the message says what to do."""


def get_args_parser() -> CliParser:
    parser = CliParser(prog=PROG, description=__doc__, allow_abbrev=False,
                       epilog="Any other flag goes to the service (see `python -m service --help`).")
    add_version_argument(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", metavar="NAME", help="an official checkpoint (`python -m model pretrained`), "
                                                             "e.g. convnext_tiny_1k_224_ema")
    source.add_argument("--checkpoint", metavar="PATH", help="a local project, official, timm or torchvision .pth")
    parser.add_argument("--model", help="its architecture, for a checkpoint that does not name it (not project ones)")
    parser.add_argument("--name", type=repository_name_argument,
                        help="its name in the repository (default: from the pretrained name or the file; for a "
                             "training run's checkpoint_best/_best_ema/_last.pth, its run folder)")
    parser.add_argument("--ema", action="store_true", help="serve the checkpoint's EMA weights (model_ema; timm's "
                                                           "state_dict_ema) instead of the trained ones")
    parser.add_argument("--timm-name", metavar="MODEL.TAG", help="the timm weights --checkpoint holds (e.g. "
                        "convnext_tiny.in12k_ft_in1k): their model, class count and evaluation transform")
    parser.add_argument("--repository", default=os.environ.get("CONVNEXT_REPOSITORY", "models"))
    parser.add_argument("--cache-dir", default=None, help=f"downloads (default: {default_cache_dir()})")
    parser.add_argument("--mirror", default=OFFICIAL_BASE_URL, help="base URL holding the official file names")
    parser.add_argument("--precisions", default="fp32", type=precision_list_argument,
                        help="ONNX precisions to export (python -m export onnx), fp32 among them")
    parser.add_argument("--quiet", action="store_true", help="no download or export progress")
    return parser


def repository_name(text: str) -> str:
    """A model repository name (lower case, digits, . _ -; no underscores) from a checkpoint or pretrained name."""
    name = re.sub(r"[^a-z0-9.-]+", "-", text.lower()).strip(".-")[:64]
    return name or "model"


def default_checkpoint_name(path: Path) -> str:
    """The repository name a checkpoint is served under without --name (convnext_files.checkpoint_name_part)."""
    return repository_name(checkpoint_name_part(path.resolve()))


def prepare_pretrained(args, repository: ModelRepository) -> tuple[str, int]:
    entry = get_pretrained(args.pretrained)
    name = args.name or repository_name(entry.name)
    version = find_exported(repository, name, lambda manifest: manifest.source.checkpoint == entry.filename,
                            args.precisions)
    if version is not None:
        return name, version
    try:
        checkpoint = download_pretrained(entry.name, args.cache_dir, base_url=args.mirror, progress=not args.quiet)
    except DownloadError as error:
        raise ServeSetupError(f"{one_line(error)}; {LOCAL_HINT}") from None
    exported = export_onnx_version(
        repository.root, name, entry.model_name, checkpoint, input_size=entry.input_size_px,
        num_classes=entry.num_classes, precisions=args.precisions,
    )
    return name, exported.manifest.version


def prepare_checkpoint(args, repository: ModelRepository) -> tuple[str, int]:
    path = Path(args.checkpoint)
    if not path.is_file():
        raise ServeSetupError(f"no checkpoint file at {path}; pass the path of a .pth file")
    name = args.name or default_checkpoint_name(path)
    digest, weights = sha256_file(path), "ema" if args.ema else "model"
    tag = timm_tag(args.timm_name)

    def matches(manifest: Manifest) -> bool:  # the same file's same weights, under the same timm transform
        same = manifest.source.sha256 == digest and manifest.source.weights == weights
        return same and (tag is None or (manifest.source.dataset, manifest.preprocess.crop_pct,
                                         manifest.preprocess.crop_px) == (tag.dataset, tag.crop_pct, tag.input_size_px))

    version = find_exported(repository, name, matches, args.precisions)
    if version is not None:
        return name, version
    exported = export_onnx_version(repository.root, name, args.model, path, precisions=args.precisions,
                                   use_ema=args.ema, timm_name=args.timm_name)
    return name, exported.manifest.version


def timm_tag(timm_name: str | None) -> TimmPretrained | None:
    """--timm-name's tag (main refused a tag this project does not know at parsing)."""
    return None if timm_name is None else get_timm_pretrained(timm_name)


def onnx_precision_read(settings: Settings) -> str:
    """The precision of the ONNX file the service's engine reads to serve its precision; ServeSetupError for settings
    it would refuse (after the download and the export, were it not asked here)."""
    try:
        return check_engine_settings(engine_options(settings))
    except EngineError as error:
        raise ServeSetupError(str(error)) from None


def with_served_precision(precisions: tuple[str, ...], settings: Settings) -> tuple[str, ...]:
    """--precisions plus the ONNX precision the service reads for its --engine and --precision, so `--precision fp16`
    alone exports fp32 and fp16 rather than failing once the export is done."""
    needed = onnx_precision_read(settings)
    return precisions if needed in precisions else (*precisions, needed)


def served_version_flags(repository: ModelRepository, name: str, version: int, settings: Settings) -> list[str]:
    """`--model-version VERSION`: the version exported or found, pinned. With a repository watcher (--watch-interval-s)
    and that version the newest, none: the service starts on the newest, this one, unpinned, so its watcher follows
    later exports (it never leaves a pinned version, only reloads it when exported again)."""
    if settings.watch_interval_s > 0 and repository.latest_version(name) == version:
        return []
    return ["--model-version", str(version)]


def _export_first_hint(error: BaseException) -> str:
    """The export's own advice names flags this command does not take: how to pass them instead."""
    flags = [flag for flag in ("--num-classes", "--input-size") if flag in str(error)]
    if not flags:
        return ""
    given = " ".join(f"{flag} ..." for flag in flags)
    return (f" ({PROG} takes no {' or '.join(flags)}: export it with python -m export onnx --checkpoint PATH --model "
            f"ARCHITECTURE --name NAME {given}, then python -m service --model NAME)")


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args, service_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if any(arg.split("=")[0] == "--model-version" for arg in service_args):  # the service's own flag, overridden
        parser.error("--model-version is not taken here: the version served is the one this command exports or "
                     "finds for the checkpoint (python -m service --model-version N serves another)")
    if args.pretrained and (args.ema or args.timm_name or args.model):
        parser.error("--model, --ema and --timm-name say what a --checkpoint holds; an official name says it itself "
                     "(its _ema names are the EMA weights)")
    if args.model is not None:  # else found unknown only once the checkpoint is hashed and read
        try:
            check_model_name(args.model)
        except ExportError as error:
            parser.error(f"--model: {error}")
    for flag, name, known in (("--pretrained", args.pretrained, get_pretrained),
                              ("--timm-name", args.timm_name, get_timm_pretrained)):
        if name is not None:  # a name this project does not know: bad arguments, as the parser's own refusals
            try:
                known(name)
            except ValueError as error:
                parser.error(f"{flag}: {error}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Progress lines, not third-party INFO (the ONNX optimizer's); runtime.exported_versions says why an earlier export
    # is not reused.
    for name in ("export", "model", "convnext_serve", "runtime.exported_versions"):
        logging.getLogger(name).setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:  # the service's settings and ports before a download and an export that could take minutes
        settings = startable_settings([*service_args, "--repository", args.repository])
    except StartRefused as refused:
        print(f"{PROG}: error: {refused}", file=sys.stderr)
        return refused.status
    repository = ModelRepository(args.repository)
    try:
        args.precisions = with_served_precision(args.precisions, settings)
        name, version = (prepare_pretrained if args.pretrained else prepare_checkpoint)(args, repository)
    except (ServeSetupError, CheckpointError, RepositoryError, ValueError, RuntimeError, OSError) as error:
        print(f"{PROG}: error: {one_line(error)}{_export_first_hint(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; a download resumes where it stopped", file=sys.stderr)
        return 130
    if not args.quiet:
        print(f"serving {name} version {version} from {args.repository}", file=sys.stderr, flush=True)
    for variable in SERVED_MODEL_VARIABLES:
        if os.environ.get(variable):
            print(f"{PROG}: note: {variable}={os.environ[variable]} is not used: this command serves the model it "
                  f"exports or finds ({name} version {version}); python -m service serves what the variable names",
                  file=sys.stderr)
    # Through the `convnext` front, as the user typed it: the service's own errors then say `convnext serve`.
    command = [sys.executable, "-m", "convnext_cli", "serve", *service_args, "--repository", args.repository,
               "--model", name, *served_version_flags(repository, name, version, settings)]
    env = {variable: value for variable, value in os.environ.items() if variable not in SERVED_MODEL_VARIABLES}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, env)  # replaces this process: torch and the export's memory go with it


if __name__ == "__main__":
    raise SystemExit(main())
