"""Preemption: SIGTERM from Kubernetes, torchrun or a cloud's spot reclaim asks the run to stop.

torchrun sends SIGKILL about 30 s after SIGTERM (pytorch/pytorch#119856), so the handler only
sets a flag; the ranks agree on it at the end of the step (one small all-reduce), save a
checkpoint and exit 0. Running the same command again resumes.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

_received = False  # a SIGTERM reached this process while training (kept after the handler is gone)
_active: StopRequest | None = None  # the stop request of the run under way in this process


def sigterm_received() -> bool:
    """Whether the launcher asked this rank to stop: an error after that is a consequence of the
    stop (its loader's forkserver got the same signal), not a cause."""
    return _received


class StopRequest:
    """SIGTERM (Kubernetes, torchrun, a preempted VM) only sets a flag; the ranks agree on it
    at the end of the step, save, and exit 0 well inside the ~30 s grace period.

    Signal handlers can only be installed from the main thread. Where training runs on another
    (Ray Train), the launcher has the main thread install stop_on_sigterm() instead; either
    way the handler reaches the request under way in this process."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        global _active
        _active = self
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _on_sigterm)
        return self

    def __exit__(self, *exc):
        global _active
        _active = None
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def stop_on_sigterm() -> None:
    """Make SIGTERM a stop request for the run under way, whatever thread it trains on; outside a
    run, SIGTERM ends the process as by default. Call it on the main thread."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame):
    global _received
    request = _active
    if request is None or request.requested:  # no run to stop, or a second SIGTERM: stop waiting
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _received = True
    request.requested = True


@dataclass
class PreemptionNotice:
    """How a launcher learns that a node of the group is about to be reclaimed (Ray Train:
    ray.train.get_preemption_info()). `imminent()` is a barrier across the ranks, so every rank
    asks at the same steps: every `every` steps, at the step's end."""
    imminent: Callable[[], bool]
    every: int = 10


class PreemptionWatch:
    """Asks the notice at its steps; says once when a checkpoint should be saved at once, so that
    the restart after the reclaim loses none of the steps trained since the last one."""

    def __init__(self, notice: PreemptionNotice | None):
        self.notice, self.saved = notice, False

    def save_now(self, step: int) -> bool:
        if self.notice is None or self.saved or step % self.notice.every:
            return False
        self.saved = bool(self.notice.imminent())
        return self.saved
