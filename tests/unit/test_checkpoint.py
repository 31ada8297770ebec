"""Atomic saves, keep-last-K, and skipping a corrupt newest checkpoint."""
import logging
import shutil

import pytest
import torch

from distributed_step import checkpoint as ckpt


def state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "scheduler": {}, "scaler": None,
            "step": step, "epoch": 0, "batches_in_epoch": step, "global_batch_size": 8, "world_size": 1,
            "rng": {}, "config": {}, "last_loss": None}


def test_keeps_the_newest_k_and_leaves_no_temp_files(tmp_path):
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(state(step), str(tmp_path), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000006.pt", "step_00000008.pt"]


def test_corrupt_newest_is_skipped_with_a_warning(tmp_path, caplog):
    for step in (2, 4):
        ckpt.save_checkpoint(state(step), str(tmp_path), keep=3)
    newest = tmp_path / "checkpoints" / "step_00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a save cut short by a crash or a full disk
    (tmp_path / "checkpoints" / "step_00000009.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="distributed_step"):
        step, chosen = ckpt.find_newest_valid(str(tmp_path))
    assert step == 2 and chosen.endswith("step_00000002.pt")
    assert sum("skipping checkpoint" in r.message for r in caplog.records) == 2
    assert ckpt.load_checkpoint(chosen)["model"]["w"][0] == 2.0


def test_incomplete_state_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="missing optimizer"):
        ckpt.load_checkpoint(str(path))


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({**state(1), "extra": shutil.Error("x")}, path)  # not plain data: needs full unpickling
    with pytest.raises(ValueError, match="unreadable"):
        ckpt.load_checkpoint(str(path))


def test_newer_checkpoints_are_set_aside_and_temp_files_cleaned(tmp_path):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(state(step), str(tmp_path), keep=5)
    (tmp_path / "checkpoints" / "step_00000008.pt.tmp.123").write_bytes(b"cut short")
    moved = ckpt.set_aside_newer(str(tmp_path), 2)
    assert sorted(moved) == [str(tmp_path / "checkpoints" / f"step_0000000{s}.pt") for s in (4, 6)]
    ckpt.save_checkpoint(state(3), str(tmp_path), keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000002.pt", "step_00000003.pt", "step_00000004.pt.stale", "step_00000006.pt.stale"]


def test_a_full_disk_refuses_before_writing_and_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno
    from collections import namedtuple

    ckpt.save_checkpoint(state(2), str(tmp_path), keep=3)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError) as err:
        ckpt.save_checkpoint(state(4), str(tmp_path), keep=3)
    assert err.value.errno == errno.ENOSPC and "MB free where a checkpoint needs" in str(err.value)
    monkeypatch.undo()

    def half_written(obj, fh):
        fh.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", half_written)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(state(6), str(tmp_path), keep=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002.pt"]
    assert ckpt.load_checkpoint(str(tmp_path / "checkpoints" / "step_00000002.pt"))["step"] == 2
