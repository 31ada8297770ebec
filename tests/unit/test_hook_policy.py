"""--comm-hook auto's model of DDP's overlap and its choice (distributed_step/parallel/hook_policy.py)."""
from __future__ import annotations

import pytest

from distributed_step.model import build_model
from distributed_step.parallel import hook_policy


def test_buckets_follow_ddp_order_and_hold_every_gradient_byte():
    net = build_model(10)
    total = sum(p.numel() * 4 for p in net.parameters())
    sizes = hook_policy.bucket_sizes(net, 25.0)
    assert sum(sizes) == total
    assert all(size >= 25 * 2**20 for size in sizes[:-1])  # wrap() gives DDP the cap: no small first bucket
    assert len(hook_policy.bucket_sizes(net, 1.0)) > len(sizes)


def test_exposed_time_is_what_backward_cannot_hide():
    assert hook_policy.exposed_ms([10, 10], backward_ms=10, bytes_per_ms=1e9) == pytest.approx(0, abs=1e-6)
    # ready at 5 and 10 ms; the wire is busy 5-15, then 15-25: 15 ms after backward ends
    assert hook_policy.exposed_ms([10, 10], backward_ms=10, bytes_per_ms=1) == pytest.approx(15)
    # a fast wire still exposes the last bucket, which backward produces at its very end
    assert hook_policy.exposed_ms([90, 10], backward_ms=100, bytes_per_ms=10) == pytest.approx(1)


@pytest.mark.parametrize("bucket_ms, hook", [(2.0, "none"), (20.0, "none"), (40.0, "bf16"), (100.0, "bf16")])
def test_the_choice_keeps_exact_unless_the_wire_shows(bucket_ms, hook):
    sizes = [25 << 20, 20 << 20]  # two buckets of ResNet-18's 45 MB (it has 27.5 and 15.1 MiB at 25 MB)
    report = hook_policy.choose(sizes, 2, max(sizes), bucket_ms, compute_ms=500.0, backward_ms=330.0)
    assert report.hook == hook
    assert (report.exposed_share <= hook_policy.EXPOSED_SHARE_LIMIT) == (hook == "none")
    assert report.exposed_ms_bf16 <= report.exposed_ms
    assert report.bus_gbit_s == pytest.approx((25 << 20) * 8 / (bucket_ms * 1e-3) / 1e9, rel=1e-3)
    assert report.wire_ms == pytest.approx(45 * bucket_ms / 25, rel=1e-3)
    assert hook in report.describe() and report.as_record()["hook"] == hook
