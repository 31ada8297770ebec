"""`distributed-step calibrate --out FILE`: measure what `distributed-step plan` models.

    python -m distributed_step calibrate --out cal.json                      # one device: compute only
    torchrun --nnodes=2 --nproc_per_node=1 ... -m distributed_step calibrate --out cal.json   # and the link

On each rank, with the run's model, batch per rank and precision, on synthetic images:
- one device's step without DDP, timed phase by phase (forward, backward, optimizer; medians),
  its jitter (the standard deviation of the step; with several ranks, at least the ranks' spread
  within a DDP step), and the moment in backward at which each gradient is ready (a
  post-accumulate hook on every parameter timestamps it);
- the compression hook's casts (fp32 to bf16 and back) per GB of gradient;
- with several ranks: all-reduces from 64 KiB to 64 MiB (the link, fitted to bus bandwidth and a
  fixed latency), and the same step under DDP, whose backward, slower than alone, gives the
  interference of the traffic beside it (the slowdown per second of backward with traffic in
  flight, planner.step_model);
Every rank measures; the group agrees on the slowest rank's figures, and rank 0 writes the file.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from distributed_step.config import ConfigError, OneLineErrorParser, TrainConfig, add_config_flags
from distributed_step.data.datasets import synthetic_batch
from distributed_step.model import build_model
from distributed_step.observe.clock import mark, seconds_between
from distributed_step.optim import sgd
from distributed_step.parallel import ddp, numerics
from distributed_step.parallel.numerics import amp
from distributed_step.parallel.process_group import detect, setup, teardown, time_all_reduce
from distributed_step.planner.calibration import Calibration, Link, shapes_digest
from distributed_step.planner.collectives import fit
from distributed_step.planner.step_model import Profile, buckets, timeline

LINK_SIZES = tuple(1 << k for k in range(16, 27, 2))  # 64 KiB ... 64 MiB
WARMUP, STEPS = 2, 8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ArrivalClock:
    """When each gradient is ready, in seconds after backward began. On CUDA, the moment the
    device gets there: the host queues backward's kernels ahead of the device, and its own clock
    would say when they were queued (observe.clock.mark)."""

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.origin, self.marks = None, {}

    def start(self) -> None:
        self.marks = {}
        self.origin = mark(self.on_cuda)

    def stamp(self, index: int) -> None:
        self.marks[index] = mark(self.on_cuda)

    def seconds(self) -> dict[int, float]:
        """After the device is synchronized: each stamp's time since `start`."""
        return {i: seconds_between(self.origin, m, self.on_cuda) for i, m in self.marks.items()}


class Stepper:
    """Times steps of `model` phase by phase, and when each parameter's gradient arrives."""

    def __init__(self, model: nn.Module, net: nn.Module, cfg: TrainConfig, device: torch.device, batch: int):
        self.model, self.device, self.cfg = model, device, cfg
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.arrivals = ArrivalClock(device)
        stamp = self.arrivals.stamp
        self.hooks = [p.register_post_accumulate_grad_hook(lambda _, i=i: stamp(i)) for i, p in enumerate(self.params)]
        self.optimizer = sgd(net.parameters(), lr=0.01, momentum=cfg.momentum)
        self.images, self.labels = synthetic_batch(batch, cfg.image_size, 10, device, cfg.seed, cfg.channels_last)
        self.dtype, _ = amp(cfg.precision, device)

    def step(self) -> dict:
        began = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = nn.functional.cross_entropy(self.model(self.images), self.labels)
        _sync(self.device)
        forward_done = time.perf_counter()
        self.arrivals.start()
        loss.backward()
        _sync(self.device)
        backward_done = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        done = time.perf_counter()
        arrivals = self.arrivals.seconds()
        order = sorted(arrivals, key=arrivals.get)
        return {"forward": forward_done - began, "backward": backward_done - forward_done,
                "computed": max(arrivals.values()), "optimizer": done - backward_done,
                "step": done - began, "order": order, "ready": [arrivals[i] for i in order]}

    def measure(self) -> list[dict]:
        """Timed steps after warm-up, once: then the hooks go, so a second Stepper on the same net
        is alone, and nothing on the net holds this Stepper (nor a DDP it wraps) past its use."""
        try:
            for _ in range(WARMUP):
                self.step()
            return [self.step() for _ in range(STEPS)]
        finally:
            for hook in self.hooks:
                hook.remove()


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _cast_s_per_gbyte(nbytes: int, device: torch.device) -> float:
    grads = torch.ones(nbytes // 4, device=device)
    times = []
    for _ in range(3):
        began = time.perf_counter()
        grads.copy_(grads.to(torch.bfloat16))
        _sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times) / (nbytes / 1e9)


