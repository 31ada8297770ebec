"""One training step: forward -> backward (DDP all-reduces gradient buckets while backward is
still running) -> SGD step. No I/O, no rank checks: the same code runs on 1 or N ranks."""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.profiler import record_function


class _NoClock:
    """Stands in for observe.clock.PhaseClock when nobody is timing the step."""

    def lap(self, phase: str) -> None:
        pass

    def lap_backward(self) -> None:
        pass


_NO_CLOCK = _NoClock()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, loss_fn: nn.Module, clock=None, *, accum: int = 1,
               precision: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               clip_grad: float = 0.0) -> torch.Tensor:
    """Run one optimizer step over `accum` micro-batches; return the mean loss (on device).
    `clock` (an observe.clock.PhaseClock) is told where each phase ends; the math is the same without it."""
    clock = clock or _NO_CLOCK
    device_type = images.device.type
    total = torch.zeros((), device=images.device)
    for i, (x, y) in enumerate(zip(images.chunk(accum), labels.chunk(accum))):
        # DDP all-reduces during every backward; with accumulation only the last micro-step
        # needs the sum, so the others skip the communication under no_sync().
        sync = i == accum - 1 or not hasattr(model, "no_sync")
        # record_function: the phases' names on a profiler timeline (--profile-steps)
        with nullcontext() if sync else model.no_sync():
            with record_function("forward"), torch.autocast(device_type, dtype=precision,
                                                            enabled=precision is not None):
                loss = loss_fn(model(x), y) / accum
            clock.lap("forward")
            with record_function("backward"):
                (scaler.scale(loss) if scaler else loss).backward()
            clock.lap_backward()
        total += loss.detach()
    with record_function("optimizer"):
        if scaler:
            scaler.unscale_(optimizer)
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    return total
