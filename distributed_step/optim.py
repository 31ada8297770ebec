"""The optimizer and its learning-rate schedule: SGD with momentum, warmup then cosine/step/constant."""
from __future__ import annotations

import math

import torch


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
    """SGD with momentum. The fused kernel updates every parameter in one pass over memory
    (faster than the per-tensor loop: docs/benchmarks.md); the arithmetic is the same.

    Never fused under a GradScaler: torch's fused SGD allocates its momentum buffers with
    empty_like on the first step, then skips the kernel when the scaler found an inf, which the
    first fp16 steps do by design. The next applied step starts from uninitialised momentum and
    the loss is NaN a step later (`_fused_sgd` in torch/optim/sgd.py), with or without an
    explicit unscale_ (tests/unit/test_step.py holds the case). The foreach loop creates momentum only when it steps."""
    fused = fused and scaler is None
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                           **({"fused": True} if fused else {"foreach": True}))
