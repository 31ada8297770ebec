"""Fault injection for the tests and for drills (debug flags, hidden from --help).

--fail-once-at-step K: a rank (--fail-rank, default the highest) is SIGKILLed in step K, once per
run directory (a marker file remembers), so a restarted job gets past it: torchrun, Ray and
Kubernetes restarts. --fail-phase says where in the step: before-forward, backward, optimizer,
or flags (after the step, while its flags are being agreed). --fail-signal term sends SIGTERM
instead of SIGKILL: a stop request, as a preempted node's processes get.
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


def inject(cfg: TrainConfig, step: int, rank: int, world_size: int, phase: str = "before-forward") -> None:
    """The drills at `phase` of `step` (the step being run)."""
    if cfg.fail_once_at_step == step and phase == cfg.fail_phase and rank == _failing_rank(cfg, world_size):
        _die_once(cfg, step, rank, phase)
    if phase == "before-forward" and cfg.stall_at_step == step and rank == world_size - 1:
        log.warning("--stall-at-step %d: this rank stops joining collectives now", step)
        # SIGTERM ends it, as it would a rank stuck outside Python's signal handling; else torchrun
        # would wait out its 30 s grace before the SIGKILL.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(3600)


def arm(cfg: TrainConfig, net, optimizer, running_step, rank: int, world_size: int) -> None:
    """--fail-phase backward / optimizer: hooks that kill this rank there. `running_step()` is the
    step being run. Backward: when the gradient of a parameter half-way through the model is
    computed, after DDP has sent the buckets of the layers behind it."""
    if not cfg.fail_once_at_step or rank != _failing_rank(cfg, world_size):
        return
    if cfg.fail_phase == "backward":
        params = [p for p in net.parameters() if p.requires_grad]
        params[len(params) // 2].register_hook(
            lambda grad: inject(cfg, running_step(), rank, world_size, "backward"))
    elif cfg.fail_phase == "optimizer":
        optimizer.register_step_pre_hook(lambda *_: inject(cfg, running_step(), rank, world_size, "optimizer"))


def _failing_rank(cfg: TrainConfig, world_size: int) -> int:
    return world_size - 1 if cfg.fail_rank < 0 else cfg.fail_rank


def _die_once(cfg: TrainConfig, step: int, rank: int, phase: str) -> None:
    marker = os.path.join(cfg.out, f".failed_once_at_step_{step}")
    if os.path.exists(marker):
        return
    term = cfg.fail_signal == "term"
    with open(marker, "w") as fh:
        fh.write(f"rank {rank} {'was sent SIGTERM' if term else 'died'} here on purpose "
                 f"(--fail-once-at-step {step}, {phase}) at {time.time():.3f}\n")
        fh.flush()
        os.fsync(fh.fileno())
    log.warning("--fail-once-at-step %d: %s this rank now (%s)", step, "sending SIGTERM to" if term else "killing",
                phase)
    os.kill(os.getpid(), signal.SIGTERM if term else signal.SIGKILL)


def slow_down(cfg: TrainConfig, rank: int) -> None:
    if cfg.slow_rank:
        slow, ms = (int(v) for v in cfg.slow_rank.split(":"))
        if rank == slow:
            time.sleep(ms / 1e3)
