"""The embedded default: `torchrun --nproc_per_node=4 -m distributed_step train`, no other flag,
learns the real scikit-learn digits to >= 95% held-out accuracy (about a minute on 2 cores)."""
import pytest

from tests.helpers import metrics, run_ok, summary, torchrun_cmd

pytestmark = pytest.mark.slow


def test_default_run_learns_digits(tmp_path):
    run_ok(torchrun_cmd(4, []), timeout=600, cwd=tmp_path)
    out = tmp_path / "runs" / "default"
    result = summary(out)
    assert result["world_size"] == 4 and result["status"] == "complete"
    assert result["eval_samples"] == 360
    assert result["eval_accuracy"] >= 0.95, result
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses[-1] < losses[0] / 5
    assert (out / "model.pt").exists() and (out / "config.yaml").exists()
