"""TensorBoard scalars of a run, written by rank 0 under <out>/tensorboard/.

    tensorboard --logdir runs/default/tensorboard      # then open http://localhost:6006

Every record that goes to metrics.jsonl goes here too: train/ (loss, lr, epoch), speed/
(images_per_s, step_ms and its phases, data_ms), eval/ (held-out loss and accuracy), ranks/ (the
per-rank spread). A resumed run purges what the crashed run logged past its checkpoint, so each
curve holds each step once. Without the tensorboard package (an image that did not install our
dependencies) the run goes on and says once what to install.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("distributed_step")


def tag(key: str) -> str:
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    if key.startswith("rank_"):
        return f"ranks/{key.removeprefix('rank_')}"
    if key.endswith("_ms") or key == "images_per_s":
        return f"speed/{key}"
    return f"train/{key}"


class Scalars:
    def __init__(self, out: str, enabled: bool, resume_step: int):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            log.warning("TensorBoard scalars are off: the tensorboard package is missing (pip install tensorboard)")
            return
        # purge_step: TensorBoard drops this directory's events at or after it: a crashed run's
        # tail, or everything when the run starts over (step 0), as metrics.jsonl does.
        self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()  # at log points only: a crash loses no logged step

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
