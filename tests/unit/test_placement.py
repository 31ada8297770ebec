"""Where each rank runs (in-process): threads never oversubscribe what the launcher or the
pod's CPU quota allows, and pinning gives each local rank its own cores and gives them back."""
import os

import pytest
import torch

from distributed_step.parallel import placement

CORES = sorted(placement.STARTING_CORES)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    placement.pin_cores(False, 0, 1)


def test_a_cgroup_cpu_quota_caps_the_usable_cores(tmp_path, monkeypatch):
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(placement, "CGROUP_CPU_MAX", str(quota))
    quota.write_text("max 100000\n")
    assert placement.usable_cores() == len(CORES)
    quota.write_text("150000 100000\n")  # a 1.5-CPU pod limit
    assert placement.usable_cores() == 1
    monkeypatch.setattr(placement, "CGROUP_CPU_MAX", str(tmp_path / "absent"))
    assert placement.usable_cores() == len(CORES)


def test_auto_threads_split_the_cores_and_never_exceed_omp_num_threads(monkeypatch, restore_threads):
    monkeypatch.setattr(placement, "CGROUP_CPU_MAX", "/nonexistent")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert placement.set_threads(0, 1) == len(CORES) == torch.get_num_threads()
    assert placement.set_threads(0, 2 * len(CORES)) == 1  # more ranks than cores: one thread each
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun exports for several ranks
    assert placement.set_threads(0, 1) == 1
    assert placement.set_threads(3, 1) == 3 == torch.get_num_threads()  # an explicit --threads wins


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(CORES) < 2, reason="needs 2 cores and affinity")
def test_pinning_gives_each_local_rank_its_own_cores_then_releases_them(restore_threads):
    masks = []
    for rank in range(2):
        placement.pin_cores(True, rank, 2)
        masks.append(os.sched_getaffinity(0))
    assert masks[0] and masks[1] and not masks[0] & masks[1]
    assert masks[0] | masks[1] <= set(CORES)
    placement.pin_cores(False, 0, 2)
    assert sorted(os.sched_getaffinity(0)) == CORES


def test_an_image_size_whose_activations_cannot_fit_is_refused(monkeypatch):
    from distributed_step.config import ConfigError, TrainConfig

    monkeypatch.setattr(placement, "_memory_per_rank", lambda ranks, device: 8 * 10**9 // ranks)
    cpu = torch.device("cpu")
    placement.check_memory(TrainConfig(image_size=224, global_batch_size=128), 2, 2, cpu)  # 1 GB of 4: fits
    with pytest.raises(ConfigError, match=r"--image-size 1024 with 64 images .* at least 20 GB .* 4 GB each rank"):
        placement.check_memory(TrainConfig(image_size=1024, global_batch_size=128), 2, 2, cpu)
    placement.check_memory(TrainConfig(image_size=1024, global_batch_size=128, grad_accum=8), 2, 2, cpu)  # 3 GB
