"""Honest metrics: kept on the device, all-reduced over ranks only when logged.

The logged loss is the mean over every rank's samples of every step since the last log, not
rank 0's last micro-batch. Held-out evaluation all-reduces exact (loss sum, correct, count).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
from torch import nn

from distributed_step.observe.tensorboard import Scalars
from distributed_step.parallel.process_group import DistEnv, all_reduce_

log = logging.getLogger("distributed_step")


def setup_logging(env: DistEnv) -> None:
    """Rank 0 logs INFO; every rank logs warnings and errors, prefixed with its rank."""
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank {env.rank}] " if env.distributed else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)
    log.propagate = False


class LossMeter:
    """Sum of per-step mean losses, on the device; no host sync until `reduce()`."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def update(self, loss: torch.Tensor) -> None:
        self.sum += loss
        self.steps += 1

    def reduce(self, env: DistEnv) -> float:
        """Mean loss over the window and over all ranks (each rank's loss is its batch mean and
        the batches are equal-sized, so the mean of rank means is the global batch mean)."""
        total = all_reduce_(self.sum.clone(), env) / env.world_size
        mean = float(total) / max(1, self.steps)
        self.sum.zero_()
        self.steps = 0
        return mean


@torch.no_grad()
def evaluate(module: nn.Module, batches, env: DistEnv, precision: torch.dtype | None) -> dict:
    """Exact held-out loss and accuracy: each sample is seen by exactly one rank. `batches`
    yields (model input, labels) on the device (device_input.DeviceFeed)."""
    was_training = module.training
    module.eval()
    # float64 keeps the counts exact far past any held-out set size.
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)
    for images, labels in batches:
        with torch.autocast(env.device.type, dtype=precision, enabled=precision is not None):
            logits = module(images)
        loss = nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        totals += torch.stack([loss.double(), (logits.argmax(1) == labels).sum().double(),
                               torch.tensor(float(len(labels)), dtype=torch.float64, device=env.device)])
    all_reduce_(totals, env)
    module.train(was_training)
    loss_sum, correct, count = totals.tolist()
    return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": correct / max(count, 1),
            "eval_samples": int(count)}


class JsonlLog:
    """metrics.jsonl, written by rank 0. On resume, records past the resumed step are dropped,
    so a crash and restart never leaves the same step logged twice. `listeners` get every
    record on every rank where they are given (Prometheus on rank 0, Ray's report on all)."""

    def __init__(self, path: str, env: DistEnv, resume_step: int, listeners=()):
        self.path, self.enabled, self.listeners = path, env.is_main, [f for f in listeners if f is not None]
        if self.enabled and os.path.exists(path):
            with open(path) as fh:
                kept = [line for line in fh if _step_of(line) is not None and _step_of(line) <= resume_step]
            with open(path, "w") as fh:
                fh.writelines(kept)
        self.scalars = Scalars(os.path.dirname(path), self.enabled, resume_step)  # the same records, for TensorBoard

    def write(self, record: dict) -> None:
        for listener in self.listeners:
            listener(record)
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.scalars.write(record)

    def close(self) -> None:
        self.scalars.close()
        for listener in self.listeners:
            getattr(listener, "close", lambda: None)()


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line a crash left half written."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


class Throughput:
    """Seconds of training steps (waiting for data, the step, the stop/NaN flags; not evaluation
    or saving): per log window, and over the run after the warm-up steps (images per second)."""

    def __init__(self, warmup_steps: int = 3):
        self.warmup, self.seen, self.images, self.seconds = warmup_steps, 0, 0, 0.0
        self.window_steps, self.window_seconds = 0, 0.0
        self._began = 0.0

    def begin(self) -> None:
        """A step starts: before its batch is fetched, so waiting for data counts."""
        self._began = time.perf_counter()

    def end(self, images: int) -> None:
        seconds = time.perf_counter() - self._began
        self.window_steps, self.window_seconds = self.window_steps + 1, self.window_seconds + seconds
        self.seen += 1
        if self.seen > self.warmup:
            self.images += images
            self.seconds += seconds

    def take_window(self) -> tuple[int, float]:
        """(steps, seconds) since the last call."""
        window = self.window_steps, self.window_seconds
        self.window_steps, self.window_seconds = 0, 0.0
        return window

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None


def progress_bar(env: DistEnv, total: int, initial: int):
    """A tqdm bar on rank 0 when stderr is a terminal; log lines otherwise."""
    if not env.is_main or not os.isatty(2):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
