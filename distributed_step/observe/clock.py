"""PhaseClock: where each step's time goes (forward, backward, exposed communication, optimizer),
read only when the metrics are logged, so timing never synchronizes the step."""
from __future__ import annotations

import time

import torch
from torch import nn


def mark(cuda: bool):
    """Now, as the device sees it: on CUDA an event recorded on the current stream (read after a
    synchronize), which the device reaches when the work queued before it is done; on CPU, where
    the host runs the work itself, the host's clock."""
    if cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def seconds_between(begin, end, cuda: bool) -> float:
    """Between two marks (on CUDA, once the device has passed both)."""
    return begin.elapsed_time(end) / 1e3 if cuda else end - begin


class PhaseClock:
    """Accumulates time per phase without synchronizing the step.

    CPU work is synchronous, so the wall clock is exact. On CUDA, events are recorded in the
    stream and only read when the metrics are logged, so timing never stalls the GPU.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = {}
        self._pending: list[tuple[str, object, object]] = []
        self._last = None
        self._grads_ready = None  # when the last parameter's gradient was accumulated

    def watch_gradients(self, module: nn.Module) -> None:
        """Split backward into compute and exposed communication.

        Each parameter's hook stamps the time its gradient lands; the last stamp is the end of
        the backward computation. DDP's backward returns only once every bucket's all-reduce
        has finished, so what remains after that stamp is communication that backward did not
        hide ("comm"). Without DDP (or under no_sync) it is the autograd engine's wrap-up.
        """
        for param in module.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._stamp_gradient)

    def _stamp_gradient(self, _param) -> None:
        if not self.cuda:
            self._grads_ready = time.perf_counter()
            return
        if self._grads_ready is None:
            self._grads_ready = torch.cuda.Event(enable_timing=True)
        self._grads_ready.record()  # re-recording keeps the latest point in the stream

    def _now(self):
        return mark(self.cuda)

    def start(self) -> None:
        self._last = self._now()

    def lap_backward(self) -> None:
        """End of backward: "backward" up to the last gradient, "comm" for the rest."""
        ready, self._grads_ready = self._grads_ready, None
        if ready is None:  # no gradient was watched
            self.lap("backward")
            return
        now = self._now()
        self._add("backward", self._last, ready)
        self._add("comm", ready, now)
        self._last = now

    def lap(self, phase: str) -> None:
        now = self._now()
        self._add(phase, self._last, now)
        self._last = now

    def _add(self, phase: str, begin, end) -> None:
        if self.cuda:
            self._pending.append((phase, begin, end))
        else:
            self.totals[phase] = self.totals.get(phase, 0.0) + (end - begin)

    def read_ms(self) -> dict[str, float]:
        """Milliseconds per phase since the last read, then reset."""
        if self._pending:
            torch.cuda.synchronize()
            for phase, begin, end in self._pending:
                self.totals[phase] = self.totals.get(phase, 0.0) + seconds_between(begin, end, True)
            self._pending.clear()
        out = {phase: seconds * 1e3 for phase, seconds in self.totals.items()}
        self.totals = {}
        return out
