"""One training step: forward -> backward (DDP all-reduces gradient buckets while backward is
still running) -> SGD step. No I/O, no rank checks: the same code runs on 1 or N ranks."""
from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn


class PhaseClock:
    """Accumulates time per phase without synchronizing the step.

    CPU work is synchronous, so the wall clock is exact. On CUDA, events are recorded in the
    stream and only read when the metrics are logged, so timing never stalls the GPU.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._pending: list[tuple[str, object, object]] = []
        self._last = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._last = self._now()

    def lap(self, phase: str) -> None:
        now = self._now()
        if self.cuda:
            self._pending.append((phase, self._last, now))
        else:
            self.totals[phase] = self.totals.get(phase, 0.0) + (now - self._last)
        self._last = now

    def read_ms(self) -> dict[str, float]:
        """Milliseconds per phase since the last read, then reset."""
        if self._pending:
            torch.cuda.synchronize()
            for phase, begin, end in self._pending:
                self.totals[phase] = self.totals.get(phase, 0.0) + begin.elapsed_time(end) / 1e3
            self._pending.clear()
        out = {phase: seconds * 1e3 for phase, seconds in self.totals.items()}
        self.totals = {}
        return out


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, loss_fn: nn.Module, clock: PhaseClock, *, accum: int = 1,
               precision: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
               clip_grad: float = 0.0) -> torch.Tensor:
    """Run one optimizer step over `accum` micro-batches; return the mean loss (on device)."""
    device_type = images.device.type
    total = torch.zeros((), device=images.device)
    for i, (x, y) in enumerate(zip(images.chunk(accum), labels.chunk(accum))):
        # DDP all-reduces during every backward; with accumulation only the last micro-step
        # needs the sum, so the others skip the communication under no_sync().
        sync = i == accum - 1 or not hasattr(model, "no_sync")
        with nullcontext() if sync else model.no_sync():
            with torch.autocast(device_type, dtype=precision, enabled=precision is not None):
                loss = loss_fn(model(x), y) / accum
            clock.lap("forward")
            (scaler.scale(loss) if scaler else loss).backward()
            clock.lap("backward")
        total += loss.detach()
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
