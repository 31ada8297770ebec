"""What a failed or stuck rank leaves behind, in the run directory.

- A failure: `<out>/errors/rank<N>.txt` (host, pid, time, the one-line reason, the traceback),
  and torchelastic's error file when torchrun set one (TORCHELASTIC_ERROR_FILE), so its failure
  summary shows the exception and traceback instead of `error_file: <N/A>`.
- A hang: if a rank makes no progress for --timeout-s minus a margin, faulthandler writes all
  its threads' Python stacks to `<out>/errors/rank<N>-stacks.txt` before the collective times
  out: the evidence of where every rank waited, taken while they still wait. Empty files are
  removed at a clean end. On NCCL the flight recorder dumps into the same folder on a timeout.
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import time
import traceback


def errors_dir(out: str) -> str:
    return os.path.join(out, "errors")


def _rank() -> str:
    return os.environ.get("RANK", "0")


def record_failure(exc: BaseException, message: str, out: str | None) -> str | None:
    """Write the failure's report; returns its path (None when --out does not exist: a run that
    never started has no directory to litter). Never raises: this runs while failing."""
    stack = "".join(traceback.format_exception(exc))
    path = None
    if out and os.path.isdir(out):
        path = os.path.join(errors_dir(out), f"rank{_rank()}.txt")
        try:
            os.makedirs(errors_dir(out), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(f"rank {_rank()} on {socket.gethostname()}, pid {os.getpid()}, "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n{message}\n\n{stack}")
        except OSError:
            path = None
    elastic = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if elastic:  # torchelastic's own format (errors/error_handler.py): the summary prints it
        reason = message + (f" (report: {path})" if path else "")
        # torchrun's summary prints the call stack: the reason goes last in it, where one looks.
        report = {"message": {"message": reason, "extraInfo": {"py_callstack": f"{stack}\n{reason}",
                                                                "timestamp": str(int(time.time()))}}}
        try:
            with open(elastic, "w") as fh:
                json.dump(report, fh)
        except OSError:
            pass
    return path


def nccl_flight_recorder(out: str) -> None:
    """On NCCL: keep the last collectives of each rank and dump them here on a timeout, unless
    the user configured the recorder. Read by torch when the process group is created."""
    os.makedirs(errors_dir(out), exist_ok=True)  # torch writes the dumps there, but makes no folder
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", os.path.join(errors_dir(out), "nccl_trace_rank_"))


class HangWatch:
    """Dumps every thread's stack once this rank has shown no progress (beat()) for `after_s`."""

    def __init__(self, out: str, timeout_s: float):
        # The margin leaves time to write before the collective's own timeout ends the process.
        self.after_s = max(1.0, timeout_s - min(30.0, timeout_s / 4))
        self.path = os.path.join(errors_dir(out), f"rank{_rank()}-stacks.txt")
        os.makedirs(errors_dir(out), exist_ok=True)
        # Appended, never truncated: a restarted attempt must not wipe the last one's evidence.
        self.file = open(self.path, "a")  # noqa: SIM115 - faulthandler writes to it from its own thread
        self.armed_at = 0.0
        self.beat(force=True)

    def beat(self, force: bool = False) -> None:
        """Progress. Re-arming starts a thread, so it happens at most every few seconds; the
        dump then comes between after_s and after_s + 5 s after the last real progress."""
        now = time.monotonic()
        if force or now - self.armed_at >= min(5.0, self.after_s / 4):
            faulthandler.dump_traceback_later(self.after_s, repeat=False, file=self.file, exit=False)
            self.armed_at = now

    def beating(self, batches):
        """`batches`, with a beat for each (a long evaluation is progress, not a hang)."""
        for batch in batches:
            self.beat()
            yield batch

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self.file.close()
        try:
            if os.path.getsize(self.path) == 0:
                os.remove(self.path)
                os.rmdir(errors_dir(os.path.dirname(os.path.dirname(self.path))))
        except OSError:
            pass  # the folder holds other ranks' files, or evidence
