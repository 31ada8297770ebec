"""The run directory: created and writable before anything else, and one writer at a time.

Two runs started on one --out would resume from each other's checkpoints, delete each other's
temporary files and interleave metrics.jsonl. Rank 0 holds an OS lock on `<out>/.lock` for the
run's whole life, so a second run is refused in one line naming the holder.

The lock is flock(2): the kernel releases it when the holding process ends, however it ends, so
a lock left by a crashed or killed run never blocks a resume. On a local disk that is exact. On
NFS (Linux clients turn flock into NFS byte-range locks) it holds across nodes too, but a node
that crashed keeps its lock until the server's lease expires (NFSv4: 90 s by default), and a
resume before that is refused with the dead holder named. Filesystems without locks (some
FUSE mounts) report an error: the run then goes on, with a warning, unprotected.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time

from distributed_step.config import ConfigError

log = logging.getLogger("distributed_step")
LOCK_NAME = ".lock"


def prepare(out: str) -> None:
    """Create --out; ConfigError naming it when that fails or it is not writable."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the run directory ({exc.strerror}){_whose(out, exc)}") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {out}: the run directory is not writable{_whose(out, None)}")


def _whose(out: str, exc: OSError | None) -> str:
    """For a permission error: who we are and who owns the nearest existing folder. A shared
    volume in Kubernetes often ignores fsGroup and stays root-owned (docs/kubernetes.md)."""
    if exc is not None and exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    folder = os.path.abspath(out)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        info = os.stat(folder)
    except OSError:
        return ""
    return (f" as uid {os.getuid()} gid {os.getgid()}; {folder} is owned by uid {info.st_uid} gid {info.st_gid}, "
            f"mode {stat.S_IMODE(info.st_mode):o}: make it writable for this uid (on Kubernetes most shared volumes "
            "ignore fsGroup: docs/kubernetes.md)")


class RunLock:
    """Held by rank 0 from start to exit; `acquire()` returns an error message, or None."""

    def __init__(self, out: str):
        self.path, self.fd = os.path.join(out, LOCK_NAME), None

    def acquire(self) -> str | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return (f"--out {os.path.dirname(self.path)}: another run is writing here ({holder}); "
                    "wait for it to end, or choose another --out")
        except OSError as exc:  # no locks on this filesystem: warn, do not refuse
            log.warning("--out %s: cannot lock the run directory (%s); nothing stops a second run from "
                        "writing here", os.path.dirname(self.path), exc.strerror)
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        self.fd = fd  # kept open: closing it would release the lock
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the kernel drops the flock with the last descriptor
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
