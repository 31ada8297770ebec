"""What a checkpoint holds is written and read in one place (Run.state_dict / load_state_dict),
and both match checkpoint.REQUIRED_KEYS. In-process: one rank, no process group, 8 px images."""
from __future__ import annotations

import time

import pytest
import torch

from distributed_step import checkpoint as ckpt
from distributed_step.config import ConfigError, TrainConfig
from distributed_step.data.datasets import build_datasets
from distributed_step.model import build_model
from distributed_step.outcome import TrainingError
from distributed_step.parallel.process_group import detect, setup
from distributed_step.rundir import RunLock
from distributed_step.train import Run


def make_run(tmp_path, **overrides) -> Run:
    tmp_path.mkdir()
    settings = {"data": "synthetic", "synthetic_samples": 16, "image_size": 8, "global_batch_size": 8, "steps": 3,
                    "warmup_steps": 1, "log_every": 1, "out": str(tmp_path), "resume": "never"}
    cfg = TrainConfig(**{**settings, **overrides}).validate()
    sets = build_datasets(cfg)
    torch.manual_seed(cfg.seed)
    return Run(cfg, setup(detect(torch.device("cpu"))), sets, build_model(sets.num_classes), RunLock(cfg.out), None)


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_state_dict_holds_exactly_the_required_keys_and_round_trips(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    trained = make_run(tmp_path / "a")
    trained.fit()
    state = trained.state_dict()
    assert set(state) == set(ckpt.REQUIRED_KEYS)
    assert state["step"] == 3 and state["last_loss"] is not None and state["optimizer"]["state"]

    fresh = make_run(tmp_path / "b")
    assert fresh.step == 0
    fresh.load_state_dict(state)
    # Everything written is read back: a field that state_dict() writes but load_state_dict()
    # ignores (or the reverse) shows up here as a difference. "config" records the run that
    # saved (its --out differs here); the run that resumes keeps its own flags.
    # It also records the comm hook in use ("auto" resolved), which a resume on as many ranks keeps.
    assert state["config"] == {**trained.cfg.to_dict(), "comm_hook_chosen": trained.cfg.comm_hook}
    assert_same({k: v for k, v in fresh.state_dict().items() if k != "config"},
                {k: v for k, v in state.items() if k != "config"})


def test_resume_applies_changed_rates_and_refuses_changed_data(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    trained = make_run(tmp_path / "a", lr=0.001)
    trained.fit()
    state = trained.state_dict()

    faster = make_run(tmp_path / "b", lr=0.5, momentum=0.8, steps=6)
    faster.load_state_dict(state)
    group = faster.optimizer.param_groups[0]
    assert group["lr"] == 0.5 * faster.schedule(3) and group["momentum"] == 0.8  # not the checkpoint's
    faster.scheduler.step()
    assert group["lr"] == 0.5 * faster.schedule(4)  # and the schedule goes on from the new rate
    # The hook --comm-hook auto chose is kept on resume, but only when auto is asked for again:
    # an explicit --comm-hook wins over the checkpoint's choice.
    chosen = {**state, "config": {**state["config"], "comm_hook_chosen": "bf16"}}
    assert faster.resumed_hook is None
    faster.load_state_dict(chosen)
    assert faster.resumed_hook is None
    auto = make_run(tmp_path / "e", comm_hook="auto")
    auto.load_state_dict(chosen)
    assert auto.resumed_hook == "bf16"

    for overrides, message in (({"image_size": 16}, "--image-size 16 differs from the checkpoint's 8"),
                               ({"seed": 1}, "--seed 1 differs from the checkpoint's 0"),
                               ({"synthetic_samples": 32}, "--synthetic-samples 32 differs")):
        with pytest.raises(ConfigError, match=message):
            make_run(tmp_path / f"c{len(message)}", **overrides).load_state_dict(state)
    narrow = dict(state, model={**state["model"], "fc.weight": state["model"]["fc.weight"][:2]})
    with pytest.raises(ConfigError, match="has 10 classes, the checkpoint's model 2"):
        make_run(tmp_path / "d").load_state_dict(narrow)


def test_a_failing_run_waits_for_the_background_write_of_its_last_finished_step(tmp_path, monkeypatch):
    """A failure ends the process by os._exit, which does not wait for threads: fit() must, or
    the last finished step is left as a temporary file (a race seen in CI)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    write = ckpt.save_checkpoint

    def slow_write(*args, **kwargs):
        time.sleep(2.0)  # longer than the steps up to the failure
        return write(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_checkpoint", slow_write)
    run = make_run(tmp_path / "nan", lr=1e12, steps=6, checkpoint_every=1, warmup_steps=0)
    with pytest.raises(TrainingError, match="not finite"):
        run.fit()
    names = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert names and all(name.endswith(".pt") for name in names), names
    state = torch.load(tmp_path / "nan" / "checkpoints" / names[-1], map_location="cpu", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
