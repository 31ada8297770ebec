"""A failure costs at most the step it interrupts (distributed_step/recovery.py): a rank SIGKILLed
anywhere in a step, rank 0 or the last one, and the survivor saves the last finished step before
torchrun tears the group down; the restarted group resumes from it and ends where an uninterrupted
run ends: the same weights, momentum and BatchNorm statistics (rank 0's, which the step flags carry
to the survivors)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import TINY, load_weights, metrics, run_all_ok, summary, torchrun_cmd

pytestmark = pytest.mark.slow

# No periodic checkpoint: the survivor's is the only one a restart can resume from.
FLAGS = TINY + ["--steps", "6", "--checkpoint-every", "0", "--lr", "0.01"]
FINAL = "checkpoints/step_00000006.pt"
# Every phase, for rank 0 (the store's host when torchrun's agent is not, and the one whose
# BatchNorm statistics the run keeps) and for the last rank.
PHASES = [("before-forward", 4), ("backward", 4), ("optimizer", 5), ("flags", 4)]
KILLS = [(rank, phase, step) for phase, step in PHASES for rank in (0, 1)]


@pytest.fixture(scope="module")
def runs(shared_tmp):
    """The uninterrupted run and one run per kill, two at a time (much of each is a restart's wait)."""
    outs = [shared_tmp / "recovery_reference"] + [shared_tmp / f"recovery_{r}_{p}_{s}" for r, p, s in KILLS]
    cmds = [torchrun_cmd(2, FLAGS + ["--out", str(outs[0])])]
    cmds += [torchrun_cmd(2, FLAGS + ["--fail-once-at-step", str(s), "--fail-rank", str(r), "--fail-phase", p,
                                      "--out", str(out)], "--max-restarts=1")
             for (r, p, s), out in zip(KILLS, outs[1:])]
    procs = run_all_ok(cmds)
    return {kill: (out, proc.output) for kill, out, proc in zip([None, *KILLS], outs, procs)}


@pytest.mark.parametrize("rank, phase, step", KILLS)
def test_a_killed_rank_costs_at_most_the_step_it_interrupted(runs, rank, phase, step):
    out, output = runs[(rank, phase, step)]
    marker = (out / f".failed_once_at_step_{step}").read_text()
    assert f"rank {rank} died here on purpose" in marker, output[-3000:]
    assert "a peer failed; saved the last finished step" in output

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

    final, reference = load_weights(out / FINAL), load_weights(runs[None][0] / FINAL)
    # Rank 0's statistics of a step reach the survivor after that step's forward, ahead of its
    # gradients: a finished step always has them (else the survivor would say it saved its own).
    assert "BatchNorm statistics of step" not in output, output[-3000:]
    for name, weight in reference["model"].items():
        assert torch.equal(weight, final["model"][name]), name
    momentum = [s["momentum_buffer"] for s in reference["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, final["optimizer"]["state"].values()))

    killed_at = float(marker.rsplit(" at ", 1)[1])
    first_new = next(m["time"] for m in metrics(out) if m.get("step") == last_finished + 1 and "loss" in m)
    print(f"rank {rank} killed in {phase} of step {step}: first new step {first_new - killed_at:.1f} s later")
    assert first_new - killed_at < 90
