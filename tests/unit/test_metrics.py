"""metrics.jsonl on resume, in-process: steps past the resumed one and half-written lines go."""
from __future__ import annotations

import json

import torch

from distributed_step.observe.metrics import JsonlLog, Throughput
from distributed_step.parallel.process_group import DistEnv

ONE_RANK = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo", False)


def test_resume_truncates_to_the_resumed_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 7)] + ['{"step": 7, "lo']
    path.write_text("\n".join(lines) + "\n")
    log = JsonlLog(str(path), ONE_RANK, resume_step=4)
    log.write({"step": 5, "loss": 0.5})
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_other_ranks_never_write(tmp_path):
    path = tmp_path / "metrics.jsonl"
    JsonlLog(str(path), DistEnv(1, 1, 2, 2, torch.device("cpu"), "gloo", False), 0).write({"step": 1})
    assert not path.exists()


def test_throughput_skips_warmup_and_windows_reset():
    timer = Throughput(warmup_steps=1)
    for _ in range(3):
        timer.begin()
        timer.end(images=10)
    steps, seconds = timer.take_window()
    assert steps == 3 and seconds > 0 and timer.take_window() == (0, 0.0)
    assert timer.images == 20 and timer.images_per_s > 0
