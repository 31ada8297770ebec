"""`--comm-hook auto`: measure the link once at start, then keep the exact all-reduce when the
communication backward cannot hide would be a few percent of the step, and take bf16 otherwise.

The measurement, on every rank: one all-reduce of a bucket-sized buffer (timed over 3 after a
warm-up), and one local forward+backward of a batch-shaped tensor (no DDP, so no communication
in it). Every rank takes the maximum of each figure over the group, so all ranks hold the same
numbers and make the same choice. A model of DDP's overlap gives the exposed time: buckets are
sent in order, each when backward has produced it and the previous one is through; what is
still on the wire when backward ends is exposed (docs/benchmarks.md, "What does a slow link
cost", compares the model with `bench`). Exact stays the default: compression changes the math.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch import nn

from distributed_step.data.datasets import synthetic_batch
from distributed_step.parallel.numerics import amp
from distributed_step.parallel.process_group import time_all_reduce

EXPOSED_SHARE_LIMIT = 0.05  # exact while the exposed comm is at most this share of the compute step
REPEATS = 3


@dataclass(frozen=True)
class LinkReport:
    hook: str  # the choice: "none" (exact) or "bf16"
    bus_gbit_s: float  # the all-reduce's bus bandwidth: 2(N-1)/N x bytes / time
    bucket_mb: float
    bucket_ms: float
    compute_ms: float  # one local forward+backward
    wire_ms: float  # the whole fp32 gradient through the measured all-reduce
    exposed_ms: float  # of that, what backward would not hide (exact)
    exposed_ms_bf16: float

    @property
    def exposed_share(self) -> float:
        return self.exposed_ms / self.compute_ms if self.compute_ms else 0.0

    def as_record(self) -> dict:
        return {**asdict(self), "exposed_share": round(self.exposed_share, 4)}

    def describe(self) -> str:
        return (f"comm hook auto: {self.hook} (all-reduce {self.bus_gbit_s:.2f} Gbit/s; exact would leave "
                f"{self.exposed_ms:.0f} ms of {self.wire_ms:.0f} ms on the wire unhidden, "
                f"{100 * self.exposed_share:.1f}% of a {self.compute_ms:.0f} ms step; "
                f"exact up to {100 * EXPOSED_SHARE_LIMIT:.0f}%)")


def bucket_sizes(net: nn.Module, cap_mb: float) -> list[int]:
    """Gradient bytes per DDP bucket, in the order they are sent (parameters in reverse). DDP
    keeps its small 1 MiB first bucket only when it is given no bucket_cap_mb; wrap() always
    gives one, so every bucket has that cap."""
    sizes, current, cap = [], 0, int(cap_mb * 2**20)
    for param in reversed([p for p in net.parameters() if p.requires_grad]):
        current += param.numel() * param.element_size()
        if current >= cap:
            sizes.append(current)
            current = 0
    return sizes + ([current] if current else [])


def exposed_ms(sizes: list[int], backward_ms: float, bytes_per_ms: float) -> float:
    """Wire time left after backward ends: bucket i is ready when backward has produced its
    share of the bytes, and goes once the one before it is through."""
    total, produced, wire_free = sum(sizes), 0, 0.0
    for size in sizes:
        produced += size
        ready = backward_ms * produced / total
        wire_free = max(ready, wire_free) + size / bytes_per_ms
    return max(0.0, wire_free - backward_ms)


def choose(sizes: list[int], world_size: int, bucket_bytes: int, bucket_ms: float, compute_ms: float,
           backward_ms: float) -> LinkReport:
    """The decision from the (group-wide) measurements; the same inputs give the same choice."""
    bytes_per_ms = bucket_bytes / bucket_ms
    exact = exposed_ms(sizes, backward_ms, bytes_per_ms)
    half = exposed_ms([s // 2 for s in sizes], backward_ms, bytes_per_ms)
    hook = "none" if exact <= EXPOSED_SHARE_LIMIT * compute_ms else "bf16"
    bus = 2 * (world_size - 1) / world_size * bucket_bytes * 8 / (bucket_ms * 1e-3) / 1e9
    return LinkReport(hook, round(bus, 3), round(bucket_bytes / 2**20, 2), round(bucket_ms, 3),
                      round(compute_ms, 3), round(sum(sizes) / bytes_per_ms, 3), round(exact, 3), round(half, 3))


def measure(net: nn.Module, world_size: int, device: torch.device, cfg) -> LinkReport:
    """Time the link and the local step on this rank, agree on the group's worst, choose."""
    sizes = bucket_sizes(net, cfg.bucket_cap_mb)
    bucket_bytes = max(sizes)
    bucket_ms = 1e3 * time_all_reduce(bucket_bytes // 4, device, repeats=REPEATS)
    compute_ms, backward_ms = _local_step_ms(net, device, cfg, world_size)
    agreed = torch.tensor([bucket_ms, compute_ms, backward_ms], dtype=torch.float64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    bucket_ms, compute_ms, backward_ms = agreed.tolist()
    return choose(sizes, world_size, bucket_bytes, bucket_ms, compute_ms, backward_ms)


def _local_step_ms(net: nn.Module, device: torch.device, cfg, world_size: int) -> tuple[float, float]:
    """(forward+backward, backward) ms of one micro-batch on this rank alone. The weights, their
    gradients, BatchNorm's statistics and the global random state are left as they were."""
    batch = max(2, cfg.global_batch_size // world_size // cfg.grad_accum)
    images, labels = synthetic_batch(batch, cfg.image_size, net.fc.out_features, device, 0, cfg.channels_last)
    buffers = [b.detach().clone() for b in net.buffers()]
    dtype, _ = amp(cfg.precision, device)
    timings = []
    for _ in range(2):  # the first warms the allocator and kernels
        began = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(net(images), labels)
        _sync(device)
        forward_done = time.perf_counter()
        loss.backward()
        _sync(device)
        done = time.perf_counter()
        timings.append(((done - began) * 1e3, (done - forward_done) * 1e3))
    with torch.no_grad():
        for saved, buf in zip(buffers, net.buffers()):
            buf.copy_(saved)
    net.zero_grad(set_to_none=True)
    return timings[-1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
