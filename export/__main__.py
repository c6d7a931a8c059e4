"""`python -m export {onnx,list,tensorrt}`: write, list and compile model repository versions."""
from __future__ import annotations

import argparse
import logging
import sys

from convnext_common import (
    CliParser,
    add_version_argument,
    exit_status,
    one_line,
    positive_int,
    prog_name,
    whole_number,
)
from runtime.repository import NAME_PATTERN, ModelRepository, RepositoryError
from runtime.tensorrt import BatchProfile, select_or_build_engine
from runtime.verify import image_paths_in

# torch-free at import: `python -m export tensorrt|list` run where there is no torch
from .onnx import MIN_OPSET, PRECISIONS, InterruptedAfterPublishing, export_onnx_version
from .source import ExportError, check_input_size, check_model_name

PROG = "python -m export"  # as the module runs; prog_name() gives it as the user ran it


def repository_name_argument(text: str) -> str:
    """argparse type of --name (convnext serve's too): a name the repository takes, refused before any work."""
    if not NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a repository name: lower-case letters, digits, '.', '_' and '-', starting with a "
            f"letter or digit, at most 64 characters ({NAME_PATTERN.pattern})")
    return text


def precision_list_argument(text: str) -> tuple[str, ...]:
    """argparse type of --precisions (convnext serve's too): known precisions, fp32 among them, in order, once each."""
    precisions = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown precision {', '.join(unknown)}; choose from {','.join(PRECISIONS)}")
    if "fp32" not in precisions:
        raise argparse.ArgumentTypeError(
            f"{text!r} leaves out fp32, the reference every other precision is verified against; "
            f"pass --precisions fp32,{','.join(precisions)}")
    return precisions


def _opset(text: str) -> int:
    value = positive_int(text)
    if value < MIN_OPSET:
        raise argparse.ArgumentTypeError(f"{value} < {MIN_OPSET}: LayerNormalization needs opset {MIN_OPSET} or newer")
    return value


def _device_index(text: str) -> int:
    value = whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a CUDA device index is 0 or more, got {value}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog=PROG, description=__doc__)
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    onnx = commands.add_parser("onnx", help="export a model to a new verified ONNX version")
    onnx.add_argument("--model", help="a model.list_models() name (optional with a project checkpoint, an official "
                                       "file under its official name, or timm weights whose timm name is known)")
    onnx.add_argument("--checkpoint", help="project, official, timm or torchvision checkpoint (.pth)")
    onnx.add_argument("--timm-name", metavar="MODEL.TAG",
                      help="the timm weights --checkpoint holds (e.g. convnext_tiny.in12k_ft_in1k): their model, "
                           "class count and evaluation transform; read from the path when it names them (the "
                           "Hugging Face cache's models--timm--MODEL.TAG folder)")
    onnx.add_argument("--name", required=True, type=repository_name_argument, help="model name in the repository")
    onnx.add_argument("--repository", default="models", help="model repository root")
    onnx.add_argument("--version", type=positive_int, help="version number, 1 or more (default: latest + 1)")
    onnx.add_argument("--ema", action="store_true",
                      help="export the checkpoint's EMA weights (model_ema; timm's state_dict_ema) instead of the "
                           "trained weights")
    onnx.add_argument("--overwrite", action="store_true",
                      help="replace the existing --version N (without --version an export takes the next number)")
    onnx.add_argument("--precisions", default="fp32", type=precision_list_argument,
                      help="comma list from fp32,fp16,bf16,int8 (bf16: for TensorRT 11)")
    onnx.add_argument("--opset", type=_opset, default=18)
    onnx.add_argument("--activation", choices=("gelu", "relu"))
    onnx.add_argument("--num-classes", type=positive_int)
    onnx.add_argument("--input-size", type=positive_int,
                      help="crop size in px, at least the model's total stride: 32 (16 for the isotropic ConvNeXts) "
                           "(default: the model's data config)")
    onnx.add_argument("--verify-images", help="folder of JPEG/PNG photos for the parity check")
    onnx.add_argument("--calibration-images",
                      help="folder of photos for int8 calibration (default: the verify images; used by int8 only)")
    onnx.add_argument("--dataset", help="what the model was trained on, for the manifest and the web page "
                                        "(default: from the checkpoint, e.g. ImageNet-1K)")
    onnx.add_argument("--quiet", action="store_true", help="no progress lines (build, ONNX, parity, precisions)")

    listing = commands.add_parser("list", help="list the models and versions in a repository")
    listing.add_argument("--repository", default="models")

    trt = commands.add_parser("tensorrt", help="build a TensorRT engine for a version (needs TensorRT and a GPU)")
    trt.add_argument("--name", required=True)
    trt.add_argument("--repository", default="models")
    trt.add_argument("--version", type=positive_int, help="default: the latest version")
    trt.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    trt.add_argument("--min-batch", type=positive_int, default=1)
    trt.add_argument("--opt-batch", type=positive_int, default=8)
    trt.add_argument("--max-batch", type=positive_int, default=32)
    trt.add_argument("--workspace-mib", type=positive_int, default=4096)
    trt.add_argument("--optimization-level", type=int, default=3, choices=range(0, 6))
    trt.add_argument("--timing-cache",
                     help="timing cache file (default: <repository>/.timing_cache.trt<version>.sm<cc>-<device model>, "
                          "e.g. .timing_cache.trt10.13.2.6.sm90-h100-pcie)")
    trt.add_argument("--rebuild", action="store_true", help="build even if a compatible engine exists")
    trt.add_argument("--device", type=_device_index, default=0,
                     help="CUDA device index to build and verify the engine on")
    trt.add_argument("--quiet", action="store_true", help="no progress lines (TensorRT's build phases)")
    return parser


