"""What a run ends with: its Summary (summary.json), or the TrainingError that stopped it."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field

from torch import nn

from distributed_step import checkpoint as ckpt

log = logging.getLogger("distributed_step")


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


def write_outputs(summary: Summary, net: nn.Module | None, out: str) -> None:
    """Rank 0's last files: model.pt (the weights alone; when `net` is given: the run completed)
    and summary.json."""
    try:
        if net is not None:
            weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            ckpt.save_atomic(weights, os.path.join(out, "model.pt"))
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(asdict(summary), fh, indent=2)
    except OSError as exc:  # the checkpoint of the last step is on disk: nothing is lost
        raise TrainingError(f"--out {out}: could not write model.pt or summary.json ({exc.strerror or exc}); "
                            f"the checkpoint of step {summary.steps} is kept") from None
    log.info("%s: %s", summary.status, json.dumps({k: v for k, v in asdict(summary).items()
                                                   if k != "replica_digests"}))
