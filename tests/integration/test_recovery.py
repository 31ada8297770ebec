"""A failure costs at most the step it interrupts (distributed_step/recovery.py): a rank SIGKILLed
anywhere in a step, rank 0 or the last one, and the survivor saves the last finished step before
torchrun tears the group down; the restarted group resumes from it and ends where an uninterrupted
run ends: the same weights and momentum, and the same BatchNorm statistics when rank 0 survives."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY, load_weights, metrics, run_ok, summary, torchrun_cmd

pytestmark = pytest.mark.slow

# No periodic checkpoint: the survivor's is the only one a restart can resume from.
FLAGS = TINY + ["--steps", "6", "--checkpoint-every", "0", "--lr", "0.01"]
FINAL = "checkpoints/step_00000006.pt"


@pytest.fixture(scope="module")
def uninterrupted(shared_tmp):
    out = shared_tmp / "recovery_reference"
    run_ok(torchrun_cmd(2, FLAGS + ["--out", str(out)]))
    return load_weights(out / FINAL)


# Each phase once, each rank twice: rank 0 (the store's host when torchrun's agent is not, and
# the one whose BatchNorm statistics the run keeps) and the last rank.
@pytest.mark.parametrize("rank, phase, step", [(0, "backward", 4), (1, "before-forward", 4),
                                              (0, "optimizer", 5), (1, "flags", 4)])
def test_a_killed_rank_costs_at_most_the_step_it_interrupted(uninterrupted, tmp_path, rank, phase, step):
    out = tmp_path / "run"
    proc = run_ok(torchrun_cmd(2, FLAGS + ["--fail-once-at-step", str(step), "--fail-rank", str(rank),
                                           "--fail-phase", phase, "--out", str(out)], "--max-restarts=1"))
    marker = (out / f".failed_once_at_step_{step}").read_text()
    assert f"rank {rank} died here on purpose" in marker, proc.output[-3000:]
    assert "a peer failed; saved the last finished step" in proc.output

    # A step is finished once its gradients are all-reduced: a rank killed in its optimizer step or
    # after it had sent them, and the survivor completes that step before it saves.
    last_finished = step if phase in ("optimizer", "flags") else step - 1
    result = summary(out)
    assert result["status"] == "complete" and result["steps"] == 6
    assert result["resumed_from"].endswith(f"step_{last_finished:08d}.pt"), result["resumed_from"]
    # Each step logged once; the line of a step that finished as the rank died may be missing (the
    # log's all-reduce needs every rank), never doubled.
    logged, steps = [m["step"] for m in metrics(out) if "loss" in m], list(range(1, 7))
    assert logged == steps or (last_finished == step and logged == [s for s in steps if s != step]), logged

    final = load_weights(out / FINAL)
    reference = uninterrupted
    for name, weight in reference["model"].items():
        if "running_" in name or "num_batches" in name:
            # Rank 0's statistics are the run's; a survivor other than rank 0 saved its own.
            assert torch.equal(weight, final["model"][name]) or rank == 0, name
        else:
            assert torch.equal(weight, final["model"][name]), name
    momentum = [s["momentum_buffer"] for s in reference["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, final["optimizer"]["state"].values()))

    killed_at = float(marker.rsplit(" at ", 1)[1])
    first_new = next(m["time"] for m in metrics(out) if m.get("step") == last_finished + 1 and "loss" in m)
    print(f"rank {rank} killed in {phase} of step {step}: first new step {first_new - killed_at:.1f} s later")
    assert first_new - killed_at < 90
