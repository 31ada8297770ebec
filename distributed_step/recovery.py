"""When a peer dies, the survivors already hold the last finished step: save it, then exit.

In data parallelism every rank holds the whole state after every step (weights, momentum,
scheduler, step counter), so a dead rank costs no more than the step it interrupted, if a
survivor writes that state down before the launcher tears the group down. When a collective
fails because another rank died or stopped answering, each survivor:

- puts BatchNorm's running statistics back as they were before the interrupted step's forward
  (the forward moved them; nothing else of that step reached the state, since the optimizer
  only runs once backward's all-reduce has completed on this rank), then takes rank 0's, which
  every step sends after its forward (parallel/rank0_statistics.py): the run's statistics are
  rank 0's, so a survivor of rank 0's death saves those rather than its own. Only where rank 0
  died before sending them does the survivor save its own, and it says so;
- checks that the weights are finite;
- claims the write through the rendezvous store while it answers, so that one survivor writes
  each step. Rank 0 goes first and the others give it a moment: evaluation and model.pt use
  rank 0's running statistics. Where the store is gone with its host, every survivor writes
  its own candidate, atomically and under the same name: whichever lands last is a whole file;
- writes the checkpoint atomically into --out, then lets the failure end the process as before.
  The launcher restarts the group, which resumes from it.

The save must fit in the launcher's grace: torchrun sends SIGTERM to the survivors when it sees a
rank die and SIGKILL 30 s later; Kubernetes gives the pod's terminationGracePeriodSeconds. A save
cut off there leaves only a temporary file: the newest whole checkpoint stays the one resume picks.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta

import torch
from torch import nn

from distributed_step import checkpoint as ckpt
from distributed_step.parallel.rank0_statistics import Rank0Statistics

log = logging.getLogger("distributed_step")

RANK_ZERO_FIRST_S = 1.0  # how long the other survivors leave rank 0 to claim the write
STORE_TIMEOUT_S = 5.0  # an answer from a store that is still up comes in milliseconds


class Survivor:
    """What a rank keeps so that it can save the last finished step when a peer dies: the
    running statistics of before each forward, rank 0's as they arrive, and whether a step is
    under way. `model`: the outermost module (the statistics are sent after its forward)."""

    def __init__(self, env, net: nn.Module, model: nn.Module, running_step, carry_statistics: bool):
        self.env, self.net, self.in_step = env, net, False
        self.snapshot = BufferSnapshot(net)
        self.rank0 = Rank0Statistics(env, self.snapshot.floating if carry_statistics else [])
        self.rank0.attach(model, running_step)

    def close(self) -> None:
        self.rank0.detach()

    def step_begins(self) -> None:
        self.snapshot.take()
        self.in_step = True

    def step_ends(self) -> None:
        self.in_step = False

    def save(self, state_dict, step: int, saved_step: int, out: str, keep: int) -> str | None:
        return save_for_restart(state_dict, self.net, self.snapshot, self.in_step, step, saved_step, self.env,
                                out, keep, self.rank0.of_step(step))


class BufferSnapshot:
    """BatchNorm's running statistics as they were before the step's forward, in tensors made
    once: taking them is one multi-tensor copy per step."""

    def __init__(self, module: nn.Module):
        self.live = list(module.buffers())
        self.saved = [b.detach().clone() for b in self.live]
        self.floating = [b for b in self.live if b.is_floating_point()]  # the running statistics

    def adopt(self, flat: torch.Tensor) -> None:
        """Take `flat`, the floating buffers laid end to end (rank 0's, from the step flags)."""
        with torch.no_grad():
            for buffer, values in zip(self.floating, flat.split([b.numel() for b in self.floating])):
                buffer.copy_(values.view_as(buffer))

    def take(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.saved, self.live)

    def restore(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.live, self.saved)


def claim_write(store, step: int, rank: int) -> bool:
    """Whether this survivor writes the checkpoint of `step`: the first to claim it in the store,
    rank 0 first. Without an answering store, every survivor writes its own candidate."""
    if store is None:
        return True
    if rank != 0:
        time.sleep(RANK_ZERO_FIRST_S)
    try:
        store.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
        winner = store.compare_set(f"distributed_step/survivor_save/{step}", "", str(rank))
    except Exception as exc:  # noqa: BLE001 - a dead store raises whatever its transport does
        log.warning("rank %d: the store does not answer (%s); writing this rank's own candidate",
                    rank, str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
        return True
    return winner.decode() == str(rank)


def save_for_restart(state_dict, net: nn.Module, snapshot: BufferSnapshot, interrupted: bool, step: int,
                     saved_step: int, env, out: str, keep: int, rank0_buffers: torch.Tensor | None) -> str | None:
    """The survivor's part (see above): the path written, or None where another survivor writes,
    the step is on disk already, or the state is not worth a file. `rank0_buffers`: rank 0's
    running statistics after `step`, where they arrived."""
    if interrupted:
        snapshot.restore()  # the interrupted step's forward had moved them
    if rank0_buffers is not None:
        snapshot.adopt(rank0_buffers)
    elif env.rank != 0 and snapshot.floating:
        log.warning("rank %d: rank 0's BatchNorm statistics of step %d never arrived; saving this rank's own",
                    env.rank, step)
    if saved_step == step:
        log.warning("rank %d: a peer failed; the last finished step, %d, is on disk already", env.rank, step)
        return None
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        log.error("rank %d: the weights of step %d are not finite; nothing saved", env.rank, step)
        return None
    if not claim_write(env.store, step, env.rank):
        log.info("rank %d: another survivor writes step %d", env.rank, step)
        return None
    began = time.perf_counter()
    try:
        path = ckpt.save_checkpoint(state_dict(), out, keep, tidy=False)
    except OSError as exc:
        log.error("rank %d: could not save step %d after a peer failed (%s)", env.rank, step, exc.strerror or exc)
        return None
    log.warning("rank %d: a peer failed; saved the last finished step, %d, in %.2f s: %s",
                env.rank, step, time.perf_counter() - began, path)
    return path
