"""The straggler rule (observe/stragglers.py): a rank whose busy time (its phases, comm excluded)
is at least THRESHOLD x the lower median of the ranks' for WINDOWS log windows in a row is
named once per episode. The rule runs here on rows we choose (the gather stubbed); the last
test runs it with the real gather on two gloo ranks."""
from __future__ import annotations

import logging
import socket

import pytest
import torch

from distributed_step.observe import stragglers
from distributed_step.observe.stragglers import PHASES, THRESHOLD, WINDOWS, StragglerWatch, lower_median
from distributed_step.parallel.process_group import DistEnv, detect, setup


def test_the_lower_median_is_the_faster_middle_value():
    assert lower_median([5.0]) == 5.0
    assert lower_median([3.0, 1.0, 2.0]) == 2.0
    assert lower_median([40.0, 10.0, 30.0, 20.0]) == 20.0  # not 25: of two middles, the faster
    assert lower_median([130.0, 100.0]) == 100.0


class Ranks:
    """A StragglerWatch for `size` ranks whose gather returns the rows each window() is given."""

    def __init__(self, monkeypatch, size: int, rank: int = 0):
        monkeypatch.setattr(stragglers, "all_gather_object", lambda obj, env: [f"host{r}" for r in range(size)])
        self.watch = StragglerWatch(DistEnv(rank, rank, size, size, torch.device("cpu"), "gloo", False))
        self.step = 0

    def window(self, busy: list[float], phase: str = "forward", comm: list[float] | None = None) -> dict:
        """One log window where rank r spent busy[r] ms per step in `phase` (and comm[r] in comm)."""
        rows = [[0.0] * len(PHASES) for _ in busy]
        for rank, value in enumerate(busy):
            rows[rank][PHASES.index(phase)] = value
            rows[rank][PHASES.index("comm")] = comm[rank] if comm else 0.0
        self.watch.gather = lambda phases_ms: rows
        self.step += 10
        return self.watch.window(self.step, {})

    def named(self) -> list[tuple[int, int]]:
        return [(e["step"], e["rank"]) for e in self.watch.episodes]


def test_a_rank_at_the_threshold_is_named_after_exactly_windows_in_a_row(monkeypatch):
    ranks = Ranks(monkeypatch, 3)
    for _ in range(WINDOWS - 1):
        ranks.window([100.0, THRESHOLD * 100.0, 100.0])
        assert ranks.named() == []
    ranks.window([100.0, THRESHOLD * 100.0, 100.0])
    assert ranks.named() == [(10 * WINDOWS, 1)]
    episode = ranks.watch.episodes[0]
    assert (episode["host"], episode["phase"], episode["ratio"]) == ("host1", "forward", round(THRESHOLD, 3))
    for _ in range(3):  # still slow: the same episode, no second warning
        ranks.window([100.0, 130.0, 100.0])
    assert len(ranks.watch.episodes) == 1


def test_just_under_the_threshold_is_never_named(monkeypatch):
    ranks = Ranks(monkeypatch, 3)
    for _ in range(2 * WINDOWS):
        ranks.window([100.0, THRESHOLD * 100.0 - 0.5, 100.0])
    assert ranks.named() == []


def test_one_fast_window_resets_the_streak_and_a_new_episode_is_named_again(monkeypatch):
    ranks = Ranks(monkeypatch, 2)
    slow, fast = [100.0, 130.0], [100.0, 101.0]
    for busy in [slow, slow, fast, slow, slow]:  # never WINDOWS in a row
        ranks.window(busy)
    assert ranks.named() == []
    ranks.window(slow)  # the third in a row since the reset: step 60
    for busy in [slow, fast, slow, slow, slow]:  # the episode ends, and a second one comes
        ranks.window(busy)
    assert ranks.named() == [(60, 1), (110, 1)]


