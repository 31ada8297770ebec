"""Fault injection for the tests and for drills (debug flags, hidden from --help).

--fail-once-at-step K: the highest rank is SIGKILLed before step K, once per run directory (a
marker file remembers), so a restarted job gets past it: torchrun, Ray and Kubernetes restarts.
--stall-at-step K: the highest rank stops joining collectives before step K, as a rank stuck
in I/O or a driver would: the others must fail within --timeout-s, leaving stack files.
--slow-rank R:MS: rank R sleeps MS ms in every step's forward, a straggler for the detector.
"""
from __future__ import annotations

import logging
import os
import signal
import time

from distributed_step.config import TrainConfig

log = logging.getLogger("distributed_step")


def inject(cfg: TrainConfig, next_step: int, rank: int, world_size: int) -> None:
    if rank != world_size - 1:
        return
    k = cfg.fail_once_at_step
    if k and next_step == k:
        marker = os.path.join(cfg.out, f".failed_once_at_step_{k}")
        if not os.path.exists(marker):
            with open(marker, "w") as fh:
                fh.write(f"rank {rank} died here on purpose (--fail-once-at-step {k})\n")
                fh.flush()
                os.fsync(fh.fileno())
            log.warning("--fail-once-at-step %d: killing this rank now", k)
            os.kill(os.getpid(), signal.SIGKILL)
    if cfg.stall_at_step and next_step == cfg.stall_at_step:
        log.warning("--stall-at-step %d: this rank stops joining collectives now", cfg.stall_at_step)
        # SIGTERM ends it, as it would a rank stuck outside Python's signal handling; else torchrun
        # would wait out its 30 s grace before the SIGKILL.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(3600)


def slow_down(cfg: TrainConfig, rank: int) -> None:
    if cfg.slow_rank:
        slow, ms = (int(v) for v in cfg.slow_rank.split(":"))
        if rank == slow:
            time.sleep(ms / 1e3)
