"""`python -m service` / `convnext serve`: serve the model repository with uvicorn (graceful on SIGTERM)."""
from __future__ import annotations

import argparse
import sys

from service.settings import Settings


def _flag_type(name: str):
    """The argparse type of a setting: its default's type (None defaults: version is an int, model a str)."""
    field = Settings.model_fields[name]
    default = field.get_default(call_default_factory=True)
    if default is None:
        return int if name == "version" else str
    return type(default)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convnext serve", description=__doc__,
                                     epilog="Every flag overrides its CONVNEXT_<NAME> environment variable.")
    for name in Settings.model_fields:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_flag_type(name), default=None,
                            help=f"(env CONVNEXT_{name.upper()})")
    return parser


def settings_from_args(argv: list[str] | None) -> Settings:
    args = get_args_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from service.app import create_app

    try:
        settings = settings_from_args(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"convnext serve: invalid settings:\n{err}", file=sys.stderr)
        return 2
    app = create_app(settings)
    # uvicorn stops accepting on SIGTERM, waits for in-flight requests, then runs the lifespan shutdown,
    # which drains the batcher.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=int(settings.request_timeout_ms / 1000) + 5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
