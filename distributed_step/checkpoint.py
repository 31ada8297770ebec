"""Checkpoints: atomic writes by rank 0, safe loads, newest-valid discovery, keep the last K.

A checkpoint is a plain dict of tensors and numbers, so it loads with `weights_only=True`
(no arbitrary unpickling) and `map_location="cpu"` (never onto GPU 0 from every rank).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil

import torch

from distributed_step.config import ConfigError

log = logging.getLogger("distributed_step")

_NAME = re.compile(r"^step_(\d+)\.pt$")
# Every key a checkpoint holds: what train's Run.state_dict() writes and load_state_dict()
# reads (tests/unit/test_run_state.py fails when the three drift apart).
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "batches_in_epoch",
                 "global_batch_size", "world_size", "rng", "config", "last_loss")
# What a resumed run may not change: the data, the order it is seen in (seed, global batch), and
# the model's shape. Everything else (rates and schedule, length, cadences, precision) applies.
FIXED_ON_RESUME = ("data", "synthetic_samples", "image_size", "seed", "global_batch_size", "small_input_stem")


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def save_atomic(obj, path: str) -> None:
    """Write to a temporary file, fsync, then rename: a crash leaves the old file or the new one,
    never half of one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A full disk must not stay full of half a checkpoint.
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint in the run directory, newest first."""
    folder = checkpoint_dir(out)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := _NAME.match(name))]
    return sorted(found, reverse=True)


def save_checkpoint(state: dict, out: str, keep: int, tidy: bool = True) -> str:
    """One writer (rank 0, or the survivor that claimed it: recovery.py). Writes
    checkpoints/step_NNNNNNNN.pt, then deletes all but the newest `keep`. `tidy` also removes
    the temporary files of saves a crash cut short; never while another survivor may be writing."""
    folder = checkpoint_dir(out)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder) if tidy else ():
        if ".pt.tmp." in name:  # left by a save that a crash cut short
            os.remove(os.path.join(folder, name))
    path = os.path.join(folder, f"step_{state['step']:08d}.pt")
    # Old checkpoints are pruned only after the new one is safe, so keep + 1 must fit: check
    # first, rather than fill the disk and fail halfway.
    needed, free = int(1.05 * _tensor_bytes(state)) + (1 << 20), shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{free / 1e6:.0f} MB free where a checkpoint needs about {needed / 1e6:.0f} MB")
    save_atomic(state, path)
    for _, old in list_checkpoints(out)[keep:]:
        with contextlib.suppress(FileNotFoundError):  # two survivors without a store both prune
            os.remove(old)
    return path


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str) -> dict:
    """Load and check one checkpoint; raises ValueError when it is unreadable or incomplete."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zips and bad pickles raise many types
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not a distributed_step checkpoint (missing {', '.join(missing)})")
    return state


def find_newest_valid(out: str) -> tuple[int, str] | None:
    """(step, path) of the newest checkpoint that loads; a corrupt newer one is skipped with a warning."""
    for step, path in list_checkpoints(out):
        try:
            load_checkpoint(path)
            return step, path
        except ValueError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def set_aside_newer(out: str, step: int) -> list[str]:
    """Rename checkpoints newer than the step a run starts from to *.stale (corrupt ones, or a
    previous run's under --resume never): they would otherwise count towards --keep-checkpoints
    and win the next --resume auto."""
    moved = []
    for found_step, path in list_checkpoints(out):
        if found_step > step:
            os.replace(path, path + ".stale")
            moved.append(path)
    return moved


def choose(out: str, resume: str) -> tuple[str | None, str | None]:
    """(checkpoint to resume from or None, error or None) for --resume auto | never | PATH.
    Rank 0 calls this; checkpoints newer than the chosen one are set aside first."""
    if resume == "never":
        path, step = None, 0
    elif resume == "auto":
        step, path = find_newest_valid(out) or (0, None)
    else:
        try:
            path, step = resume, load_checkpoint(resume)["step"]
        except ValueError as exc:
            return None, f"--resume: {exc}"
    for moved in set_aside_newer(out, step):
        log.warning("set aside %s: newer than step %d, where this run starts", moved, step)
    return path, None


def check_resumable(state: dict, cfg, num_classes: int) -> None:
    """Refuse a checkpoint whose data, data order or model shape differ from this run's flags
    (ConfigError naming the flag), and log every other flag that changed since it was saved."""
    saved = state["config"]
    for name in FIXED_ON_RESUME:
        if saved.get(name, getattr(cfg, name)) != getattr(cfg, name):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)} differs from the checkpoint's "
                              f"{saved[name]}: a resumed run keeps its data, data order and model shape "
                              "(use another --out, or --resume never, to start afresh)")
    classes = state["model"]["fc.weight"].shape[0]
    if classes != num_classes:
        raise ConfigError(f"--data {cfg.data} has {num_classes} classes, the checkpoint's model {classes}")
    for name, value in cfg.to_dict().items():
        if name not in ("out", "resume") and saved.get(name, value) != value:
            log.info("resume: --%s %s (the checkpoint had %s)", name.replace("_", "-"), value, saved[name])
