"""The ranks' per-step verdicts (stop requested? loss not finite?), agreed without a host sync.

Reading an all-reduced flag right after the step would make the host wait for the device to
finish that step before it may queue the next one (and its input copy): the GPU would idle
between steps. So step n's flags are all-reduced asynchronously and read after step n+1 has
been queued, or at once before anything is written or evaluated (settle()): a non-finite loss
still stops every rank before a checkpoint of its weights exists, and a SIGTERM costs at most
one more step inside the grace period.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from distributed_step.parallel.process_group import DistEnv


class StepFlags:
    def __init__(self, env: DistEnv):
        self.env = env
        self.pending = None  # (step, async work or None, flags tensor, CUDA: (pinned copy, event)), unread
        self.stream = None  # CUDA: where the flags are copied to the host
        self.stop = False  # some rank was asked to stop
        self.non_finite_step: int | None = None  # the first step whose loss was not finite on some rank

    def post(self, step: int, stop_requested: bool, loss: torch.Tensor) -> None:
        """Start step's reduction and read the previous step's, which has finished by now or soon."""
        non_finite = torch.logical_not(torch.isfinite(loss.detach())).float()  # stays on the device
        flags = torch.stack([torch.full_like(non_finite, float(stop_requested)), non_finite])
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True) if self.env.distributed else None
        earlier, self.pending = self.pending, (step, work, flags, self._to_host(work, flags))
        if earlier is not None:
            self._read(*earlier)

    def _to_host(self, work, flags: torch.Tensor):
        """CUDA: copy the reduced flags to pinned memory on a side stream, behind the all-reduce
        only. Reading them on the compute stream would wait for every step queued after it."""
        if not flags.is_cuda:
            return None
        if self.stream is None:
            self.stream = torch.cuda.Stream(flags.device)
        self.stream.wait_stream(torch.cuda.current_stream(flags.device))  # the flags' own values
        with torch.cuda.stream(self.stream):
            if work is not None:
                work.wait()  # makes this stream, not the host, wait for the collective
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        flags.record_stream(self.stream)
        return host, done

    def settle(self) -> None:
        """Read every posted step's flags now (before a checkpoint, an evaluation, a log, the end)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._read(*pending)

    def _read(self, step: int, work, flags: torch.Tensor, on_host) -> None:
        if on_host is not None:
            host, done = on_host
            done.synchronize()  # the copy, hence the all-reduce, is complete; later steps may run on
            stop, non_finite = host.tolist()
        else:
            if work is not None:
                work.wait()
            stop, non_finite = flags.tolist()
        self.stop = self.stop or bool(stop)
        if non_finite and self.non_finite_step is None:
            self.non_finite_step = step
