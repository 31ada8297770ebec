"""One training step: forward -> backward (DDP all-reduces gradient buckets while backward is
still running) -> SGD step. No I/O, no rank checks: the same code runs on 1 or N ranks."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.profiler import record_function

from .config import ConfigError


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
        self._grads_ready = None  # when the last parameter's gradient was accumulated

    def watch_gradients(self, module: nn.Module) -> None:
        """Split backward into compute and exposed communication.

        Each parameter's hook stamps the time its gradient lands; the last stamp is the end of
        the backward computation. DDP's backward returns only once every bucket's all-reduce
        has finished, so what remains after that stamp is communication that backward did not
        hide ("comm"). Without DDP (or under no_sync) it is the autograd engine's wrap-up.
        """
        for param in module.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._stamp_gradient)

    def _stamp_gradient(self, _param) -> None:
        if not self.cuda:
            self._grads_ready = time.perf_counter()
            return
        if self._grads_ready is None:
            self._grads_ready = torch.cuda.Event(enable_timing=True)
        self._grads_ready.record()  # re-recording keeps the latest point in the stream

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._last = self._now()

    def lap_backward(self) -> None:
        """End of backward: "backward" up to the last gradient, "comm" for the rest."""
        ready, self._grads_ready = self._grads_ready, None
        if ready is None:  # no gradient was watched
            self.lap("backward")
            return
        now = self._now()
        self._add("backward", self._last, ready)
        self._add("comm", ready, now)
        self._last = now

    def lap(self, phase: str) -> None:
        now = self._now()
        self._add(phase, self._last, now)
        self._last = now

    def _add(self, phase: str, begin, end) -> None:
        if self.cuda:
            self._pending.append((phase, begin, end))
        else:
            self.totals[phase] = self.totals.get(phase, 0.0) + (end - begin)

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


def amp(precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype, gradient scaler) for --precision: fp16 needs a scaler (its gradients
    underflow without one), bf16 has fp32's range and needs none, fp32 runs without autocast.
    CPU autocast and GradScaler("cpu") run the same fp16 path as CUDA, so the tests cover it."""
    if precision == "fp16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--precision fp16 has no gradient scaler on {device.type}; use --precision bf16 or fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return dtype, torch.amp.GradScaler(device.type) if precision == "fp16" else None


def lr_factor(schedule: str, warmup_steps: int, total_steps: int):
    """The multiplier of --lr at each step: linear warmup from 0, then cosine, step or constant."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if schedule == "step":
            return 0.1 ** int(progress * 3)  # /10 at one third and at two thirds of the run
        return 1.0
    return factor


def sgd(params, lr: float, momentum: float, weight_decay: float = 0.0, nesterov: bool = False,
        fused: bool = True, scaler: torch.amp.GradScaler | None = None) -> torch.optim.SGD:
    """SGD with momentum. The fused kernel updates every parameter in one pass over memory (3x
    faster than the per-tensor loop on CPU, docs/benchmarks.md); the arithmetic is the same.

    Never fused under a GradScaler: torch's fused SGD allocates its momentum buffers with
    empty_like on the first step, then skips the kernel when the scaler found an inf, which the
    first fp16 steps do by design. The next applied step starts from uninitialised momentum and
    the loss is NaN a step later (torch 2.11 CUDA, 2.14.1 CPU; `_fused_sgd` in torch/optim/sgd.py),
    with or without an explicit unscale_. The foreach loop creates momentum only when it steps."""
    fused = fused and scaler is None
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                           **({"fused": True} if fused else {"foreach": True}))


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
