"""Ray nodes that come and go, on a real local Ray cluster of several nodes on this machine.

An elastic run (--num-workers MIN:MAX) starts with the workers the cluster fits and grows the
group when a node joins: Ray restarts it at the larger size, and it resumes from its checkpoint.

A node drained for preemption:
`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION` is what a cloud's spot reclaim or a
Kubernetes pod deletion does to a Ray node (the node's own SIGTERM handler drains it with that
reason). Ray Train's watcher tells every worker; the launcher's check (every
--preemption-check-every steps) saves a checkpoint at once and trains on. Then the node goes
(its raylet killed, as the reclaim does): the survivor saves the step the lost worker
interrupted, and Ray restarts the group on the nodes left, counting a preemption, not a failure
(--max-failures 0 would end the run otherwise).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import BIN, ROOT, TINY, free_port, metrics, run_ok, summary
from tests.integration.test_ray import LAUNCHER
from tests.integration.test_ray import ray_env as token_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# This cluster's own token: test_ray's goes with its cluster.
TOKEN = Path(tempfile.mkdtemp(prefix="raytoken")) / "auth_token"
TOKEN.write_text(secrets.token_hex(32))


def ray_env(**extra) -> dict:
    return token_env(RAY_AUTH_TOKEN_PATH=str(TOKEN), **extra)


def ray_start(*args: str) -> None:
    ports = {flag: free_port() for flag in ("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                                            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                            "--runtime-env-agent-port")}
    run_ok([str(BIN / "ray"), "start", *args, "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())],
           timeout=180, env=ray_env())


@pytest.fixture(scope="module")
def nodes():
    """A head that runs no workers and three nodes of one CPU: two for the workers, one spare."""
    temp = tempfile.mkdtemp(prefix="rayp", dir="/tmp")
    gcs = free_port()
    try:
        ray_start("--head", "--num-cpus=0", f"--port={gcs}", f"--temp-dir={temp}", "--include-dashboard=false")
        for _ in range(3):
            ray_start(f"--address=127.0.0.1:{gcs}", "--num-cpus=1")
        yield f"127.0.0.1:{gcs}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], check=False, env=ray_env(), capture_output=True,
                       timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(TOKEN.parent, ignore_errors=True)


def wait_for(condition, proc, log, timeout_s: float = 240):
    deadline = time.time() + timeout_s
    while not (found := condition()):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.3)
    return found


def test_an_elastic_group_grows_when_a_node_joins_and_resumes_at_the_larger_size(nodes, tmp_path):
    out, log = tmp_path / "run", tmp_path / "launcher.log"
    # 12 images a step divide by 2, 3 and 4 workers, as every size of the range must.
    flags = [*TINY, "--global-batch-size", "12", "--steps", "40", "--checkpoint-every", "5", "--slow-rank", "0:250"]
    with open(log, "w") as sink:
        proc = subprocess.Popen([*LAUNCHER, "--address", nodes, "--num-workers", "2:4", "--cpus-per-worker", "1",
                                 "--resize-check-s", "5", *flags, "--out", str(out)],
                                cwd=ROOT, env=ray_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any(m.get("step", 0) >= 6 for m in metrics(out)) if (out / "metrics.jsonl").exists()
                 else False, proc, log)
        ray_start(f"--address={nodes}", "--num-cpus=1")  # a fourth joins
        joined_at, reached = time.time(), [0]

        def regrouped() -> bool:  # the newest step the first group reached, until a group of 4 logs
            logged = [m for m in metrics(out) if "rank_busy_ms" in m]
            reached[0] = max([reached[0]] + [m["step"] for m in logged if len(m["rank_busy_ms"]) == 3])
            return any(len(m["rank_busy_ms"]) == 4 for m in logged)
        wait_for(regrouped, proc, log)
        regrouped_at = time.time()
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    result = summary(out)
    assert result["status"] == "complete" and result["steps"] == 40 and result["world_size"] == 4, result
    resumed = int(result["resumed_from"].rsplit("step_", 1)[1][:8])
    sizes = [len(m["rank_busy_ms"]) for m in metrics(out) if "rank_busy_ms" in m]
    assert sizes == sorted(sizes) and sizes[0] == 3 and sizes[-1] == 4, sizes  # the three 1-CPU nodes, then 4
    print(f"grew from 3 to 4 workers; 4 logged {regrouped_at - joined_at:.1f} s after the node joined; the 3 had "
          f"reached step {reached[0]}, the 4 resumed from step {resumed}")
    assert 5 <= resumed <= reached[0]


def test_a_node_drained_for_preemption_saves_at_the_notice_and_the_group_resumes(nodes, tmp_path):
    out, log = tmp_path / "run", tmp_path / "launcher.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([*LAUNCHER, "--address", nodes, "--num-workers", "2", "--cpus-per-worker", "1",
                                 "--max-failures", "0", "--max-preemptions", "1", "--preemption-check-every", "2",
                                 *TINY, "--steps", "40", "--checkpoint-every", "0", "--slow-rank", "0:250",
                                 "--out", str(out)], cwd=ROOT, env=ray_env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        placed = re.compile(r"\[rank (\d)\] distributed-step ray: on node (\w+)")
        on_node = wait_for(lambda: len(found := dict(placed.findall(log.read_text()))) == 2 and found, proc, log)
        wait_for(lambda: any(m.get("step", 0) >= 4 for m in metrics(out)) if (out / "metrics.jsonl").exists()
                 else False, proc, log)
        doomed = on_node["1"]
        run_ok([str(BIN / "ray"), "drain-node", "--address", nodes, "--node-id", doomed,
                "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                "--deadline-remaining-seconds", "60"], env=ray_env())
        drained_at = time.time()
        notice = wait_for(lambda: re.search(r"preemption notice .*saving a checkpoint now", log.read_text()),
                          proc, log, 120)
        saved = wait_for(lambda: sorted((out / "checkpoints").glob("step_*.pt")), proc, log, 60)
        print(f"notice {time.time() - drained_at:.1f} s after the drain; saved {saved[-1].name}")
        raylet = subprocess.run(["pgrep", "-f", f"raylet.*{doomed}"], check=False, capture_output=True,
                                text=True).stdout.split()
        assert raylet, "the drained node's raylet"
        for pid in raylet:
            os.kill(int(pid), signal.SIGKILL)  # the reclaim
        reclaimed_at = time.time()
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
        print(f"the group ended {time.time() - reclaimed_at:.1f} s after the reclaim")
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert notice and "done; run directory" in output, output[-4000:]
    result = summary(out)
    assert result["status"] == "complete" and result["steps"] == 40 and result["resumed_from"], result
    resumed = int(result["resumed_from"].rsplit("step_", 1)[1][:8])
    assert resumed >= int(saved[-1].stem.split("_")[1]) and resumed < 40
    survivor = re.search(r"a peer failed; saved the last finished step, (\d+)", output)
    print(f"resumed from step {resumed}; the survivor saved step {survivor[1] if survivor else None}")
