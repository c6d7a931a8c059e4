"""`python -m service` / `convnext serve`: serve the model repository with uvicorn (graceful on SIGTERM).

`python -m service doctor` checks the GPU host instead (service/doctor.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import warnings
from collections.abc import Callable
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from PIL import Image
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from convnext_common import CliParser, add_version_argument, exit_status, one_line, prog_name
from runtime.repository import RepositoryError
from service import PROG
from service.settings import Settings

# No flag for these: a command line is visible to every user of the host (ps, /proc); use the environment or a file.
SECRET_SETTINGS = ("api_key", "admin_api_key")
# `--version` prints the project version, so the `version` setting (which model version to serve) is --model-version;
# its environment variable stays CONVNEXT_VERSION.
FLAG_NAMES = {"version": "model-version"}
# `convnext serve` takes these before the service starts (convnext_serve.py: download or export first, needs torch).
EXPORT_FIRST_FLAGS = ("--pretrained", "--checkpoint")
EXPORT_FIRST_HELP = ("`convnext serve --pretrained NAME | --checkpoint PATH` downloads or exports that model into the "
                     "repository first, then serves it (its own flags: --model, --name, --ema, --timm-name, "
                     "--cache-dir, --mirror, --precisions, --quiet; `convnext serve --pretrained NAME --help`).")


def _json_list(text: str) -> list:
    """A JSON list, as in the environment: --cors-origins '["https://app.example"]'."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list; write e.g. '[\"https://app.example\"]'")
    return value


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")


def flag_name(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name.replace("_", "-"))


def flag_type(field: FieldInfo) -> tuple[Callable[[str], object], str]:
    """The argparse type of a setting and its metavar, from its annotation (Optional stripped).

    A Literal's choices are shown, not enforced here: the Settings check them, with the same one-line error as for
    an environment variable."""
    annotation = field.annotation
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Literal:
        return str, "{" + ",".join(map(str, get_args(annotation))) + "}"
    if get_origin(annotation) is list:
        return _json_list, "JSON_LIST"
    if annotation is bool:
        return _boolean, "{true,false}"
    if annotation in (int, float, str):
        return annotation, annotation.__name__.upper()  # type: ignore[return-value]  # int/float/str parse a str
    raise TypeError(f"no command-line type for {field.annotation}; add one to service/__main__.py")


def flag_help(name: str, field: FieldInfo) -> str:
    default = None if field.default_factory else field.get_default()  # a factory's default: in its description
    if isinstance(default, list | bool):
        default = json.dumps(default)  # as the environment and the flag write it
    shown = "" if default is None else f"; default: {default}"
    # argparse formats help with %: a literal % in a description must be doubled.
    return f"{field.description} (env CONVNEXT_{name.upper()}{shown})".replace("%", "%%")


def get_args_parser() -> argparse.ArgumentParser:
    """One flag per Settings field (its description, type and default), secrets excepted."""
    secrets = "\n".join(textwrap.fill(f"CONVNEXT_{name.upper()}: {Settings.model_fields[name].description}",
                                       subsequent_indent="  ") for name in SECRET_SETTINGS)
    parser = CliParser(prog=PROG, description=__doc__, allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Every flag overrides its CONVNEXT_<NAME> environment variable.\nEnvironment only "
                              f"(a command line is visible to every user of the host):\n{secrets}\n\n"
                              f"{textwrap.fill(EXPORT_FIRST_HELP)}".replace("%", "%%"))
    add_version_argument(parser)
    for name, field in Settings.model_fields.items():
        if name in SECRET_SETTINGS:
            continue
        type_, metavar = flag_type(field)
        parser.add_argument(flag_name(name), dest=name, type=type_, metavar=metavar, default=None,
                            help=flag_help(name, field))
    return parser


def settings_from_args(argv: list[str] | None) -> Settings:
    args = get_args_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def settings_error(err: ValidationError) -> str:
    """One line: `port: Input should be less than or equal to 65535; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in err.errors())


class StartRefused(Exception):
    """The service would not start with these arguments; `status` is the exit status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def startable_settings(argv: list[str]) -> Settings:
    """The settings, and the HTTP and gRPC ports they name free: what would otherwise fail a start only at its end,
    after the model loaded (minutes for a TensorRT build) or, from `convnext serve --pretrained`, after a download
    and an export. StartRefused: 2 for invalid settings, 3 for a taken port (as uvicorn's own failure to bind)."""
    from service.server import check_ports_free

    try:
        settings = settings_from_args(argv)
    except ValueError as err:  # pydantic's ValidationError, or pydantic-settings' error for an unparsable variable
        detail = settings_error(err) if isinstance(err, ValidationError) else one_line(err)
        raise StartRefused(2, f"invalid settings: {detail}") from None
    try:
        check_ports_free(settings)
    except OSError as err:
        raise StartRefused(3, one_line(err)) from None
    return settings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from service.doctor import main as doctor_main

        return doctor_main(argv[1:])
    if any(arg.split("=")[0] in EXPORT_FIRST_FLAGS for arg in argv):  # `python -m service`, not `convnext serve`
        print("python -m service: error: --pretrained and --checkpoint are `convnext serve`'s (it downloads or "
              "exports the model first, then starts this service): run convnext serve "
              f"{' '.join(argv)} (or python -m convnext_cli serve ...)", file=sys.stderr)
        return 2
    try:
        settings = startable_settings(argv)
    except StartRefused as refused:
        print(f"{prog_name(PROG)}: error: {refused}", file=sys.stderr)
        return refused.status
    from service.app import check_servable, create_app
    from service.grpc_server import PROBE_CONNECTIONS
    from service.open_files import raise_open_files_limit
    from service.server import Server, uvicorn_config

    if (short := raise_open_files_limit(settings, PROBE_CONNECTIONS)) is not None:
        print(f"{prog_name(PROG)}: warning: {short}", file=sys.stderr)

    try:
        check_servable(settings)
    except (RepositoryError, RuntimeError) as err:
        print(f"{prog_name(PROG)}: error: {one_line(err)}", file=sys.stderr)
        return 1
    # The service refuses a picture over max_pixels itself (at most Pillow's limit: runtime.preprocess.check_pixels),
    # after Image.open, which warns first for one over Pillow's limit: as a warning, a line in the log and an entry in
    # PIL.Image's warning registry for each size a client sends. This process decodes for the service only.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    server = Server(uvicorn_config(create_app(settings), settings))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 3  # 3: uvicorn's start-up failure status (e.g. the model did not load)


if __name__ == "__main__":
    raise SystemExit(exit_status(main))
