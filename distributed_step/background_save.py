"""Periodic checkpoints off the step's path: staged, then written by a thread.

With recovery from the replicas (recovery.py), a periodic checkpoint only guards against losing
every rank at once, so it should cost the steps as little as possible. At the step's end rank 0
copies the state to host memory (the only part on the step's path) and a thread writes it the
usual way: atomically, then keeping the newest K. One write at a time: the next save, the final
one, or a survivor's first waits for it; its outcome (the path, or why it failed) is what the
next save tells every rank, so a failed write still stops the run with its reason, one interval
later. A process that ends waits for the thread (it is not a daemon); a SIGKILL during the write
leaves a temporary file, and the previous checkpoint stays the newest valid one.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

from distributed_step import checkpoint as ckpt

log = logging.getLogger("distributed_step")


def staged(value):
    """A copy of `value` whose tensors live in host memory and share nothing with the run."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: staged(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(staged(v) for v in value)
    return value


class CheckpointWriter:
    """Rank 0's checkpoint writes, in the foreground or in the background (above)."""

    def __init__(self, out: str, keep: int):
        self.out, self.keep = out, keep
        self.thread: threading.Thread | None = None
        self.outcome: tuple[int, str | None, str | None] = (-1, None, None)  # (step, path, error) of the last

    def save(self, state_dict, step: int, background: bool) -> tuple[list[tuple[str, int]], str | None]:
        """Wait for the write under way, then save `state_dict()` of `step`. Returns the
        checkpoints written since the last call, as (path, step), and the error that stops the
        run, if any: a failed write, this one's or the one in the background."""
        written, error = self._wait_written()
        if error:
            return written, error
        began = time.perf_counter()
        if background:
            copy = staged(state_dict())
            self.thread = threading.Thread(target=self._write, args=(copy,), name="checkpoint-writer")
            self.thread.start()
            log.info("staged step %d in %.3f s; writing it in the background", step, time.perf_counter() - began)
            return written, None
        self._write(state_dict())
        if self.outcome[1]:
            log.info("saved %s in %.2f s", self.outcome[1], time.perf_counter() - began)
        more, error = self._written()
        return written + more, error

    def finish(self) -> int | None:
        """Wait for the write under way; the step it put on disk, or None if it failed or none ran."""
        written, _ = self._wait_written()
        return written[-1][1] if written else None

    def _write(self, state: dict) -> None:
        try:
            self.outcome = (state["step"], ckpt.save_checkpoint(state, self.out, self.keep), None)
        except OSError as exc:
            self.outcome = (state["step"], None, exc.strerror or str(exc))

    def _wait_written(self) -> tuple[list[tuple[str, int]], str | None]:
        if self.thread is None:
            return [], None
        self.thread.join()
        self.thread = None
        return self._written()

    def _written(self) -> tuple[list[tuple[str, int]], str | None]:
        step, path, error = self.outcome
        self.outcome = (-1, None, None)
        if error:
            return [], (f"--out {self.out}: could not save the checkpoint of step {step} ({error}); "
                        "the newest good checkpoint is kept")
        return ([(path, step)] if path else []), None
