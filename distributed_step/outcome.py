"""What a run ends with: its Summary (summary.json), or the TrainingError that stopped it."""
from __future__ import annotations

from dataclasses import dataclass, field


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, disagreeing ranks); the message names the step."""


@dataclass
class Summary:
    status: str  # "complete" or "preempted"
    world_size: int
    steps: int
    epochs: float
    final_loss: float | None
    wall_time_s: float
    images_per_s: float | None
    resumed_from: str | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_samples: int | None = None
    replica_digests: list = field(default_factory=list)
    stragglers: list = field(default_factory=list)  # each slow-rank episode (stragglers.py)
