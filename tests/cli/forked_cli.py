"""`python tests/cli/forked_cli.py RUNS.json`: run many `python -m <module> <args>` invocations for the CLI tests, each
in a process of its own, forked from this one after it has imported the heavy packages once.

Importing torch costs ~3 s of every CLI process on 2 cores, and the CLI tests start ~70 of them. Each fork here runs
its module as `python -m` does (runpy, as `__main__`, with sys.argv set), in its own working directory and
environment, with its stdout and stderr in files; its exit status follows Python's rules (SystemExit's code, 1 and a
traceback on stderr for an uncaught exception), and it ends as the interpreter would: its non-daemon threads joined
(one still running after THREADS_JOIN_S is reported on stderr, status 1: a real process would hang there), then its
atexit handlers run. Each run is killed (SIGALRM) after RUN_TIMEOUT_S. Anything the preloaded imports print goes to
this process's stderr, which the tests require empty (a real run would have printed it). RUNS.json is a list of
{"module", "args", "cwd", "env"}; the results ({"returncode", "stdout", "stderr"} each, in order) are written to
RUNS.json's path + ".out".
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import runpy
import signal
import sys
import threading
import traceback
from pathlib import Path

PRELOADED = ("numpy", "PIL.Image", "torch", "torchvision", "onnx", "onnxruntime", "httpx")
RUN_TIMEOUT_S = 300
THREADS_JOIN_S = 60.0


def exit_status(code: object) -> int:
    """The process's exit status for SystemExit(code), as the interpreter gives it (and prints a message code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_in_child(module: str, args: list[str]) -> int:
    sys.argv = [module, *args]  # run_module(alter_sys=True) puts the module's file first, as `python -m` does
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as done:
        return exit_status(done.code)
    except BaseException:
        traceback.print_exc()
        return 1


def finish_as_the_interpreter_would(status: int) -> int:
    """Join the non-daemon threads (bounded), then run the atexit handlers; the status to exit with."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(THREADS_JOIN_S)
            if thread.is_alive():
                print(f"forked_cli: thread {thread.name!r} still running {THREADS_JOIN_S:g} s after the module "
                      "returned: a real process would not exit", file=sys.stderr)
                return 1
    atexit._run_exitfuncs()
    logging.shutdown()
    return status


def run(module: str, args: list[str], cwd: str, env: dict[str, str], output: Path) -> dict:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: leaves only through os._exit, never back into the caller's loop
        status = 1
        try:
            signal.alarm(RUN_TIMEOUT_S)  # SIGALRM's default action ends the child: a run that hangs fails alone
            os.chdir(cwd)
            sys.path[0] = cwd  # `python -m` puts the working directory first (this script put its own folder there)
            os.environ.clear()
            os.environ.update(env)
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(output.with_suffix(f".{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            status = finish_as_the_interpreter_would(run_in_child(module, args))
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    return {"returncode": os.waitstatus_to_exitcode(wait_status),
            "stdout": output.with_suffix(".stdout").read_text(errors="replace"),
            "stderr": output.with_suffix(".stderr").read_text(errors="replace")}


def main(runs_path: Path) -> None:
    import importlib

    for name in PRELOADED:
        importlib.import_module(name)
    runs = json.loads(runs_path.read_text())
    results = [run(r["module"], r["args"], r["cwd"], r["env"], runs_path.with_name(f"run{i}")) for i, r in
               enumerate(runs)]
    Path(f"{runs_path}.out").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
