"""How the model is made data-parallel: DDP with its measured knobs, an optional gradient
compression hook, and the intra-op thread count of each rank.

`train` and `bench` both call these, so the benchmark measures exactly the step that trains.
Each default was chosen by `python -m distributed_step bench` (docs/benchmarks.md).
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import TrainConfig
from .dist import DistEnv

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
# The cores this process may use before any pinning (a launcher's or Slurm's cpuset included).
_STARTING_CORES = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a pod's
    CPU limit leaves the affinity at every core of the node but throttles past the quota)."""
    cores = len(_STARTING_CORES)  # not the current mask: pin_cores() narrows it
    try:
        with open(CGROUP_CPU_MAX) as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cores


def set_threads(threads: int, local_world_size: int) -> int:
    """Intra-op threads for this rank; 0 means the cores we may use split over the local ranks,
    and never more than an OMP_NUM_THREADS the launcher set (torchrun, Ray and our pods do).

    Oversubscribing (ranks x threads > cores) is the costly mistake: 2 ranks x 2 threads on 2
    cores made the step 2.9x slower (docs/benchmarks.md), and a pod's CPU limit leaves every
    core of the node in its affinity mask, hence the cgroup quota in usable_cores().
    """
    if threads <= 0:
        threads = max(1, usable_cores() // max(1, local_world_size))
        launcher = os.environ.get("OMP_NUM_THREADS", "")
        if launcher.isdigit() and int(launcher) > 0:
            threads = min(threads, int(launcher))
    torch.set_num_threads(threads)
    return threads


def place(cfg: TrainConfig, env: DistEnv) -> int:
    """Threads and cores of this rank, from the configuration; returns the thread count."""
    threads = set_threads(cfg.threads, env.local_world_size)
    pin_cores(cfg.pin_cores, env.local_rank, env.local_world_size)
    return threads


def pin_cores(pin: bool, local_rank: int, local_world_size: int) -> None:
    """Pin every thread of this rank (compute, gloo's, the loader's) to its own share of the
    cores this process started with, or release them to all of those again.

    Unpinned, the scheduler moves each rank's threads between cores and a gloo thread can land
    on the other rank's core; the ranks then drift apart and the faster one waits inside the
    all-reduce. Pinned, at 2 ranks on 2 cores, the step fell from 1.20x to 1.09x its
    compute-only bound (docs/benchmarks.md).
    """
    if not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(_STARTING_CORES)
    chosen = set(cores)
    if pin:
        per = max(1, len(cores) // max(1, local_world_size))
        start = (local_rank * per) % len(cores)
        chosen = set(cores[start:start + per])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), chosen)
        except OSError:  # a thread that has just ended
            pass


def wrap(net: nn.Module, env: DistEnv, cfg: TrainConfig) -> nn.Module:
    """DDP around `net` (a no-op on one process) with the configuration's knobs: gradients are
    all-reduced bucket by bucket while backward is still computing the earlier layers."""
    if not env.distributed:
        return net
    model = DDP(net, device_ids=[env.device] if env.device.type == "cuda" else None,
                bucket_cap_mb=cfg.bucket_cap_mb,
                # The gradients live inside the communication buckets: no copy in, no copy out.
                gradient_as_bucket_view=cfg.bucket_view,
                # The graph is the same every step, so DDP can skip searching it for unused
                # parameters and fix the bucket order after the first iteration. It assumes every
                # backward syncs: accumulation's no_sync micro-steps trip an internal assert.
                static_graph=cfg.static_graph and cfg.grad_accum == 1)
    register_comm_hook(model, cfg.comm_hook, cfg.powersgd_rank)
    return model


def register_comm_hook(model: DDP, name: str, powersgd_rank: int = 4) -> None:
    """"none" is the exact path: gradients are summed in fp32, so N ranks equal one process.
    The others compress what is sent and therefore change the arithmetic of every step."""
    if name == "none":
        return
    if name == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif name == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "powersgd":
        # Low-rank gradient approximation with error feedback. The first iterations use the
        # exact all-reduce; PowerSGD needs at least two of them to start its warm state.
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=2, min_compression_rate=2,
                                            use_error_feedback=True, warm_start=True)
        model.register_comm_hook(state, _one_bucket_at_a_time(powerSGD_hook.powerSGD_hook))
    else:
        raise ValueError(f"unknown comm hook {name!r}")  # TrainConfig.validate() names the choices


def _one_bucket_at_a_time(hook):
    """PowerSGD issues its second all-reduce (Q) from a callback of its first (P). With several
    buckets in flight those callbacks race, so two ranks can issue them in different orders and
    gloo, which matches collectives by order, fails ("Received data size doesn't match expected
    size"; seen with 10 MB buckets or a static graph). Finishing each bucket before backward
    goes on keeps one order on every rank; on CPU the overlap it gives up was not free anyway."""
    def ordered(state, bucket):
        future = hook(state, bucket)
        future.wait()
        return future
    return ordered