def _refuse_bad_onnx_args(parser: argparse.ArgumentParser, args) -> None:
    """The argument errors an export would otherwise meet only after building the model (minutes on a CPU)."""
    if args.model is None and args.checkpoint is None:
        parser.error("no model name: pass --model (only project checkpoints carry their model name)")
    if args.timm_name is not None and args.checkpoint is None:
        parser.error("--timm-name says which timm weights a --checkpoint holds: pass the --checkpoint")
    if args.model is not None:
        try:
            check_model_name(args.model)
        except ExportError as error:
            parser.error(f"--model: {error}")
        if args.input_size is not None:  # else known once the checkpoint is read: load_source checks it then
            try:
                check_input_size(args.model, args.input_size)
            except ExportError as error:
                parser.error(str(error))
    folders = {"--verify-images": args.verify_images}
    if "int8" in args.precisions:  # only int8 calibrates
        folders["--calibration-images"] = args.calibration_images
    for flag, folder in folders.items():
        if folder is not None:
            try:
                image_paths_in(folder, flag)
            except OSError as error:
                parser.error(str(error))
    if args.version in ModelRepository(args.repository).versions(args.name) and not args.overwrite:
        parser.error(f"{args.name}/{args.version} already exists in {args.repository}; "
                     "pass --overwrite to replace it")


def _run_onnx(args) -> int:
    version = export_onnx_version(
        args.repository, args.name, args.model, args.checkpoint, version=args.version, overwrite=args.overwrite,
        opset=args.opset, precisions=args.precisions,
        num_classes=args.num_classes, activation=args.activation, input_size=args.input_size,
        calibration_images=args.calibration_images, verify_images=args.verify_images, use_ema=args.ema,
        dataset=args.dataset, timm_name=args.timm_name,
    )
    try:
        print(f"wrote {version.path}")
        _print_artifacts(version.manifest)
    except KeyboardInterrupt:  # the version is in place all the same
        raise InterruptedAfterPublishing(version.path) from None
    return 0


def _opset_of(manifest, artifact) -> int | None:
    """An ONNX artifact's opset: its own, else (a manifest written before those were recorded) the version's for
    model.onnx, which it describes; unknown for the others (a bf16 file's is higher)."""
    if artifact.onnx_opset is not None:
        return artifact.onnx_opset
    return manifest.onnx_opset if (artifact.format, artifact.precision) == ("onnx", "fp32") else None


