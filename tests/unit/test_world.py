"""The harness behind `gloo_world` (testing/world.py): results by rank, a rank's exception with
its traceback, and a bounded wait for a rank that never answers (its stacks, then a fresh world)."""
from __future__ import annotations

import os
import time

import pytest
import torch

from testing.world import WorldError


def _rank_and_sum(value: float, *, scale: float = 1.0) -> tuple[int, torch.Tensor]:
    import torch.distributed as dist

    total = torch.tensor([value * (dist.get_rank() + 1)])
    dist.all_reduce(total)
    return int(os.environ["RANK"]), total * scale


def _fail_on_rank_1() -> int:
    if int(os.environ["RANK"]) == 1:
        raise ValueError("only on rank 1")
    return 0


def _sleep_on_rank_1(seconds: float) -> int:
    if int(os.environ["RANK"]) == 1:
        time.sleep(seconds)
    return 0


def test_every_rank_runs_the_function_and_the_results_come_back_by_rank(gloo_world):
    results = gloo_world.run(_rank_and_sum, 1.5, scale=2.0)
    assert [rank for rank, _ in results] == [0, 1]
    assert [total.item() for _, total in results] == [9.0, 9.0]  # (1.5 + 3.0) x 2 on both ranks


def test_a_rank_that_raises_comes_back_with_its_traceback_and_the_world_stays(gloo_world):
    pids = gloo_world.run(os.getpid)
    with pytest.raises(WorldError) as caught:
        gloo_world.run(_fail_on_rank_1)
    message = str(caught.value)
    assert "--- rank 1 error" in message and "--- rank 0" not in message
    assert "in _fail_on_rank_1" in message and message.rstrip().endswith("ValueError: only on rank 1")
    assert gloo_world.run(os.getpid) == pids  # nobody waited on the failed rank: no restart


def test_a_rank_that_never_answers_is_killed_with_its_stacks_and_the_next_run_starts_afresh(gloo_world):
    pids = gloo_world.run(os.getpid)
    began = time.monotonic()
    with pytest.raises(WorldError) as caught:
        gloo_world.run(_sleep_on_rank_1, 600, timeout_s=1.0)
    assert time.monotonic() - began < 5
    message = str(caught.value)
    assert "--- rank 1 hung" in message and "no answer within 1 s" in message
    assert "in _sleep_on_rank_1" in message  # where it was stuck, from faulthandler
    fresh = gloo_world.run(os.getpid)
    assert len(set(fresh)) == 2 and not set(fresh) & set(pids)
    assert [total.item() for _, total in gloo_world.run(_rank_and_sum, 1.0)] == [3.0, 3.0]
