"""When a finished step logs, evaluates or checkpoints: decided here once, for the loop."""
from __future__ import annotations

from dataclasses import dataclass

from distributed_step.config import TrainConfig


@dataclass(frozen=True)
class Duties:
    """What a finished step must do before the next: the one place that decides it."""
    log: bool
    evaluate: bool
    checkpoint: bool
    last: bool

    @property
    def writes(self) -> bool:
        """Does anything leave this step (a log line, an evaluation, a file)? Then the step
        flags are settled first: nothing is written from a step a rank found not finite."""
        return self.log or self.evaluate or self.checkpoint or self.last


def duties(cfg: TrainConfig, step: int, total_steps: int, stopping: bool) -> Duties:
    """Log every --log-every steps, evaluate every --eval-every (the last step's evaluation is
    the final one), checkpoint every --checkpoint-every; a stop logs and checkpoints at once."""
    last = step == total_steps
    return Duties(log=step % cfg.log_every == 0 or last or stopping,
                  evaluate=bool(cfg.eval_every) and step % cfg.eval_every == 0 and not last,
                  checkpoint=stopping or (bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0),
                  last=last)