def _print_artifacts(manifest) -> None:
    for a in manifest.artifacts:
        parity = a.parity
        detail = (
            f"vs {parity.reference}: max|diff| {parity.max_abs_diff:.3g}, top-1 {parity.top1_agreement:.3f}, "
            f"top-5 {parity.top5_agreement:.3f} on {parity.num_inputs} inputs ({parity.num_real_images} real)"
            if parity else "no parity recorded"
        )
        opset = _opset_of(manifest, a)
        opset_text = f"opset {opset}" if opset is not None else ""
        print(f"  {a.file:45s} {a.format:8s} {a.precision:5s} {a.size_bytes / 2**20:7.1f} MiB  {opset_text:8s}  "
              f"{detail}")


def _run_list(args) -> int:
    """Every version, one that cannot be read included (`name/v: invalid (why)`): one broken manifest hides none of
    the others; the listing then ends in an error naming them (status 1)."""
    repository = ModelRepository(args.repository)
    names = repository.models()
    if not names:
        print(f"no models in {args.repository}")
    invalid = []
    for name in names:
        for v in repository.versions(name):
            try:
                m = repository.load(name, v, verify_files=False).manifest
            except (RepositoryError, OSError) as error:
                print(f"{name}/{v}: invalid ({one_line(error)})")
                invalid.append(f"{name}/{v}")
                continue
            print(f"{name}/{v}: {m.architecture} ({m.activation}), {m.num_classes} classes, "
                  f"{m.input.height}px, created {m.created_at.isoformat()}")
            _print_artifacts(m)
    if invalid:
        versions = "version" if len(invalid) == 1 else "versions"
        raise RepositoryError(f"{len(invalid)} {versions} in {args.repository} cannot be read: {', '.join(invalid)} "
                              "(listed above with the reason); fix or remove their manifest.json, or export again")
    return 0


def _refuse_bad_tensorrt_args(parser: argparse.ArgumentParser, args) -> None:
    """A batch profile TensorRT cannot take, refused before the version is loaded (and without a GPU)."""
    try:
        BatchProfile(args.min_batch, args.opt_batch, args.max_batch)
    except ValueError as error:
        parser.error(f"--min-batch / --opt-batch / --max-batch: {error}")


def _run_tensorrt(args) -> int:
    profile = BatchProfile(args.min_batch, args.opt_batch, args.max_batch)
    # Engines are left to find-or-build: it rebuilds the one asked for when missing or not matching its sha256.
    version = ModelRepository(args.repository).load(args.name, args.version, verify_engines=False)
    artifact, version = select_or_build_engine(
        version, args.precision, profile, repository_root=args.repository, workspace_mib=args.workspace_mib,
        optimization_level=args.optimization_level, timing_cache=args.timing_cache, rebuild=args.rebuild,
        quiet=args.quiet, device=args.device,
    )
    print(f"engine {version.path / artifact.file}")
    _print_artifacts(version.manifest)
    return 0


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    quiet = getattr(args, "quiet", False)
    # Progress lines are INFO on the project's loggers; third-party INFO (the ONNX optimizer's pass log) is noise.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("export", "model"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    handlers = {"onnx": _run_onnx, "list": _run_list, "tensorrt": _run_tensorrt}
    try:
        if args.command == "onnx":
            _refuse_bad_onnx_args(parser, args)
        elif args.command == "tensorrt":
            _refuse_bad_tensorrt_args(parser, args)
        return handlers[args.command](args)
    except BrokenPipeError:  # the reader of stdout left (`export list | head`): exit_status ends quietly
        raise
    except (RepositoryError, ValueError, RuntimeError, OSError, ImportError) as error:
        print(f"{prog_name(PROG)}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except InterruptedAfterPublishing as interrupt:
        print(f"{prog_name(PROG)}: interrupted after the version was published: {interrupt.path} is complete",
              file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        written = "; no version was written" if args.command == "onnx" else ""
        print(f"{prog_name(PROG)}: interrupted{written}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
