"""The CUDA-only paths, where a GPU is (skipped without one: tests/conftest.py). On a GPU machine
`bash benchmarks/gpu.sh` runs these first, then the benchmarks. Each test says what it needs."""
from __future__ import annotations

import time

import pytest
import torch

from distributed_step.parallel.process_group import state_digest
from tests.helpers import TINY, child_env, load_weights, metrics, python_cmd, run_ok, summary, torchrun_cmd

pytestmark = pytest.mark.gpu

# One step of the reference run of test_training.py, deterministic so the comparison is exact.
ONE_STEP = TINY + ["--small-input-stem", "--sync-bn", "--lr", "0.001", "--steps", "1", "--checkpoint-every", "0",
                   "--deterministic"]


def worst_relative_difference(a: dict, b: dict) -> float:
    largest = max(t.abs().max().item() for t in b.values() if t.is_floating_point())
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b if b[k].is_floating_point()) / largest


def test_two_ranks_sharing_one_gpu_over_gloo_equal_one_rank(tmp_path):
    """NCCL refuses two ranks on one device; gloo carries CUDA tensors, and GlooSyncBatchNorm
    gives the 2 x B/2 ranks the statistics of the whole batch."""
    one_gpu = child_env(CUDA_VISIBLE_DEVICES="0")  # on a host with several GPUs, still one
    run_ok(torchrun_cmd(2, ONE_STEP + ["--backend", "gloo", "--out", str(tmp_path / "two")]), env=one_gpu)
    run_ok(python_cmd(ONE_STEP + ["--out", str(tmp_path / "one")]), env=one_gpu)
    two, one = load_weights(tmp_path / "two" / "model.pt"), load_weights(tmp_path / "one" / "model.pt")
    assert worst_relative_difference(two, one) <= 1e-5
    # the logged loss is the mean over both ranks' samples: the single process's, to rounding
    assert metrics(tmp_path / "two")[0]["loss"] == pytest.approx(metrics(tmp_path / "one")[0]["loss"], rel=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torch's SyncBatchNorm runs under NCCL: 2 GPUs")
def test_torch_syncbn_under_nccl_equals_one_rank(tmp_path):
    run_ok(torchrun_cmd(2, ONE_STEP + ["--out", str(tmp_path / "two")]))
    run_ok(python_cmd(ONE_STEP + ["--out", str(tmp_path / "one")]))
    two, one = load_weights(tmp_path / "two" / "model.pt"), load_weights(tmp_path / "one" / "model.pt")
    assert worst_relative_difference(two, one) <= 1e-5


def test_deterministic_runs_repeat_bit_for_bit(tmp_path):
    flags = TINY + ["--steps", "6", "--sync-bn", "--lr", "0.01", "--deterministic", "--checkpoint-every", "0"]
    digests = []
    for name in ("a", "b"):
        run_ok(python_cmd(flags + ["--out", str(tmp_path / name)]))
        digests.append(state_digest(load_weights(tmp_path / name / "model.pt")))
    assert digests[0] == digests[1]


def test_fp16_trains_the_digits(tmp_path):
    """The default run in fp16 with the default --fused-sgd (the combination that went NaN)."""
    run_ok(python_cmd(["--precision", "fp16", "--out", str(tmp_path / "fp16")]))
    assert summary(tmp_path / "fp16")["eval_accuracy"] >= 0.95


def test_channels_last_compile_bf16_trains(tmp_path):
    out = tmp_path / "fast"
    run_ok(python_cmd(["--precision", "bf16", "--channels-last", "--compile", "--steps", "30", "--log-every", "5",
                       "--checkpoint-every", "0", "--out", str(out)]), timeout=600)
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    assert losses[-1] < 0.5 * losses[0], losses


def test_calibrate_times_a_gradient_when_the_device_reaches_it():
    """The host queues kernels and returns: a hook's own clock would say a gradient behind 50 ms
    of device work was ready at once. calibrate's clock reads events on the stream instead (on
    CPU, where the host runs the work itself, its clock). The stamp comes from a gradient hook,
    which runs in autograd's device thread, as in calibrate."""
    from distributed_step.tools.calibrate import ArrivalClock
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    class SlowBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            if grad.is_cuda:
                torch.cuda._sleep(100_000_000)  # queued, not waited for: about 50 ms at 1.98 GHz
            else:
                time.sleep(0.05)
            return grad

    weight = torch.ones(4, device=device, requires_grad=True)
    clock = ArrivalClock(device)
    weight.register_post_accumulate_grad_hook(lambda _: clock.stamp(0))
    loss = SlowBackward.apply(weight).sum()
    clock.start()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert 0.03 <= clock.seconds()[0] < 0.5
