"""`python -m service` / `convnext serve`: serve the model repository with uvicorn (graceful on SIGTERM).

`python -m service doctor` checks the GPU host instead (service/doctor.py).
"""
from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from convnext_common import CliParser, add_version_argument, one_line
from runtime.repository import ModelRepository, RepositoryError
from service.settings import Settings

# No flag for these: a command line is visible to every user of the host (ps, /proc); use the environment or a file.
SECRET_SETTINGS = ("api_key",)
# `--version` prints the project version, so the `version` setting (which model version to serve) is --model-version;
# its environment variable stays CONVNEXT_VERSION.
FLAG_NAMES = {"version": "model-version"}


def _flag_type(name: str):
    """The argparse type of a setting: its default's type (None defaults: version is an int, model a str)."""
    field = Settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if default is None:
        return int if name == "version" else str
    if isinstance(default, list):
        return _json_list
    if isinstance(default, bool):
        return _boolean
    return type(default)


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


def get_args_parser() -> argparse.ArgumentParser:
    parser = CliParser(prog="convnext serve", description=__doc__, allow_abbrev=False,
                       epilog="Every flag overrides its CONVNEXT_<NAME> environment variable.")
    add_version_argument(parser)
    for name in Settings.model_fields:
        if name in SECRET_SETTINGS:
            continue
        flag = "--" + FLAG_NAMES.get(name, name.replace("_", "-"))
        parser.add_argument(flag, dest=name, type=_flag_type(name), default=None,
                            help=f"(env CONVNEXT_{name.upper()})")
    return parser


def settings_from_args(argv: list[str] | None) -> Settings:
    args = get_args_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def settings_error(err: ValidationError) -> str:
    """One line: `port: Input should be less than or equal to 65535; ...`."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())


def check_repository(settings: Settings) -> None:
    """Fail before the server starts, in one line, when there is nothing servable (else uvicorn logs a traceback)."""
    from service.model_manager import load_model_version

    load_model_version(ModelRepository(settings.repository), settings.model, settings.version)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from service.doctor import main as doctor_main

        return doctor_main(argv[1:])
    import uvicorn

    from service.app import create_app
    from service.server import uvicorn_config

    try:
        settings = settings_from_args(argv)
    except ValueError as err:  # pydantic's ValidationError, or pydantic-settings' error for an unparsable variable
        detail = settings_error(err) if isinstance(err, ValidationError) else one_line(err)
        print(f"convnext serve: error: invalid settings: {detail}", file=sys.stderr)
        return 2
    try:
        check_repository(settings)
    except (RepositoryError, RuntimeError) as err:
        print(f"convnext serve: error: {one_line(err)}", file=sys.stderr)
        return 1
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 3  # 3: uvicorn's start-up failure status (e.g. the model did not load)


if __name__ == "__main__":
    raise SystemExit(main())
