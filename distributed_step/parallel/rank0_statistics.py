"""Rank 0's BatchNorm running statistics, sent to every rank after each step's forward.

Without SyncBN each rank's running statistics follow its own batches, and the run's are rank 0's:
checkpoints and evaluation use them (process_group.broadcast_buffers_). A survivor of rank 0's
death must save rank 0's statistics of the last finished step, not its own, for the restarted
run to equal an uninterrupted one. A step's statistics are final once its forward has run, so
they travel then: rank 0 adds its values, the others zeros (exact: x + 0 == x), in one
asynchronous all-reduce that overlaps the backward. It is queued before the step's gradients,
so a step whose gradients were all-reduced has its statistics delivered too.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from distributed_step.parallel.process_group import DistEnv

WAIT_S = 1.0  # how long a survivor waits for a reduction still in flight


class Rank0Statistics:
    def __init__(self, env: DistEnv, buffers: list[torch.Tensor]):
        self.env, self.buffers = env, buffers
        self.zeros = None  # what the other ranks add
        self.sent: dict[int, tuple] = {}  # step -> (async work, reduced values): the last two steps
        self.hook = None

    def attach(self, model: nn.Module, running_step) -> None:
        """Send after each training forward of `model` (the outermost module: DDP, or what compiled
        it, so the collective stays out of any compiled graph) that ends in a gradient all-reduce
        (not the no_sync micro-steps of gradient accumulation). `running_step()`: the step being run."""
        if not (self.env.distributed and self.buffers):
            return

        def after_forward(module, args, output):
            if module.training and getattr(_ddp(module), "require_backward_grad_sync", True):
                self.send(running_step())
        self.hook = model.register_forward_hook(after_forward)

    def detach(self) -> None:
        """Remove the hook, and let the last reductions finish before dropping them. The hook
        refers to the run (running_step), and the run to the model: left in place, the run
        outlives train() until a garbage collection, and its loaders' workers with it, which at
        exit would keep the process waiting for them. A reduction still in gloo's worker thread
        when the process ends holds its tensor there, and releasing a tensor that needs the
        interpreter while the interpreter finalizes can abort the process (SIGABRT, "terminate
        called without an active exception") after a run that completed."""
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        deadline = time.monotonic() + WAIT_S  # in flight for milliseconds, unless a peer is gone
        for work, _ in self.sent.values():
            while not work.is_completed() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.sent.clear()

    def send(self, step: int) -> None:
        if self.env.rank == 0:
            values = torch.cat([b.detach().reshape(-1).float() for b in self.buffers])
        else:
            if self.zeros is None:
                self.zeros = torch.zeros(sum(b.numel() for b in self.buffers), device=self.buffers[0].device)
            values = self.zeros.clone()
        self.sent[step] = (dist.all_reduce(values, op=dist.ReduceOp.SUM, async_op=True), values)
        self.sent.pop(step - 2, None)

    def of_step(self, step: int) -> torch.Tensor | None:
        """Rank 0's statistics after `step`'s forward, if they arrived; None where rank 0 died
        before sending them. Waits at most WAIT_S for a reduction still in flight."""
        if step not in self.sent:
            return None
        work, values = self.sent[step]
        deadline = time.monotonic() + WAIT_S
        while not work.is_completed() and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            if not work.is_completed():
                return None
            work.wait()  # raises if it failed; on CUDA, orders the current stream after it
        except Exception:  # noqa: BLE001 - the reduction failed with the peer: nothing arrived
            return None
        return values


def _ddp(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile's wrapper -> the DDP module
