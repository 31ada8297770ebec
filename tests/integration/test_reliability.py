"""A hostile user's run directory: one writer at a time, a lock left by a dead run never blocks
the resume, and a full disk stops every rank without losing the good checkpoint."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch

from tests.helpers import ROOT, TINY, child_env, metrics, python_cmd, run, run_ok, summary, torchrun_cmd

pytestmark = pytest.mark.slow


def test_second_run_on_one_directory_is_refused_and_the_first_loses_nothing(tmp_path):
    out = tmp_path / "run"
    flags = TINY + ["--steps", "24", "--checkpoint-every", "3", "--out", str(out)]
    first = subprocess.Popen(python_cmd(flags), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)  # the first run holds the lock before it writes anything
    began = time.time()
    second = run(python_cmd(flags), timeout=60)
    assert second.returncode == 2 and time.time() - began < 30, second.output[-2000:]
    ours = [line for line in second.output.splitlines() if "distributed-step: error" in line]
    assert len(ours) == 1 and "another run is writing here (host " in ours[0] and f"pid {first.pid}," in ours[0]
    assert first.wait(timeout=120) == 0, first.stdout.read()[-2000:]
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == list(range(1, 25))  # no duplicated or interleaved steps
    assert summary(out)["status"] == "complete" and summary(out)["resumed_from"] is None

    # A lock file left by a process that is gone (its holder recorded, its flock released with
    # it) does not block the resume.
    (out / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": "yesterday"}))
    resumed = run_ok(python_cmd(TINY + ["--steps", "27", "--checkpoint-every", "3", "--out", str(out)]))
    assert "resumed from" in resumed.output and summary(out)["steps"] == 27


@pytest.fixture
def small_disk(tmp_path):
    """A 100 MB filesystem: one ResNet-18 checkpoint with momentum (~90 MB) fits, two do not."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(mount)], check=False,
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_every_rank_in_one_line_and_keeps_the_good_checkpoint(small_disk):
    out = small_disk / "run"
    began = time.time()
    proc = run(torchrun_cmd(2, TINY + ["--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints", "1",
                                       "--out", str(out)]), timeout=120)
    assert proc.returncode != 0 and time.time() - began < 60, proc.output[-2000:]
    ours = [line for line in proc.output.splitlines() if "distributed-step: error" in line]
    assert len(ours) == 2 and all("could not save the checkpoint of step 4" in line for line in ours), ours
    assert all("MB free where a checkpoint needs" in line for line in ours)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000002.pt"]  # the good one, and no temporary file
    resumed = torch.load(out / "checkpoints" / names[0], map_location="cpu", weights_only=True)
    assert resumed["step"] == 2


def test_a_stalled_rank_ends_the_job_within_the_timeout_and_every_rank_leaves_its_stacks(tmp_path):
    """The highest rank stops joining collectives (--stall-at-step): rank 0 waits in one, each rank
    writes all its threads' stacks before --timeout-s ends the wait, rank 0 fails with a report
    that torchrun's summary shows (not `error_file: <N/A>`), and torchrun stops the stalled rank."""
    out = tmp_path / "stall"
    began = time.time()
    proc = run(torchrun_cmd(2, TINY + ["--steps", "8", "--stall-at-step", "3", "--timeout-s", "12",
                                       "--checkpoint-every", "0", "--out", str(out)]), timeout=150)
    seconds = time.time() - began
    assert proc.returncode != 0 and seconds < 60, (seconds, proc.output[-3000:])
    stacks = {p.name: p.read_text() for p in (out / "errors").glob("rank*-stacks.txt")}
    assert sorted(stacks) == ["rank0-stacks.txt", "rank1-stacks.txt"], proc.output[-3000:]
    assert "faults.py" in stacks["rank1-stacks.txt"]  # the stalled rank, caught in its stall
    waiting = stacks["rank0-stacks.txt"]  # the waiting rank: inside the step or the flags' wait
    assert "distributed_step/step.py" in waiting or "distributed_step/parallel/step_flags.py" in waiting, waiting
    report = (out / "errors" / "rank0.txt").read_text()
    assert "a collective failed" in report and "Traceback" in report
    # The survivor saved the last finished step once the wait timed out (recovery.py).
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["step_00000002.pt"]
    assert "a peer failed; saved the last finished step, 2" in proc.output
    summary_part = proc.output[proc.output.index("Root Cause"):]
    assert "rank      : 0" in summary_part and "<N/A>" not in summary_part
    assert "a collective failed" in summary_part and f"report: {out}/errors/rank0.txt" in summary_part
