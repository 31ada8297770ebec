"""Where each rank runs on its host: how many intra-op threads, and which cores.

Oversubscription (ranks x threads > cores) is the costly mistake on CPU, and the facts that
decide it live outside torch: the launcher's OMP_NUM_THREADS, the CPU affinity a launcher or
Slurm gave us, and a pod's cgroup CPU quota. `train`, `bench` and `doctor` all call `place()`.
"""
from __future__ import annotations

import os

import torch

from distributed_step.config import ConfigError, TrainConfig
from distributed_step.parallel.process_group import DistEnv

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"
# The cores this process may use before any pinning (a launcher's or Slurm's cpuset included).
STARTING_CORES = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a pod's
    CPU limit leaves the affinity at every core of the node but throttles past the quota)."""
    cores = len(STARTING_CORES)  # not the current mask: pin_cores() narrows it
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
    cores = sorted(STARTING_CORES)
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


# Bytes of activations a ResNet-18 keeps per input pixel per image for backward: 666 measured
# (fp32, CPU, 128 vs 256 px, standard stem); the check uses less than half of it, so it refuses
# only what cannot fit. The small stem skips the 4x4 early downsampling: 16x the pixels after it.
ACTIVATION_BYTES_PER_PIXEL = 300
SMALL_STEM_FACTOR = 8


def check_memory(cfg: TrainConfig, world_size: int, local_world_size: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, an image size and batch whose activations cannot
    fit: past the memory, the kernel's OOM killer ends the rank without a word."""
    micro_batch = cfg.global_batch_size // world_size // cfg.grad_accum
    per_pixel = ACTIVATION_BYTES_PER_PIXEL * (SMALL_STEM_FACTOR if cfg.small_input_stem else 1)
    need = micro_batch * cfg.image_size ** 2 * per_pixel
    have = _memory_per_rank(local_world_size, device)
    if have is not None and need > have:
        raise ConfigError(f"--image-size {cfg.image_size} with {micro_batch} images per rank and micro-step needs "
                          f"at least {need / 1e9:.0f} GB for activations, more than the {have / 1e9:.0f} GB each "
                          f"rank has on this host: lower --image-size or --global-batch-size, or raise --grad-accum")


def _memory_per_rank(local_world_size: int, device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]  # one GPU per rank
    try:
        with open("/proc/meminfo") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
        return kb * 1024 // max(1, local_world_size)
    except (OSError, StopIteration, ValueError):
        return None
