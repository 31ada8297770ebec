"""Seeing inside a run: the slow rank named from every rank's gathered phase times, its episode
in summary.json, per-rank arrays in metrics.jsonl, and plot's per-rank chart."""
from __future__ import annotations

import json
import socket

import pytest

from tests.helpers import TINY, metrics, run_ok, summary, torchrun_cmd

pytestmark = pytest.mark.slow


def test_a_slowed_rank_is_named_with_its_host_and_phase_and_profiled(tmp_path):
    out = tmp_path / "slow"
    proc = run_ok(torchrun_cmd(2, TINY + ["--steps", "8", "--slow-rank", "1:300", "--checkpoint-every", "0",
                                          "--profile-steps", "2:3", "--out", str(out)]))
    warnings = [line for line in proc.output.splitlines() if "straggler:" in line]
    assert len(warnings) == 1 and "[rank 0]" in warnings[0], proc.output[-3000:]  # once, by rank 0
    assert f"rank 1 on {socket.gethostname()}" in warnings[0] and "forward" in warnings[0]
    episodes = summary(out)["stragglers"]
    assert [(e["rank"], e["host"], e["phase"]) for e in episodes] == [(1, socket.gethostname(), "forward")]
    assert episodes[0]["ratio"] >= 1.15 and episodes[0]["step"] >= 3
    logged = [m for m in metrics(out) if "loss" in m]
    assert all(len(m["rank_busy_ms"]) == 2 and len(m["rank_forward_ms"]) == 2 for m in logged)
    late = logged[-1]
    assert late["rank_forward_ms"][1] - late["rank_forward_ms"][0] > 250  # the 300 ms, seen in forward
    assert late["rank_comm_ms"][0] > late["rank_comm_ms"][1]  # the fast rank waits for the slow one

    from distributed_step.tools import plot

    assert plot.main([str(out), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "ranks.png").stat().st_size > 0

    for rank in (0, 1):  # --profile-steps 2:3: a Chrome trace per rank with the phases and the all-reduce
        events = json.loads((out / "profile" / f"rank{rank}.json").read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert {"forward", "backward", "optimizer"} <= names
        assert sum(1 for e in events if e.get("name") == "forward" and e.get("ph") == "X") == 2  # steps 2, 3
        assert any("all_reduce" in n or "allreduce" in n for n in names), sorted(names)[:50]