def _link(env, device: torch.device) -> Link:
    # Two passes, the faster of each size's medians: a first all-reduce of a size can meet a
    # rank that is still busy elsewhere, and the fit's intercept is mostly the small sizes.
    samples = [(size, min(time_all_reduce(size // 4, device, repeats=5) for _ in range(2))) for size in LINK_SIZES]
    agreed = torch.tensor([t for _, t in samples], dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    samples = [(size, t) for size, t in zip(LINK_SIZES, agreed.tolist())]
    bus, fixed = fit(samples, env.world_size)
    return Link(env.world_size, env.local_world_size, env.backend, tuple(samples), round(bus, 4), round(fixed, 2))


def calibrate(cfg: TrainConfig) -> Calibration | None:
    world = detect()
    numerics.configure(deterministic=False)
    env = setup(world, cfg.backend, cfg.timeout_s, cfg.socket_ifname)
    try:
        device, batch = env.device, cfg.global_batch_size // env.world_size
        net = build_model(10, channels_last=cfg.channels_last).to(device)
        alone = Stepper(net, net, cfg, device, batch).measure()
        order = alone[-1]["order"]
        sizes = [p.numel() * 4 for p in net.parameters() if p.requires_grad]
        backward = _median(alone, "backward")
        ready = sorted(min(1.0, statistics.median(r["ready"][k] for r in alone) / backward) for k in range(len(order)))
        profile = Profile("resnet18", batch, _median(alone, "forward"), backward, _median(alone, "optimizer"),
                          tuple(sizes[i] for i in order), tuple(ready),
                          jitter_s=statistics.pstdev(r["step"] for r in alone),
                          hook_s_per_gbyte=_cast_s_per_gbyte(sum(sizes), device))
        link = None
        if env.distributed:
            link = _link(env, device)
            with_traffic = Stepper(ddp.wrap(net, env, cfg, hook="none"), net, cfg, device, batch).measure()
            slower = max(0.0, _median(with_traffic, "computed") - _median(alone, "computed"))
            _, _, overlapped, _ = timeline(buckets(profile, cfg.bucket_cap_mb), backward, env.world_size,
                                           link.system(), 1.0)
            profile = replace(profile, interference=round(slower / overlapped, 4) if overlapped else 0.0,
                              jitter_s=max(profile.jitter_s, _spread_across_ranks(with_traffic, device)))
        profile = _agree(profile, env, device)
        shapes = [tuple(p.shape) for p in net.parameters()]
        result = Calibration("resnet18", sum(p.numel() for p in net.parameters()), shapes_digest(shapes),
                             device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
                             cfg.precision, cfg.image_size, profile, link)
    finally:
        # A DDP still alive when its group is destroyed can abort the process at exit ("terminate
        # called without an active exception", after the file was written): collect it first.
        gc.collect()
        teardown(env)
    return result if env.rank == 0 else None


def _spread_across_ranks(steps: list[dict], device: torch.device) -> float:
    """Every rank's compute in each of DDP's steps (which keep the ranks in step), gathered."""
    mine = torch.tensor([r["forward"] + r["computed"] for r in steps], dtype=torch.float64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return cross_rank_spread(torch.stack(everyone))


def cross_rank_spread(per_rank_step: torch.Tensor) -> float:
    """The median over steps (columns) of the ranks' (rows') standard deviation: ranks sharing
    cores take turns being slow, which one rank's own steps hide."""
    return float(per_rank_step.std(dim=0, correction=0).median())


def _agree(profile: Profile, env, device: torch.device) -> Profile:
    """Every figure as the slowest rank measured it (the step waits for that one)."""
    if not env.distributed:
        return profile
    keys = ("forward_s", "backward_s", "optimizer_s", "jitter_s", "interference", "hook_s_per_gbyte")
    values = torch.tensor([getattr(profile, k) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return replace(profile, **dict(zip(keys, values.tolist())))


def main(argv: list[str]) -> int:
    parser = OneLineErrorParser(prog="distributed-step calibrate", argument_default=argparse.SUPPRESS,
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the calibration file to write (JSON)")
    add_config_flags(parser, ("backend", "timeout_s", "socket_ifname", "image_size", "global_batch_size",
                              "precision", "channels_last", "bucket_cap_mb", "seed"))
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):  # before minutes of measuring
        raise ConfigError(f"--out {out}: the folder {folder} does not exist or is not writable")
    cfg = TrainConfig(**args).validate()
    result = calibrate(cfg)
    if result is not None:
        result.save(out)
        p, link = result.profile, result.link
        where = (f"; link {link.bus_gbyte_s:.3f} GB/s bus, {link.fixed_us:.0f} us fixed over {link.ranks} ranks"
                 if link else "; no link (one rank)")
        print(f"calibration {out}: {result.arch} at {p.batch} images/rank, forward {1e3 * p.forward_s:.1f} ms, "
              f"backward {1e3 * p.backward_s:.1f} ms, optimizer {1e3 * p.optimizer_s:.1f} ms, "
              f"interference {p.interference:.2f}{where}", flush=True)
    return 0
