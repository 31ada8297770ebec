"""The core's promises, each checked on numbers left by real torchrun / python processes (gloo).

The reference runs are started once per module and shared by the assertions.
"""
from __future__ import annotations

import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

from distributed_step.parallel.process_group import state_digest
from tests.helpers import (
    TINY,
    child_env,
    load_weights,
    metrics,
    python_cmd,
    run_all_ok,
    run_ok,
    summary,
    torchrun_cmd,
)

pytestmark = pytest.mark.slow

# SyncBN + fp32 so that 2 ranks x 8 must equal 1 rank x 16. The small learning rate keeps the
# float32 rounding differences between batch-8 and batch-16 kernels from being amplified
# through ReLU and max-pool kinks (a flipped max-pool winner moves a whole gradient entry).
# 3 steps per epoch and a checkpoint every 2 steps: step 4 is mid-epoch.
REFERENCE = TINY + ["--small-input-stem", "--sync-bn", "--lr", "0.001", "--steps", "6", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def runs(shared_tmp):
    out = SimpleNamespace(two=shared_tmp / "two_ranks", one=shared_tmp / "one_rank",
                          crashed=shared_tmp / "crash_and_restart")
    _, _, crashed = run_all_ok([
        torchrun_cmd(2, REFERENCE + ["--out", str(out.two)]),
        # --deterministic changes nothing on CPU (the comparison below still holds) but is recorded.
        python_cmd(REFERENCE + ["--out", str(out.one), "--deterministic"]),
        torchrun_cmd(2, REFERENCE + ["--out", str(out.crashed), "--fail-once-at-step", "6"], "--max-restarts=1"),
    ], at_once=3)
    out.crash_log = crashed.output
    return out


def test_two_ranks_equal_one_rank_with_sync_bn(runs):
    two, one = load_weights(runs.two / "model.pt"), load_weights(runs.one / "model.pt")
    assert two.keys() == one.keys()
    largest = max(t.abs().max().item() for t in one.values() if t.is_floating_point())
    worst = max((two[k].double() - one[k].double()).abs().max().item() for k in one if one[k].is_floating_point())
    assert worst <= 1e-5 * largest, f"max difference {worst:.3g} vs largest weight {largest:.3g}"
    # and the training really moved the weights (a run that did nothing would also "agree")
    first = load_weights(runs.one / "checkpoints" / "step_00000002.pt")["model"]
    assert any(not torch.equal(first[k], one[k]) for k in one)
    # the logged loss is the all-reduced mean: equal to the single process's at every step
    for a, b in zip(metrics(runs.two), metrics(runs.one)):
        if "loss" in a:
            assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_replicas_hold_identical_parameters_and_buffers(runs):
    result = summary(runs.two)
    assert result["world_size"] == 2 and result["steps"] == 6 and result["status"] == "complete"
    digest = state_digest(load_weights(runs.two / "model.pt"))
    assert result["replica_digests"] == [digest, digest]


def test_run_directory_explains_itself(runs):
    import yaml

    config = yaml.safe_load((runs.two / "config.yaml").read_text())
    assert config["world_size"] == 2 and config["sync_bn"] is True and config["lr"] == 0.001
    # which numerics were in force: the fast default here, --deterministic in the 1-rank run
    assert config["numerics"]["cudnn_benchmark"] and not config["numerics"]["deterministic_algorithms"]
    strict = yaml.safe_load((runs.one / "config.yaml").read_text())["numerics"]
    assert strict["deterministic_algorithms"] and not (strict["cudnn_benchmark"] or strict["tf32_cudnn"])
    logged = [m for m in metrics(runs.two) if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    for m in logged:
        assert {"epoch", "lr", "images_per_s", "forward_ms", "backward_ms", "optimizer_ms"} <= m.keys()
        assert m["forward_ms"] > 0 and m["backward_ms"] > 0 and m["optimizer_ms"] > 0
        assert m["forward_ms"] + m["backward_ms"] + m["optimizer_ms"] <= m["step_ms"] * 1.01
    result = summary(runs.two)
    assert result["images_per_s"] > 0 and result["wall_time_s"] > 0 and result["eval_samples"] == 257
    assert result["stragglers"] == []  # balanced ranks: no straggler warning
    assert all(len(m["rank_busy_ms"]) == 2 for m in logged)
    names = sorted(p.name for p in (runs.two / "checkpoints").iterdir())
    assert names == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    # model.pt is a plain torchvision resnet18 state dict (with the small stem's conv1 shape)
    from torchvision.models import resnet18

    net = resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.load_state_dict(load_weights(runs.two / "model.pt"))


def test_crash_and_restart_is_bit_exact(runs):
    """Rank 1 is SIGKILLed before step 6; rank 0 saves step 5, the last finished (recovery.py),
    torchrun restarts both, and they resume from it: each step once in metrics.jsonl and TensorBoard."""
    assert (runs.crashed / ".failed_once_at_step_6").exists()
    assert "killing this rank now" in runs.crash_log
    result = summary(runs.crashed)
    assert result["resumed_from"].endswith("step_00000005.pt") and result["steps"] == 6
    reference, resumed = load_weights(runs.two / "model.pt"), load_weights(runs.crashed / "model.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    # the restarted run logged each step once, with the uninterrupted run's losses
    logged = [(m["step"], m["loss"]) for m in metrics(runs.crashed) if "loss" in m]
    assert logged == [(m["step"], m["loss"]) for m in metrics(runs.two) if "loss" in m]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(runs.crashed / "tensorboard"))
    board.Reload()
    curve = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert [step for step, _ in curve] == [1, 2, 3, 4, 5, 6]
    assert all(value == pytest.approx(loss, rel=1e-6) for (_, value), (_, loss) in zip(curve, logged))
    assert {"speed/data_ms", "speed/images_per_s", "train/lr", "eval/accuracy"} <= set(board.Tags()["scalars"])


def test_held_out_evaluation_is_exact_across_world_sizes(runs, shared_tmp):
    """Evaluate the 1-rank run's final checkpoint on 2 ranks: 257 samples, same counts and loss.
    (Also resumes a checkpoint saved by 1 rank on 2 ranks.)"""
    final = runs.one / "checkpoints" / "step_00000006.pt"
    out = shared_tmp / "eval_on_two"
    run_ok(torchrun_cmd(2, REFERENCE + ["--out", str(out), "--resume", str(final)]))
    one, two = summary(runs.one), summary(out)
    assert one["eval_samples"] == two["eval_samples"] == 257
    assert two["eval_accuracy"] == one["eval_accuracy"]
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)


def test_sigterm_stops_all_ranks_saves_and_resumes_exactly(runs, shared_tmp):
    out = shared_tmp / "preempted"
    # --workers 1: a loader process per rank, which the group-wide SIGTERM reaches too
    flags = REFERENCE + ["--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(torchrun_cmd(2, flags), env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(m.get("step", 0) >= 2 for m in _safe_metrics(out)):
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], check=False, capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    # As torchrun does when it shuts down: SIGTERM to a worker's whole process group (its
    # loader process included). One rank hearing it is enough: the ranks agree at the step end.
    subprocess.run(["kill", "-TERM", "--", f"-{workers[0]}"], check=True)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    stopped = summary(out)
    assert stopped["status"] == "preempted" and 2 <= stopped["steps"] < 6, output[-3000:]
    assert "stopped by SIGTERM" in output
    assert (out / "checkpoints" / f"step_{stopped['steps']:08d}.pt").exists()
    assert not (out / "model.pt").exists()

    # A newer checkpoint cut short (a crash mid-write on a filesystem without atomic rename):
    # the restart must skip it with a warning and use the preemption checkpoint.
    saved = (out / "checkpoints" / f"step_{stopped['steps']:08d}.pt").read_bytes()
    (out / "checkpoints" / f"step_{stopped['steps'] + 1:08d}.pt").write_bytes(saved[: len(saved) // 2])
    rerun = run_ok(torchrun_cmd(2, flags))
    assert "skipping checkpoint" in rerun.output and "set aside" in rerun.output
    finished = summary(out)
    assert finished["status"] == "complete" and finished["resumed_from"].endswith(f"step_{stopped['steps']:08d}.pt")
    reference, resumed = load_weights(runs.two / "model.pt"), load_weights(out / "model.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def _safe_metrics(out):
    try:
        return metrics(out)
    except (FileNotFoundError, ValueError):  # not written yet, or a line half written
        return []
