"""The resumable distributed sampler, and the train / held-out loaders with their workers."""
from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import signal
import threading
import time

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from distributed_step.config import TrainConfig
from distributed_step.data.datasets import Datasets

PREFETCH_BATCHES = 2  # per worker (torch's default); see docs/benchmarks.md, "How fast is the input?"


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch, skipping the batches already trained on.

    drop_last=True gives every rank the same number of samples (uneven shards hang a
    collective), and rank r's k-th batch together with the other ranks' k-th batches is exactly
    the k-th global batch of the epoch's permutation: the same whatever the world size.
    """

    def __init__(self, dataset: Dataset, world_size: int, rank: int, seed: int, batch_per_rank: int):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_per_rank, self.skip = batch_per_rank, 0

    def set_position(self, epoch: int, batches_done: int) -> None:
        self.set_epoch(epoch)
        self.skip = batches_done * self.batch_per_rank

    def __iter__(self):
        """Keys (epoch, index): the epoch travels with each index to the loader workers, so they
        can live across epochs (persistent_workers) and still draw this epoch's augmentation."""
        epoch = self.epoch
        return ((epoch, i) for i in itertools.islice(super().__iter__(), self.skip, None))

    def __len__(self) -> int:
        return self.num_samples - self.skip


def loader_workers(cfg: TrainConfig, sets: Datasets, local_world_size: int) -> int:
    if cfg.workers >= 0:
        return cfg.workers
    return 0 if sets.in_memory else max(1, min(4, (os.cpu_count() or 1) // local_world_size))


def train_loader(sets: Datasets, cfg: TrainConfig, rank: int, world_size: int, workers: int,
                 pin: bool) -> DataLoader:
    per_rank = cfg.global_batch_size // world_size
    sampler = ResumableSampler(sets.train, world_size, rank, cfg.seed, per_rank)
    return DataLoader(sets.train, batch_size=per_rank, sampler=sampler, drop_last=True, pin_memory=pin,
                      collate_fn=getattr(sets, "collate", None), **worker_options(workers))


def worker_options(workers: int) -> dict:
    """Loader workers start from a forkserver, not by forking the trainer.

    Forking a process with threads (gloo's, the other loader's queue feeders) hung a new worker
    in about 1 run of 5 here: CPython 3.11's after-fork cleanup in the child waited for a lock
    that another thread of the parent held at the moment of the fork, and the rank then waited
    for that worker forever. The forkserver is a fresh single-threaded process that imports
    torch and this module once, so each worker is a cheap fork of a clean process.

    Workers persist across epochs and evaluations (each sample's key carries its epoch): a new
    worker would receive the whole dataset again (CIFAR-10's arrays: 150 MB per worker).
    """
    if workers == 0:
        return {}
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torchvision", __name__, "distributed_step.data.datasets",
                                    "distributed_step.data.images"])
    return {"num_workers": workers, "multiprocessing_context": context, "persistent_workers": True,
            "prefetch_factor": PREFETCH_BATCHES,
            "worker_init_fn": functools.partial(_start_worker, os.getpid())}


def _start_worker(trainer_pid: int, worker_id: int) -> None:
    """torchrun and Kubernetes signal the whole process group: loader workers must outlive the
    SIGTERM so that the trainer can finish its step and save. They exit with the trainer: torch's
    own check watches the worker's parent, which is the forkserver (it outlives the trainer,
    held open by the workers themselves), so each worker also watches the trainer."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(trainer_pid,), name="exit-with-trainer", daemon=True).start()


def _exit_with(pid: int) -> None:
    while _alive(pid):
        time.sleep(1.0)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:  # gone (or no /proc: fall back to a signal-0 probe)
        try:
            os.kill(pid, 0)
            return not os.path.isdir("/proc")
        except OSError:
            return False


def held_out_loader(sets: Datasets, batch_size: int, rank: int, world_size: int, workers: int,
                    pin: bool) -> DataLoader | None:
    """Rank r evaluates samples r, r+W, r+2W, ...: no padding, so no sample counts twice."""
    if sets.held_out is None:
        return None
    shard = Subset(sets.held_out, range(rank, len(sets.held_out), world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, pin_memory=pin, collate_fn=sets.collate,
                      **worker_options(workers))
