"""Seeing inside a run: the slow rank named from every rank's gathered phase times, its episode
in summary.json, per-rank arrays in metrics.jsonl, Prometheus's view of it scraped while the run
goes on (--metrics-port), and plot's per-rank chart."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ROOT, TINY, child_env, free_port, metrics, summary, torchrun_cmd

pytestmark = pytest.mark.slow


def scrape_while_running(cmd: list[str], port: int, log) -> list[dict]:
    """Run `cmd`, scraping rank 0's Prometheus endpoint until it ends: one dict per answered scrape."""
    scrapes = []
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None:
            time.sleep(0.1)
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:  # not serving yet, or no longer
                continue
            scrapes.append({(s.name, s.labels.get("rank")): s.value
                            for family in text_string_to_metric_families(text) for s in family.samples})
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    return scrapes


def test_a_slowed_rank_is_named_with_its_host_and_phase_and_profiled(tmp_path):
    out, port = tmp_path / "slow", free_port()
    scrapes = scrape_while_running(torchrun_cmd(2, TINY + ["--steps", "8", "--slow-rank", "1:300",
                                                           "--checkpoint-every", "0", "--profile-steps", "2:3",
                                                           "--metrics-port", str(port), "--out", str(out)]),
                                   port, tmp_path / "log")
    output = (tmp_path / "log").read_text()
    warnings = [line for line in output.splitlines() if "straggler:" in line]
    assert len(warnings) == 1 and "[rank 0]" in warnings[0], output[-3000:]  # once, by rank 0
    assert f"rank 1 on {socket.gethostname()}" in warnings[0] and "forward" in warnings[0]
    episodes = summary(out)["stragglers"]
    assert [(e["rank"], e["host"], e["phase"]) for e in episodes] == [(1, socket.gethostname(), "forward")]
    assert episodes[0]["ratio"] >= 1.15 and episodes[0]["step"] >= 3
    logged = [m for m in metrics(out) if "loss" in m]
    assert all(len(m["rank_busy_ms"]) == 2 and len(m["rank_forward_ms"]) == 2 for m in logged)
    late = logged[-1]
    assert late["rank_forward_ms"][1] - late["rank_forward_ms"][0] > 250  # the 300 ms, seen in forward
    assert late["rank_comm_ms"][0] > late["rank_comm_ms"][1]  # the fast rank waits for the slow one

    # Prometheus saw the run move on, with the numbers metrics.jsonl has, and the straggler named.
    seen = [s for s in scrapes if s.get(("distributed_step_step", None), math.nan) >= 1]  # NaN: none logged yet
    steps = [s[("distributed_step_step", None)] for s in seen]
    assert len(set(steps)) >= 2 and steps == sorted(steps), steps
    loss_at = {m["step"]: m["loss"] for m in logged}
    assert all(s[("distributed_step_loss", None)] == pytest.approx(loss_at[s[("distributed_step_step", None)]],
                                                                   rel=1e-12) for s in seen)
    assert seen[-1][("distributed_step_rank_busy_seconds", "1")] > 0.25
    assert any(s.get(("distributed_step_rank_straggler", "1")) == 1 for s in seen), seen[-1]
    assert all(s.get(("distributed_step_rank_straggler", "0"), 0) == 0 for s in seen)

    from distributed_step.tools import plot

    assert plot.main([str(out), "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "ranks.png").stat().st_size > 0

    for rank in (0, 1):  # --profile-steps 2:3: a Chrome trace per rank with the phases and the all-reduce
        events = json.loads((out / "profile" / f"rank{rank}.json").read_text())["traceEvents"]
        names = {e.get("name", "") for e in events}
        assert {"forward", "backward", "optimizer"} <= names
        assert sum(1 for e in events if e.get("name") == "forward" and e.get("ph") == "X") == 2  # steps 2, 3
        assert any("all_reduce" in n or "allreduce" in n for n in names), sorted(names)[:50]
