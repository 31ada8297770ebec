"""A step that sleeps instead of computing, with real DDP all-reducing real buckets.

    torchrun ... -m testing.replay --calibration cal.json [--steps 12] [--bucket-cap-mb 25] [--hook bf16]

The model has the calibration's gradients (same sizes, same order) as parameters. Forward
sleeps the calibrated forward time; backward runs one autograd node per gradient, each of which
sleeps until that gradient's calibrated ready time and then hands it over, so DDP's hooks fill
and all-reduce the buckets over the real link exactly when the calibrated backward would have;
the optimizer is a sleep too. On a few cores, eight ranks that compute would slow each other;
ranks that sleep leave the network as the only thing measured (with gloo's reductions, which do
use the CPU). Rank 0 prints the median step time as JSON: {"step_ms": ..., "steps": [...]}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_step.parallel.ddp import register_comm_hook
from distributed_step.parallel.process_group import time_all_reduce
from distributed_step.planner.calibration import load


class _Sleep(torch.autograd.Function):
    """Identity on the activation; backward sleeps, then gives its parameter a gradient."""

    @staticmethod
    def forward(ctx, x, weight, backward_s):
        ctx.backward_s = backward_s
        ctx.shape = weight.shape
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.backward_s)
        return grad, torch.empty(ctx.shape), None  # a fresh gradient, as backward makes (unfilled: no CPU)


class Replay(nn.Module):
    def __init__(self, grad_bytes: tuple[int, ...], grad_ready: tuple[float, ...], forward_s: float, backward_s: float):
        super().__init__()
        # Registered in forward order, which is backward's reversed: DDP buckets them by that.
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(n // 4)) for n in reversed(grad_bytes)])
        gaps = [r - p for r, p in zip(grad_ready, (0.0, *grad_ready[:-1]))]
        self.gaps = [g * backward_s for g in reversed(gaps)]
        self.forward_s = forward_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.forward_s)
        for weight, gap in zip(self.weights, self.gaps):
            x = _Sleep.apply(x, weight, gap)
        return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="testing.replay")
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0)
    parser.add_argument("--ddp-default-buckets", action="store_true",
                        help="give DDP no bucket_cap_mb: its default, 25 MB and a 1 MiB first bucket")
    parser.add_argument("--hook", default="none", choices=("none", "fp16", "bf16"))
    parser.add_argument("--link-only", action="store_true", help="time all-reduces of 1, 4, 16, 64 MiB instead")
    args = parser.parse_args(argv)
    profile = load(args.calibration).profile
    dist.init_process_group("gloo")
    if args.link_only:  # the collective alone, to tell the network's share of an error from the step's
        sizes = [1 << 20, 1 << 22, 1 << 24, 1 << 26]
        times = [min(time_all_reduce(size // 4, torch.device("cpu"), repeats=5) for _ in range(2)) for size in sizes]
        if dist.get_rank() == 0:
            print(json.dumps({"all_reduce_s": dict(zip(map(str, sizes), times))}), flush=True)
        dist.destroy_process_group()
        return 0
    # DDP as wrap() makes it by default, so the replay copies and buckets what training does
    cap_mb = None if args.ddp_default_buckets else args.bucket_cap_mb
    model = DDP(Replay(profile.grad_bytes, profile.grad_ready, profile.forward_s, profile.backward_s),
                bucket_cap_mb=cap_mb, static_graph=True, gradient_as_bucket_view=True)
    register_comm_hook(model, args.hook)
    times = []
    for step in range(args.warmup + args.steps):
        model.zero_grad(set_to_none=True)  # as step.py does
        dist.barrier()
        began = time.perf_counter()
        model(torch.ones(1, requires_grad=True)).sum().backward()  # returns once every bucket is reduced
        time.sleep(profile.optimizer_s)
        if step >= args.warmup:
            times.append(time.perf_counter() - began)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank's
    if dist.get_rank() == 0:
        steps = [round(1e3 * t, 2) for t in slowest.tolist()]
        print(json.dumps({"step_ms": statistics.median(steps), "steps": steps}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
