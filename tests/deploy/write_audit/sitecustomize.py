"""Records every filesystem write a Python process (and each Python process it starts) makes, for
tests/deploy/test_deploy_writable_paths.py: on PYTHONPATH, with WRITE_AUDIT_LOG naming the log to append to.

Audit hooks (PEP 578) see what Python code opens for writing, creates, renames or removes; not native libraries'
own writes, which the test covers from what they are known to write.
"""
import os
import sys

LOG = os.environ.get("WRITE_AUDIT_LOG")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# event -> the index of the path written in its arguments (docs.python.org "Audit events table")
PATH_EVENTS = {"os.mkdir": 0, "os.rename": 1, "os.replace": 1, "os.remove": 0, "os.rmdir": 0, "os.symlink": 1,
               "os.link": 1, "os.truncate": 0, "os.chmod": 0, "os.chown": 0, "os.utime": 0, "os.mkfifo": 0,
               "os.mknod": 0, "tempfile.mkstemp": 0, "tempfile.mkdtemp": 0, "shutil.copyfile": 1,
               "shutil.rmtree": 0, "socket.bind": 1}
DIR_FD = {"os.mkdir": 2, "os.remove": 1, "os.rmdir": 1, "os.chmod": 2, "os.chown": 3, "os.utime": 3}


def written_path(event: str, args: tuple) -> str | None:
    if event == "open":
        path, _mode, flags = args
        if not flags & WRITE_FLAGS:
            return None
    elif event in PATH_EVENTS:
        path = args[PATH_EVENTS[event]]
    else:
        return None
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None  # a file descriptor, or a socket's (host, port)
    path = os.fsdecode(path)
    dir_fd = args[DIR_FD[event]] if event in DIR_FD and len(args) > DIR_FD[event] else None
    if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.abspath(path)


def record(event: str, args: tuple) -> None:
    path = written_path(event, args)
    if path is not None:  # one write(2) per line on an O_APPEND descriptor: lines of concurrent processes stay whole
        os.write(LOG_FD, f"{os.getpid()}\t{event}\t{path}\n".encode(errors="surrogateescape"))


if LOG:
    LOG_FD = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.addaudithook(record)
