"""The survivor's part of recovery.py, in-process: which survivor writes, BatchNorm's statistics
put back, and what a failed collective looks like (tests/integration/test_recovery.py kills ranks)."""
from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from distributed_step import recovery
from distributed_step.parallel.process_group import is_peer_failure


def test_the_first_survivor_to_claim_a_step_writes_it_and_rank_0_claims_without_waiting(monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0))
    store = dist.TCPStore("127.0.0.1", listener.getsockname()[1], is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=10), master_listen_fd=listener.detach())
    monkeypatch.setattr(recovery, "RANK_ZERO_FIRST_S", 0.0)
    assert recovery.claim_write(store, 7, rank=1)
    assert not recovery.claim_write(store, 7, rank=0)  # one file per step
    assert recovery.claim_write(store, 8, rank=0)  # another step is another claim


def test_without_a_store_every_survivor_writes_its_candidate():
    class Gone:
        def set_timeout(self, _):
            pass

        def compare_set(self, *_):
            raise RuntimeError("Connection reset by peer")

    assert recovery.claim_write(None, 3, rank=1)
    assert recovery.claim_write(Gone(), 3, rank=0)


def test_the_running_statistics_come_back_as_they_were_before_the_forward():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    snapshot = recovery.BufferSnapshot(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    snapshot.take()
    net(torch.randn(2, 3, 8, 8))  # the interrupted step's forward moves them
    assert not torch.equal(net[1].running_mean, before["1.running_mean"])
    snapshot.restore()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_rank_0s_statistics_laid_end_to_end_go_back_into_their_buffers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    snapshot = recovery.BufferSnapshot(net)
    assert len(snapshot.floating) == 4  # two means, two variances; not the int64 counters
    flat = torch.arange(16, dtype=torch.float32)
    snapshot.adopt(flat)
    assert torch.equal(net[2].running_var, flat[12:]) and torch.equal(net[1].running_mean, flat[:4])
    assert int(net[1].num_batches_tracked) == 0


def test_a_peer_failure_is_told_from_this_ranks_own_errors():
    assert is_peer_failure(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error"))
    assert is_peer_failure(type("DistBackendError", (RuntimeError,), {})("NCCL communicator was aborted"))
    assert not is_peer_failure(RuntimeError("CUDA out of memory"))
    assert not is_peer_failure(ValueError("loss is not finite"))
