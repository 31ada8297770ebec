"""The step and its schedule, in-process: accumulation is exact, the LR schedule has its shape."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distributed_step.observe.clock import PhaseClock
from distributed_step.optim import lr_factor, sgd
from distributed_step.step import train_step


def one_step(accum: int, steps: int = 2):
    torch.manual_seed(0)
    # No BatchNorm: its batch statistics differ between a batch and its halves by design.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    optimizer = sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(5, (8,))
    clock, losses = PhaseClock(images.device), []
    for _ in range(steps):
        clock.start()
        losses.append(train_step(model, optimizer, images, labels, nn.CrossEntropyLoss(), clock, accum=accum))
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_two_micro_steps_equal_one_full_batch_step():
    loss_1, params_1 = one_step(accum=1)
    loss_2, params_2 = one_step(accum=2)
    torch.testing.assert_close(torch.stack(loss_2), torch.stack(loss_1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(params_2, params_1, rtol=1e-5, atol=1e-6)
    _, initial = one_step(accum=1, steps=0)
    assert (params_1 - initial).abs().max() > 1e-3  # the steps moved the weights


def test_warmup_is_linear_then_each_schedule_has_its_shape():
    total, warmup = 100, 10
    cosine = lr_factor("cosine", warmup, total)
    assert [cosine(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert cosine(warmup) == 1.0 and cosine(total) == pytest.approx(0.0, abs=1e-12)
    assert cosine(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    step = lr_factor("step", warmup, total)
    assert (step(warmup), step(warmup + 31), step(warmup + 61)) == pytest.approx((1.0, 0.1, 0.01))
    assert lr_factor("constant", 0, total)(99) == 1.0


def test_fp16_with_its_scaler_skips_the_overflowing_steps_then_trains():
    """The fp16 path as `train` builds it (autocast, GradScaler, the default fused_sgd=True),
    run on the CPU. torch's fused SGD leaves its momentum uninitialised after a skipped first
    step and went NaN here; sgd() must hand a scaled run the foreach loop."""
    from torchvision.models import resnet18

    from distributed_step.parallel.numerics import amp

    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    dtype, scaler = amp("fp16", torch.device("cpu"))
    assert dtype is torch.float16 and scaler is not None
    optimizer = sgd(model.parameters(), lr=0.05, momentum=0.9, fused=True, scaler=scaler)
    assert not optimizer.defaults["fused"]
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(10, (8,))
    clock, losses, scales = PhaseClock(images.device), [], []
    for _ in range(6):
        clock.start()
        losses.append(float(train_step(model, optimizer, images, labels, nn.CrossEntropyLoss(), clock,
                                       precision=dtype, scaler=scaler)))
        scales.append(scaler.get_scale())
    assert scales[0] < 65536.0  # the first step overflowed and was skipped: the case that broke
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
