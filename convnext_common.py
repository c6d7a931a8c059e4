"""What every command line of the project shares: `--version` (from the installed metadata), one-line errors, and
the CPUs a process may use (the service's thread defaults, and the benches that pin them)."""
from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "convnext-serve"


def project_version() -> str:
    """The installed convnext-serve version (pyproject.toml is the one place it is written)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "0+unknown"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: `taskset`, a container's cpuset), not the machine's count.
    A CPU quota (docker --cpus, a k8s limit) is not a mask: set intra_op_threads / preprocess_workers to it."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# How the user ran the command a package's CLI serves, when the `convnext` front handed it over in this process:
# (the front's words, the module's words), e.g. ("convnext serve", "python -m service").
_front: list[tuple[str, str]] = []


def run_from_front(front_words: str, module_words: str) -> None:
    """The `convnext` front calls this before it hands `module_words`'s CLI the rest of the command line."""
    _front[:] = [(front_words, module_words)]


def prog_name(prog: str) -> str:
    """`prog` (written as its module runs it: "python -m bench cpu") as the user typed it: "convnext bench cpu" when
    the `convnext` front ran it, so usage lines and one-line errors name the command the user can run again."""
    if _front:
        front_words, module_words = _front[0]
        if prog == module_words or prog.startswith(module_words + " "):
            return front_words + prog[len(module_words):]
    return prog


def version_text() -> str:
    return f"convnext-serve {project_version()}"


def one_line(message: object) -> str:
    """A message on one line: multi-line texts (e.g. pydantic's) joined with '; '."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


class CliParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (`<prog>: error: ...`, pointing at --help), not the usage; `prog`
    is written as the module runs it and shown as the user ran it (prog_name)."""

    def __init__(self, prog: str | None = None, **kwargs):
        super().__init__(prog=None if prog is None else prog_name(prog), **kwargs)
        # A value in exponent notation is a value: Python 3.11's argparse takes "-1e-6" for an option (its pattern of
        # negative numbers has no exponent), so `--layer-scale-init -1e-6` failed "expected one argument" before the
        # flag's own check could say what is wrong with the value.
        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def whole_number(text: str) -> int:
    """An argparse value as an int, or the usage error that says it is not one."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type of a count (iterations, threads, a batch size): a whole number >= 1, refused as a usage error
    rather than failing later inside the run (percentiles of no timings, a pool of no threads)."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_number(text: str) -> float:
    """argparse type of a rate or a duration: a finite number > 0 (a rate of 0 would read as "no rate"), refused as a
    usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def add_version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=version_text(),
                        help="print the project version and exit")


def exit_status(main: Callable[[], int | None]) -> int:
    """Run a CLI's `main` as the process's last act; its exit status. A reader that stops early (`... | head`) ends it
    quietly with 141, as a shell reports SIGPIPE, not with a BrokenPipeError traceback."""
    try:
        status = main() or 0
        sys.stdout.flush()  # here, where the error can be caught, not in the interpreter's flush at exit
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush of what is left goes nowhere
        return 141


def exit_on_expected_errors(prog: str, expected: tuple[type[BaseException], ...]):
    """Decorate a CLI `main`: an `expected` error prints `<prog>: error: <message>` to stderr and returns 1;
    Ctrl-C returns 130. Anything else is a bug and keeps its traceback."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except BrokenPipeError:  # the reader of stdout left (`| head`): not the command's error (exit_status)
                raise
            except expected as error:
                print(f"{prog_name(prog)}: error: {one_line(error) or type(error).__name__}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print(f"{prog_name(prog)}: interrupted", file=sys.stderr)
                return 130

        return wrapped

    return decorate
