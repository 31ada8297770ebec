"""Periodic checkpoints written in the background (distributed_step/background_save.py): what is
written is the state as staged, whatever the run does next; a failed write stops the next save."""
from __future__ import annotations

import torch

from distributed_step import checkpoint as ckpt
from distributed_step.background_save import CheckpointWriter


def test_the_background_write_holds_the_state_as_staged_and_is_told_at_the_next_save(tmp_path):
    weights = torch.zeros(1000)
    writer = CheckpointWriter(str(tmp_path), keep=2)
    assert writer.save(lambda: {"step": 4, "w": weights}, 4, background=True) == ([], None)
    weights.add_(1)  # the next steps move the live state on while the thread writes
    written, error = writer.save(lambda: {"step": 8, "w": weights}, 8, background=False)
    assert error is None and [step for _, step in written] == [4, 8]
    assert torch.equal(torch.load(written[0][0])["w"], torch.zeros(1000))
    assert torch.equal(torch.load(written[1][0])["w"], torch.ones(1000))
    assert writer.finish() is None  # nothing under way


def test_a_failed_background_write_stops_the_next_save_naming_its_step(tmp_path, monkeypatch):
    writer = CheckpointWriter(str(tmp_path), keep=2)

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_checkpoint", full_disk)
    writer.save(lambda: {"step": 4}, 4, background=True)
    written, error = writer.save(lambda: {"step": 8}, 8, background=False)
    assert written == [] and "could not save the checkpoint of step 4 (No space left on device)" in error
    writer.save(lambda: {"step": 12}, 12, background=True)
    assert writer.finish() is None  # a survivor must not count step 12 as on disk
