"""Which rank is slow: every rank's phase times, gathered at each log point, and a warning that
names a rank that stays slower than the others.

A synchronous step runs at the pace of its slowest rank, and the others show that rank's delay
as waiting for the all-reduce (their comm phase). So each rank's *busy* time per step is what
compares: data wait + forward + backward + optimizer, its comm excluded. A rank is a straggler
when its busy time is at least THRESHOLD x the median of the ranks' (the lower median: with two
ranks, the faster one) for WINDOWS consecutive log windows. The warning names the rank, its host
and the phase most over its own median; summary.json lists every such episode. One small
all-gather per log point (a few floats per rank); nothing inside the step.
"""
from __future__ import annotations

import logging
import socket

import torch
import torch.distributed as dist

from distributed_step.parallel.process_group import DistEnv, all_gather_object

log = logging.getLogger("distributed_step")

PHASES = ("data", "forward", "backward", "comm", "optimizer")
BUSY = ("data", "forward", "backward", "optimizer")
THRESHOLD, WINDOWS = 1.15, 3


def lower_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


class StragglerWatch:
    def __init__(self, env: DistEnv):
        self.env = env
        self.hosts = all_gather_object(socket.gethostname(), env)  # once: which host each rank is on
        self.streak = [0] * env.world_size
        self.episodes: list[dict] = []

    def gather(self, phases_ms: dict[str, float]) -> list[list[float]]:
        """Every rank's (data, forward, backward, comm, optimizer) ms per step of this window."""
        mine = torch.tensor([phases_ms.get(f"{p}_ms", 0.0) for p in PHASES], dtype=torch.float64,
                            device=self.env.device)
        if not self.env.distributed:
            return [mine.tolist()]
        every = torch.empty(self.env.world_size * len(PHASES), dtype=torch.float64, device=self.env.device)
        # all_gather_single is torch 2.14's name for all_gather_into_tensor (deprecated there).
        gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
        gather(every, mine)  # flat: gloo wants the output 1-D
        return every.view(self.env.world_size, len(PHASES)).tolist()

    def window(self, step: int, phases_ms: dict[str, float]) -> dict:
        """Gather, judge, and return the per-rank arrays for metrics.jsonl (rank_*_ms)."""
        rows = self.gather(phases_ms)
        record = {f"rank_{p}_ms": [round(r[i], 3) for r in rows] for i, p in enumerate(PHASES)}
        busy = [sum(r[PHASES.index(p)] for p in BUSY) for r in rows]
        median = lower_median(busy)
        record["rank_busy_ms"] = [round(b, 3) for b in busy]
        record["rank_spread"] = round(max(busy) / median, 4) if median > 0 else 1.0
        for rank, value in enumerate(busy):
            slow = median > 0 and value >= THRESHOLD * median
            self.streak[rank] = self.streak[rank] + 1 if slow else 0
            if self.streak[rank] == WINDOWS:  # once per episode: the streak must break to warn again
                self._warn(step, rank, rows, value / median)
        if len(busy) > 1:
            record["rank_straggler"] = [int(streak >= WINDOWS) for streak in self.streak]  # named, and still slow
        return record

    def _warn(self, step: int, rank: int, rows: list[list[float]], ratio: float) -> None:
        excess = {p: rows[rank][PHASES.index(p)] - lower_median([r[PHASES.index(p)] for r in rows]) for p in BUSY}
        phase = max(excess, key=excess.get)
        episode = {"step": step, "rank": rank, "host": self.hosts[rank], "phase": phase, "ratio": round(ratio, 3)}
        self.episodes.append(episode)
        if not self.env.is_main:  # every rank reaches the same verdict; one says it
            return
        log.warning("straggler: rank %d on %s has been %.2fx the median rank's busy time for %d log windows "
                    "(step %d); most of it in %s (+%.1f ms per step)", rank, self.hosts[rank], ratio, WINDOWS,
                    step, phase, excess[phase])
