"""Several ranks inside one test session: N spawned processes join one gloo process group once,
then run functions on every rank, `world.run(fn, *args)` -> the results by rank.

A rank costs about 3 s to start (importing torch), so one world serves a whole session
(tests/conftest.py: the `gloo_world` fixture). The functions travel by name: define them at
module level. The ranks inherit the session's sys.path, so `tests.unit.test_x._fn` imports
there as it does in the test. Arguments and results are pickled (tensors included).

Nothing waits without a bound. A rank that raises comes back as WorldError with its traceback;
its peers then get a few seconds (they may wait in a collective it never joined). A rank that
does not answer in time has its stacks dumped into the error and is killed with the others, and
the next run() starts a fresh world. Each rank's stdout and stderr go to a log in `self.logs`.
"""
from __future__ import annotations

import faulthandler
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path

HOST = "127.0.0.1"


class WorldError(RuntimeError):
    """A rank raised, died or did not answer; the message holds each such rank's evidence."""


class World:
    def __init__(self, size: int = 2, start_timeout_s: float = 120.0, grace_s: float = 5.0):
        self.size, self.start_timeout_s, self.grace_s = size, start_timeout_s, grace_s
        self.logs = Path(tempfile.mkdtemp(prefix="gloo-world-"))
        self.procs: list = []
        self.conns: list[Connection] = []
        self.store = None  # the rendezvous store, served by this process while the world lives
        self.starts = 0

    # --- life ---------------------------------------------------------------------------------
    def start(self) -> World:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        self.close_ranks()
        # A socket bound to loopback, port chosen by the kernel: no race for a "free" port, and
        # the store listens on 127.0.0.1 only (a TCPStore given a host still binds every interface).
        listener = socket.create_server((HOST, 0))
        port = listener.getsockname()[1]
        self.store = dist.TCPStore(HOST, port, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=self.start_timeout_s), master_listen_fd=listener.detach())
        self.starts += 1
        ctx = mp.get_context("spawn")
        for rank in range(self.size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, name=f"world-rank{rank}", daemon=True,
                               args=(rank, self.size, port, theirs, str(self.logs), self.start_timeout_s))
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)
        replies = self._collect(self.start_timeout_s)
        if any(kind != "ok" for kind, _ in replies):
            self._kill()
        self._raise_unless_ok(replies, "starting the world")
        return self

    def close_ranks(self) -> None:
        """Ask every rank to leave the group and exit; kill what has not within 5 s."""
        for conn in self.conns:
            try:
                conn.send_bytes(b"close")
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    def close(self) -> None:
        self.close_ranks()
        shutil.rmtree(self.logs, ignore_errors=True)

    def __enter__(self) -> World:  # noqa: PYI034 - typing.Self needs Python 3.11; the package supports 3.10
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self.store = [], [], None

    # --- work ---------------------------------------------------------------------------------
    def run(self, fn, *args, timeout_s: float = 60.0, **kwargs) -> list:
        """fn(*args, **kwargs) on every rank at once; its results, by rank."""
        if not self.procs:
            self.start()
        job = pickle.dumps((fn, args, kwargs))
        for conn in self.conns:
            try:
                conn.send_bytes(job)
            except OSError:
                pass  # that rank is gone: _collect reports how it died
        replies = self._collect(timeout_s)
        self._raise_unless_ok(replies, f"{getattr(fn, '__qualname__', fn)} on {self.size} ranks")
        return [value for _, value in replies]

    def _collect(self, timeout_s: float) -> list[tuple[str, object]]:
        """One reply per rank: ("ok", value), ("error", traceback), ("died", why) or ("hung", stacks)."""
        replies: dict[int, tuple[str, object]] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < self.size:
            left = deadline - time.monotonic()
            waiting = [r for r in range(self.size) if r not in replies]
            ready = wait([self.conns[r] for r in waiting] + [self.procs[r].sentinel for r in waiting], max(0.0, left))
            if not ready and left <= 0:
                break
            for rank in waiting:
                conn, proc = self.conns[rank], self.procs[rank]
                if conn in ready or (proc.sentinel in ready and conn.poll()):
                    try:
                        replies[rank] = pickle.loads(conn.recv_bytes())
                    except EOFError:
                        replies[rank] = ("died", self._died(rank))
                elif proc.sentinel in ready:
                    replies[rank] = ("died", self._died(rank))
            if any(kind != "ok" for kind, _ in replies.values()):
                # A peer of a failed rank may wait in a collective that rank never joined.
                deadline = min(deadline, time.monotonic() + self.grace_s)
        hung = [r for r in range(self.size) if r not in replies]
        for rank in hung:
            replies[rank] = ("hung", self._stacks(rank, timeout_s))
        if hung or any(kind == "died" for kind, _ in replies.values()):
            self._kill()  # the group is broken: the next run() starts a fresh world
        return [replies[r] for r in range(self.size)]

    def _raise_unless_ok(self, replies: list[tuple[str, object]], what: str) -> None:
        bad = [f"--- rank {rank} {kind}:\n{text}" for rank, (kind, text) in enumerate(replies) if kind != "ok"]
        if bad:
            raise WorldError(f"{what} failed:\n" + "\n".join(bad))

    def _died(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(2)
        return f"exit code {proc.exitcode}; the end of its log:\n{_tail(self.logs / f'rank{rank}.log')}"

    def _stacks(self, rank: int, timeout_s: float) -> str:
        path = self.logs / f"rank{rank}-stacks.txt"
        try:
            os.kill(self.procs[rank].pid, signal.SIGUSR1)  # faulthandler writes every thread's stack
        except OSError:
            pass
        for _ in range(20):
            time.sleep(0.05)
            if path.exists() and path.stat().st_size:
                time.sleep(0.1)  # let it finish the other threads
                break
        return f"no answer within {timeout_s:g} s; its stacks:\n{_tail(path)}"


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"({exc})"


def _rank_main(rank: int, size: int, port: int, conn: Connection, logs: str, timeout_s: float) -> None:
    """One rank: join the group, then run what arrives until told to close."""
    log = open(os.path.join(logs, f"rank{rank}.log"), "w")  # noqa: SIM115 - open for the process's life
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    stacks = open(os.path.join(logs, f"rank{rank}-stacks.txt"), "w")  # noqa: SIM115 - as above
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    # What a launcher hands a rank (process_group.detect reads it), one thread each (2 cores
    # for the session), and gloo's pairs on loopback.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR=HOST, MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timedelta(seconds=60))
        reply = ("ok", os.getpid())
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send_bytes(pickle.dumps(("error", "".join(traceback.format_exception(exc)))))
        return
    conn.send_bytes(pickle.dumps(reply))
    while True:
        try:
            job = conn.recv_bytes()
        except (EOFError, OSError):
            break  # the parent is gone
        if job == b"close":
            break
        try:
            fn, args, kwargs = pickle.loads(job)
            reply = pickle.dumps(("ok", fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - the test's failure, sent back with its traceback
            reply = pickle.dumps(("error", "".join(traceback.format_exception(exc))))
        conn.send_bytes(reply)
    dist.destroy_process_group()
    # Skip the interpreter's teardown of torch (a second or more of CPU on a busy machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
