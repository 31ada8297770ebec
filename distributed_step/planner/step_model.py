"""The data-parallel step at n ranks, from one device's profile and a system's fabrics.

DDP puts gradients into buckets of bucket_cap_mb in the order backward produces them (the first
capped at 1 MiB when DDP is given no cap: DDP_BUCKETING) and all-reduces each bucket once its
last gradient is in, on one communication stream: a bucket starts when it is ready and the one
before it is through.
Each bucket also costs backward a little host time (BUCKET_HOST_S). Backward runs beside that
traffic and slows by `interference` seconds per second of backward with communication in flight
(DDP's copies into the buckets, the collectives' kernels taking SMs or, with gloo, cores and
memory bandwidth). So

    step = forward + max(backward slowed by overlap, last bucket done) + optimizer
           + DDP's own per-step cost + the expected straggler delay at n ranks,

where the straggler delay is the expected maximum of n ranks' step-time jitter, about
jitter x sqrt(2 ln n) for normal jitter. A compression hook (fp16, bf16) halves the bytes and
costs its casts on the compute stream. Efficiency is one device's step without DDP over the step
at n ranks: what each device keeps of its speed alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from distributed_step.planner.collectives import System, all_reduce_s

# Recent DDP (checked in torch 2.14) caps its first bucket (the first gradients backward produces)
# at 1 MiB only when it is given no bucket_cap_mb, whose default is then 25 MB; given one, as this
# project always gives it, the first bucket has that cap too (Profile.first_bucket_bytes = 0).
# PyTorch 1.4 capped one bucket at 1 MiB whatever the cap, but assigned buckets in the order the
# layers are defined and never rebuilt them, so that small bucket held the first layers'
# gradients and went last (Profile.small_bucket_last).
DEFAULT_FIRST_BUCKET_BYTES = 1 << 20
DDP_BUCKETING = {
    "given-cap": {"first_bucket_bytes": 0, "small_bucket_last": False},  # DDP(bucket_cap_mb=...)
    "default": {"first_bucket_bytes": DEFAULT_FIRST_BUCKET_BYTES, "small_bucket_last": False},  # DDP(net): 25 MB
    "pytorch-1.4": {"first_bucket_bytes": DEFAULT_FIRST_BUCKET_BYTES, "small_bucket_last": True},
}
# What each bucket costs backward itself, on the host: DDP's bookkeeping when the bucket fills
# and the collective's launch, both on the thread that runs backward (NCCL's own base latency,
# 8.4 us in its tuning tables, plus DDP's share; the collective's time on the wire is apart).
BUCKET_HOST_S = 20e-6
HOOK_BYTE_RATIO = {"none": 1.0, "fp16": 0.5, "bf16": 0.5}
BUCKET_CHOICES_MB = (1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0)
COMPRESSION_MIN_GAIN = 0.01
# The band's corners: each uncertain input at its optimistic and pessimistic end. Bandwidths are
# rarely above the presets' achieved figures and often below (contention, a worse topology);
# latencies vary more; interference and jitter are the least known.
OPTIMISTIC = {"bandwidth": 1.1, "latency": 0.7, "interference": 0.5, "jitter": 0.5}
PESSIMISTIC = {"bandwidth": 0.75, "latency": 1.5, "interference": 1.5, "jitter": 1.5}


@dataclass(frozen=True)
class Profile:
    """One device's step: measured by `calibrate`, or derived for a published run."""
    arch: str
    batch: int  # images per rank per step
    forward_s: float
    backward_s: float
    optimizer_s: float
    grad_bytes: tuple[int, ...]  # per parameter, in the order backward produces the gradients
    grad_ready: tuple[float, ...]  # when each is ready, as a fraction of backward (non-decreasing)
    ddp_overhead_s: float = 0.0  # DDP's own cost per step at one rank (hooks, bucket copies)
    jitter_s: float = 0.0  # standard deviation of a rank's step time (calibrate: at least across ranks)
    interference: float = 0.0  # backward's slowdown per second of it with traffic in flight
    hook_s_per_gbyte: float = 0.0  # a compression hook's casts, per GB of fp32 gradient
    first_bucket_bytes: int = 0  # DDP's cap on its first bucket; 0: the cap of the others
    small_bucket_last: bool = False  # PyTorch < 1.6: no rebuild, the small bucket holds the first layers

    @property
    def alone_s(self) -> float:
        return self.forward_s + self.backward_s + self.optimizer_s

    def faster(self, speedup: float) -> Profile:
        """The same model on a device `speedup` times as fast (compute, DDP's and the casts' cost)."""
        return replace(self, forward_s=self.forward_s / speedup, backward_s=self.backward_s / speedup,
                       optimizer_s=self.optimizer_s / speedup, ddp_overhead_s=self.ddp_overhead_s / speedup,
                       jitter_s=self.jitter_s / speedup, hook_s_per_gbyte=self.hook_s_per_gbyte / speedup)


@dataclass(frozen=True)
class Prediction:
    ranks: int
    system: str
    hook: str
    bucket_mb: float
    step_s: float
    images_per_s: float
    efficiency: float
    exposed_s: float  # communication left after backward
    comm_s: float  # the buckets' wire time, summed
    straggler_s: float
    algorithm: str  # what the largest bucket's all-reduce runs as


