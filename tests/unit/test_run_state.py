"""What a checkpoint holds is written and read in one place (Run.state_dict / load_state_dict),
and both match checkpoint.REQUIRED_KEYS. In-process: one rank, no process group, 8 px images."""
from __future__ import annotations

import torch

from distributed_step import checkpoint as ckpt
from distributed_step.config import TrainConfig
from distributed_step.data import build_datasets
from distributed_step.dist import detect, setup
from distributed_step.model import build_model
from distributed_step.train import Run


def make_run(tmp_path, **overrides) -> Run:
    tmp_path.mkdir()
    cfg = TrainConfig(data="synthetic", synthetic_samples=16, image_size=8, global_batch_size=8, steps=3,
                      warmup_steps=1, log_every=1, out=str(tmp_path), resume="never", **overrides).validate()
    sets = build_datasets(cfg)
    torch.manual_seed(cfg.seed)
    return Run(cfg, setup(detect(torch.device("cpu"))), sets, build_model(sets.num_classes), None)


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
    assert state["config"] == trained.cfg.to_dict()
    assert_same({k: v for k, v in fresh.state_dict().items() if k != "config"},
                {k: v for k, v in state.items() if k != "config"})
