"""--profile-steps A:B: torch.profiler over steps A to B, one Chrome/Perfetto trace per rank.

    <out>/profile/rank<N>.json     open in https://ui.perfetto.dev or chrome://tracing

On the timeline each step shows `forward`, `backward` and `optimizer` (step.train_step labels
them with record_function); the gradient all-reduces appear as the backend's own events
(`gloo:all_reduce` / `nccl:all_reduce`), one per DDP bucket, on the thread that runs them. What
to look for: all-reduce events that start only after `backward` ends (communication not hidden),
a gap before `forward` (waiting for data), `optimizer` longer than on the other ranks' traces (a
slow rank), and on CUDA the kernels' stream against the CPU thread (the CPU running ahead or not).
"""
from __future__ import annotations

import logging
import os

import torch

from distributed_step.config import TrainConfig

log = logging.getLogger("distributed_step")


def parse_steps(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    first, last = (int(v) for v in text.split(":"))
    return first, last


class StepProfiler:
    def __init__(self, cfg: TrainConfig, rank: int, device: torch.device):
        self.steps = parse_steps(cfg.profile_steps)
        ranks = cfg.profile_ranks
        self.enabled = self.steps is not None and (ranks == "all" or str(rank) in ranks.split(","))
        self.path = os.path.join(cfg.out, "profile", f"rank{rank}.json")
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = None

    def before(self, next_step: int) -> None:
        if self.enabled and self.profiler is None and self.steps[0] <= next_step <= self.steps[1]:
            self.profiler = torch.profiler.profile(activities=self.activities)
            self.profiler.start()

    def after(self, step: int) -> None:
        if self.profiler is not None and step >= self.steps[1]:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends before B)."""
        if self.profiler is None:
            return
        self.profiler.stop()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.profiler.export_chrome_trace(self.path)
        self.profiler, self.enabled = None, False
        log.info("profile of steps %s written to %s", ":".join(map(str, self.steps)), self.path)
