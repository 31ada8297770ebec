"""The Ray Train launcher on a real local Ray cluster (head with dashboard / job server).

`ray job submit` runs `python -m distributed_step ray` (distributed_step/launch/ray_train.py),
which runs the same core through TorchTrainer; its
result must equal torchrun's, a killed worker must resume exactly from the checkpoint Ray holds,
and bad input must fail in bounded time.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    BIN,
    ROOT,
    TINY,
    child_env,
    free_port,
    load_weights,
    metrics,
    run,
    run_ok,
    summary,
    torchrun_cmd,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FLAGS = TINY + ["--steps", "6", "--checkpoint-every", "2", "--lr", "0.01"]
LAUNCHER = [sys.executable, "-m", "distributed_step", "ray"]  # the [ray] extra's command


# Token authentication on, as on any cluster: without it the job server runs anyone's code. The
# cluster, the jobs CLI and the launcher all read the token from this file.
TOKEN = Path(tempfile.mkdtemp(prefix="raytoken")) / "auth_token"
TOKEN.write_text(secrets.token_hex(32))


def ray_env(**extra) -> dict:
    settings = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(TOKEN), "RAY_USAGE_STATS_ENABLED": "0",
                "PATH": f"{BIN}:{os.environ['PATH']}"}
    return child_env(**{**settings, **extra})


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    run_ok([str(BIN / "ray"), "start", "--head", "--num-cpus=4", f"--port={gcs}", f"--temp-dir={temp}",
            "--include-dashboard=true", f"--dashboard-port={dashboard}", "--disable-usage-stats"],
           timeout=180, env=ray_env())
    try:
        yield {"gcs": f"127.0.0.1:{gcs}", "jobs": f"http://127.0.0.1:{dashboard}"}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], check=False, env=ray_env(), capture_output=True,
                       timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(TOKEN.parent, ignore_errors=True)


def test_a_submission_without_the_token_is_refused(cluster, tmp_path):
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    hello = ["--", "python", "-c", "print('ran:', 6 * 7)"]
    for env in (ray_env(RAY_AUTH_TOKEN_PATH=str(wrong)), ray_env(RAY_AUTH_MODE="disabled")):
        refused = run([str(BIN / "ray"), "job", "submit", "--address", cluster["jobs"], *hello], timeout=120, env=env)
        assert refused.returncode != 0 and "ran: 42" not in refused.output, refused.output[-2000:]
    accepted = run_ok([str(BIN / "ray"), "job", "submit", "--address", cluster["jobs"], *hello], timeout=120,
                      env=ray_env())
    assert "ran: 42" in accepted.output


def submit(cluster, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return run([str(BIN / "ray"), "job", "submit", "--address", cluster["jobs"], "--working-dir", str(ROOT),
                "--", "python", "-m", "distributed_step", "ray", *args], timeout=timeout, env=ray_env())


@pytest.fixture(scope="module")
def reference(shared_tmp):
    out = shared_tmp / "ray_reference_torchrun"
    run_ok(torchrun_cmd(2, FLAGS + ["--out", str(out)]))
    return out


@pytest.fixture(scope="module")
def ray_job(cluster, shared_tmp):
    out = shared_tmp / "ray_job"
    # Asking Ray about preemption at every step (a barrier) must not change the math.
    proc = submit(cluster, "--num-workers", "2", "--preemption-check-every", "1", *FLAGS, "--out", str(out))
    assert proc.returncode == 0 and "succeeded" in proc.output, proc.output[-4000:]
    asked = re.search(r"asked about preemption (\d+) times, ([0-9.]+) ms each", proc.output)
    assert asked and int(asked[1]) == 6, proc.output[-4000:]
    print(f"ray.train.get_preemption_info: {asked[2]} ms a call")
    # Ray's Result holds the metrics reported with the newest checkpoint (Train V2's rule): the
    # last step's, as metrics.jsonl logged them.
    shown = json.loads(re.search(r"Ray's last metrics (\{.*\})", proc.output)[1])
    assert shown["step"] == 6 and shown["loss"] == next(m["loss"] for m in metrics(out) if m.get("step") == 6
                                                         and "loss" in m)
    return out


def test_job_submit_equals_torchrun_and_resubmit_resumes(cluster, reference, ray_job):
    out = ray_job
    ours, theirs = load_weights(out / "model.pt"), load_weights(reference / "model.pt")
    largest = max(t.abs().max().item() for t in theirs.values() if t.is_floating_point())
    worst = max((ours[k].double() - theirs[k].double()).abs().max().item()
                for k in theirs if theirs[k].is_floating_point())
    assert worst <= 1e-6 * largest
    for name in ("config.yaml", "metrics.jsonl", "model.pt", "summary.json", "checkpoints"):
        assert (out / name).exists(), name
    assert summary(out)["world_size"] == 2
    # Each checkpoint reported to Ray, in Ray's run directory: a hard link, not a second copy.
    reported = sorted((out / "ray").rglob("*.pt"))
    assert [p.name for p in reported] == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    assert all(p.samefile(out / "checkpoints" / p.name) for p in reported)

    again = submit(cluster, "--num-workers", "2", *FLAGS, "--out", str(out))
    assert again.returncode == 0, again.output[-4000:]
    assert summary(out)["resumed_from"] is not None and summary(out)["steps"] == 6


def test_stopped_job_resubmitted_resumes(cluster, shared_tmp):
    out = shared_tmp / "ray_stopped"
    args = ["--num-workers", "2", *TINY, "--steps", "30", "--checkpoint-every", "2", "--out", str(out)]
    run_ok([str(BIN / "ray"), "job", "submit", "--address", cluster["jobs"], "--no-wait", "--submission-id",
            "stop-me", "--working-dir", str(ROOT), "--", "python", "-m", "distributed_step", "ray", *args],
           env=ray_env())
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "checkpoints").glob("step_*.pt")):
        time.sleep(0.5)
    run_ok([str(BIN / "ray"), "job", "stop", "--address", cluster["jobs"], "stop-me"], env=ray_env())
    stopped_at = max(int(p.stem.split("_")[1]) for p in (out / "checkpoints").glob("step_*.pt"))
    assert 2 <= stopped_at < 30 and not (out / "model.pt").exists()

    proc = submit(cluster, *args)
    assert proc.returncode == 0, proc.output[-4000:]
    result = summary(out)
    assert result["status"] == "complete" and result["steps"] == 30 and result["resumed_from"] is not None
    assert int(result["resumed_from"].rsplit("step_", 1)[1][:8]) >= 2  # not started over


def test_killed_worker_resumes_from_the_step_its_survivor_saved_bit_exactly(cluster, ray_job, shared_tmp):
    straight, crashed = ray_job, shared_tmp / "ray_crashed"  # the uninterrupted run: the submitted job
    proc = run_ok([*LAUNCHER, "--address", cluster["gcs"], "--num-workers", "2", *FLAGS,
                   "--max-failures", "1", "--fail-once-at-step", "4", "--out", str(crashed)],
                  timeout=400, env=ray_env())
    assert "killing this rank now" in proc.output
    # Step 3, the last finished before the kill in step 4, saved by the surviving worker
    # (recovery.py): newer than Ray's copy of step 2, so resume_point takes it from --out.
    assert "a peer failed; saved the last finished step, 3" in proc.output, proc.output[-3000:]
    assert summary(crashed)["resumed_from"].endswith("step_00000003.pt")
    a, b = load_weights(straight / "model.pt"), load_weights(crashed / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_worker_sent_sigterm_saves_its_step_and_the_group_resumes_from_it(cluster, ray_job, shared_tmp):
    # The training function runs on a thread of the worker actor; the launcher has the actor's
    # main thread turn SIGTERM into a stop request, which the ranks agree on at a step's end.
    out = shared_tmp / "ray_sigterm"
    proc = run_ok([*LAUNCHER, "--address", cluster["gcs"], "--num-workers", "2", *FLAGS, "--max-failures", "1",
                   "--fail-once-at-step", "2", "--fail-signal", "term", "--keep-best", "loss", "--out", str(out)],
                  timeout=400, env=ray_env())
    assert "sending SIGTERM to this rank now" in proc.output, proc.output[-3000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+)", proc.output)
    assert stopped and 2 <= int(stopped[1]) < 6, proc.output[-3000:]
    assert summary(out)["resumed_from"].endswith(f"step_{int(stopped[1]):08d}.pt")
    a, b = load_weights(ray_job / "model.pt"), load_weights(out / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, env, expected", [
    (["--address", "127.0.0.1:PORT"], {}, "no Ray cluster answers there"),
    # Bounded: an autoscaler may be adding nodes; what it waits for is said at once.
    (["--address", "GCS", "--num-workers", "8", "--cpus-per-worker", "1", "--wait-for-resources-s", "4"], {},
     ["waiting up to 4 s for the cluster to grow: --num-workers 8 x --cpus-per-worker 1 needs 8 CPUs",
      "error: --num-workers 8 x --cpus-per-worker 1 needs 8 CPUs; the cluster has 4"]),
    (["--num-workers", "2", "--global-batch-size", "15"], {}, "not divisible by the world size 2"),
])
def test_bad_input_fails_fast(cluster, tmp_path, args, env, expected):
    args = [a.replace("PORT", str(free_port())).replace("GCS", cluster["gcs"]) for a in args]
    proc = run([*LAUNCHER, *TINY, *args, "--out", str(tmp_path)], timeout=90, env=ray_env(**env))
    expected = expected if isinstance(expected, list) else [expected]
    assert proc.returncode == 2 and all(e in proc.stderr for e in expected), proc.output[-3000:]