def buckets(profile: Profile, cap_mb: float) -> list[tuple[int, float]]:
    """(bytes, ready fraction) per bucket, in the order they are sent."""
    cap = int(cap_mb * 2**20)
    grads = list(zip(profile.grad_bytes, profile.grad_ready))
    if profile.small_bucket_last:  # assigned in the layers' order, sent in backward's
        return _fill(grads[::-1], profile.first_bucket_bytes or cap, cap)[::-1]
    return _fill(grads, profile.first_bucket_bytes or cap, cap)


def _fill(grads: list[tuple[int, float]], first: int, cap: int) -> list[tuple[int, float]]:
    """DDP's assignment: a bucket closes on the gradient that takes it to its cap."""
    found, size, ready, limit = [], 0, 0.0, first
    for nbytes, at in grads:
        size, ready = size + nbytes, max(ready, at)
        if size >= limit:
            found.append((size, ready))
            size, ready, limit = 0, 0.0, cap
    return found + ([(size, ready)] if size else [])


def timeline(sent: list[tuple[int, float]], backward_s: float, n: int, system: System,
             ratio: float) -> tuple[float, float, float, str]:
    """(when the last bucket is through, wire time, the span of backward with communication in
    flight, the largest bucket's algorithm), every time from backward's start. The span runs from
    the first bucket's start to the end of backward or of the traffic, whichever comes first:
    from the first bucket on, DDP copies gradients into buckets and the collectives' kernels
    share the device with backward."""
    free = busy = 0.0
    first, algorithm, largest = None, "", -1
    for nbytes, ready in sent:
        seconds, how = all_reduce_s(nbytes * ratio, n, system)
        start = max(ready * backward_s, free)
        first = start if first is None else first
        free = start + seconds
        busy += seconds
        if nbytes > largest:
            algorithm, largest = how, nbytes
    span = max(0.0, min(free, backward_s) - first) if first is not None else 0.0
    return free, busy, span, algorithm


def predict(profile: Profile, system: System, n: int, hook: str = "none", bucket_mb: float = 25.0) -> Prediction:
    if n < 1:
        raise ValueError(f"{n} ranks: need at least 1")
    if hook not in HOOK_BYTE_RATIO:
        raise ValueError(f"hook {hook!r}: one of {', '.join(HOOK_BYTE_RATIO)}")
    if n == 1:  # one device needs no DDP: the baseline itself
        return Prediction(1, system.name, hook, bucket_mb, profile.alone_s, profile.batch / profile.alone_s,
                          1.0, 0.0, 0.0, 0.0, "")
    casts = profile.hook_s_per_gbyte * sum(profile.grad_bytes) / 1e9 if hook != "none" else 0.0
    sent = buckets(profile, bucket_mb)
    backward = profile.backward_s + casts + BUCKET_HOST_S * len(sent)
    done, busy, overlapped, algorithm = timeline(sent, backward, n, system, HOOK_BYTE_RATIO[hook])
    slowed = backward + interference(profile, system) * overlapped
    exposed = max(0.0, done - slowed)
    straggler = profile.jitter_s * math.sqrt(2 * math.log(n))
    step = profile.forward_s + slowed + exposed + profile.optimizer_s + profile.ddp_overhead_s + straggler
    return Prediction(n, system.name, hook, bucket_mb, step, n * profile.batch / step, profile.alone_s / step,
                      exposed, busy, straggler, algorithm)


def interference(profile: Profile, system: System) -> float:
    """The system's figure for its kind of device and library, else the calibration's own."""
    return profile.interference if system.interference is None else system.interference


def corner(profile: Profile, system: System, ends: dict) -> tuple[Profile, System]:
    return (replace(profile, interference=interference(profile, system) * ends["interference"],
                    jitter_s=profile.jitter_s * ends["jitter"]),
            replace(system.scaled(bandwidth=ends["bandwidth"], latency=ends["latency"]), interference=None))


def band(profile: Profile, system: System, n: int, hook: str = "none",
         bucket_mb: float = 25.0) -> tuple[Prediction, Prediction, Prediction]:
    """(optimistic, expected, pessimistic) predictions."""
    return (predict(*corner(profile, system, OPTIMISTIC), n, hook, bucket_mb),
            predict(profile, system, n, hook, bucket_mb),
            predict(*corner(profile, system, PESSIMISTIC), n, hook, bucket_mb))


def best(profile: Profile, system: System, n: int, hooks=("none", "bf16"),
         choices_mb=BUCKET_CHOICES_MB) -> Prediction:
    """The fastest bucket size at n ranks, and a compression hook only where it saves more than
    COMPRESSION_MIN_GAIN of the step: compression changes the numbers, so exact is kept unless
    it costs something real (as --comm-hook auto does)."""
    def fastest(names) -> Prediction:
        return min((predict(profile, system, n, h, mb) for h in names for mb in choices_mb),
                   key=lambda p: round(p.step_s, 9))
    exact = fastest(["none"])
    compressed = [h for h in hooks if h != "none"]
    if not compressed:
        return exact
    other = fastest(compressed)
    return other if other.step_s < exact.step_s * (1 - COMPRESSION_MIN_GAIN) else exact


def fit_interference(profile: Profile, system: System, n: int, measured_s: float, bucket_mb: float = 25.0) -> float:
    """The interference that makes the step at n ranks last `measured_s` (bisection: the step
    grows with it; 0 when even none is too slow)."""
    low, high = 0.0, 50.0
    for _ in range(60):
        mid = (low + high) / 2
        step = predict(replace(profile, interference=mid), replace(system, interference=None), n,
                       bucket_mb=bucket_mb).step_s
        low, high = (mid, high) if step < measured_s else (low, mid)
    return (low + high) / 2