def test_with_two_ranks_the_median_is_the_faster_one(monkeypatch):
    """130 vs 100 is 1.13x their mean (not named with a mean) but 1.3x the lower median."""
    ranks = Ranks(monkeypatch, 2)
    for _ in range(WINDOWS):
        record = ranks.window([100.0, 130.0])
    assert ranks.named() == [(30, 1)]
    assert record["rank_busy_ms"] == [100.0, 130.0] and record["rank_spread"] == 1.3
    assert ranks.watch.episodes[0]["ratio"] == 1.3


def test_waiting_for_the_all_reduce_is_not_being_slow(monkeypatch):
    """The fast ranks show the slow one's delay as comm; only busy time compares."""
    ranks = Ranks(monkeypatch, 3)
    for _ in range(WINDOWS + 1):
        record = ranks.window([100.0, 100.0, 160.0], comm=[60.0, 60.0, 0.0])
    assert ranks.named() == [(30, 2)]
    assert record["rank_comm_ms"] == [60.0, 60.0, 0.0] and record["rank_busy_ms"] == [100.0, 100.0, 160.0]


def test_two_slow_ranks_of_four_are_both_named_and_nothing_when_idle(monkeypatch):
    ranks = Ranks(monkeypatch, 4)
    for _ in range(WINDOWS):
        ranks.window([100.0, 150.0, 100.0, 120.0], phase="data")
    assert ranks.named() == [(30, 1), (30, 3)]
    assert {e["phase"] for e in ranks.watch.episodes} == {"data"}
    idle = Ranks(monkeypatch, 2)
    for _ in range(WINDOWS):
        record = idle.window([0.0, 5.0])  # a zero median (nothing measured yet) judges nobody
    assert idle.named() == [] and record["rank_spread"] == 1.0


def test_the_warning_names_the_phase_most_over_its_median_and_only_rank_0_says_it(monkeypatch, caplog):
    rows_per_rank = [[1.0, 10.0, 20.0, 5.0, 2.0], [1.5, 10.0, 35.0, 0.0, 3.0]]  # rank 1: +15 ms backward
    for rank, expect_log in ((0, True), (1, False)):
        watch = Ranks(monkeypatch, 2, rank=rank).watch
        watch.gather = lambda phases_ms: rows_per_rank
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distributed_step"):
            for step in range(WINDOWS):
                watch.window(step, {})
        assert [(e["rank"], e["phase"], e["ratio"]) for e in watch.episodes] == [(1, "backward", 1.5)]
        logged = [r.getMessage() for r in caplog.records if "straggler" in r.getMessage()]
        assert len(logged) == expect_log
        if expect_log:
            assert "rank 1 on host1" in logged[0] and "backward (+15.0 ms per step)" in logged[0]


def _watch_on_rank(slow_rank: int, windows: int) -> dict:
    env = setup(detect(torch.device("cpu")))
    watch, records = StragglerWatch(env), []
    for w in range(windows):
        slow = env.rank == slow_rank
        phases = {"data_ms": 1.0, "forward_ms": 10.0, "backward_ms": 30.0 if slow else 20.0,
                  "comm_ms": 1.0 if slow else 11.0, "optimizer_ms": 2.0}
        records.append(watch.window(100 * (w + 1), phases))
    return {"hosts": watch.hosts, "episodes": watch.episodes, "last": records[-1]}


def test_on_two_ranks_both_gather_the_same_rows_and_name_the_slow_one(gloo_world):
    ranks = gloo_world.run(_watch_on_rank, 1, WINDOWS)
    host = socket.gethostname()
    for result in ranks:
        assert result["hosts"] == [host, host]
        assert result["episodes"] == [{"step": 100 * WINDOWS, "rank": 1, "host": host, "phase": "backward",
                                       "ratio": pytest.approx(43 / 33, abs=1e-3)}]
        assert result["last"]["rank_backward_ms"] == [20.0, 30.0]
        assert result["last"]["rank_comm_ms"] == [11.0, 1.0]
        assert result["last"]["rank_busy_ms"] == [33.0, 43.0]
