"""The Ray launcher's own decisions, without a Ray cluster (tests/integration/test_ray.py runs
it on one): which checkpoint a restarted worker group resumes from, which placements it refuses
before training, and what it says where Ray is not installed."""
from __future__ import annotations

import sys

import pytest
import torch

from distributed_step.launch import ray_train
from tests.helpers import run


def test_without_ray_the_error_says_what_to_install():
    hide_ray = ("import sys; sys.modules['ray'] = None; from distributed_step.__main__ import main; "
                "sys.exit(main(['ray', '--data', 'synthetic']))")
    proc = run([sys.executable, "-c", hide_ray], timeout=60)
    assert proc.returncode == 2 and 'pip install "distributed-step[ray]"' in proc.stderr


def test_a_restart_resumes_from_the_newer_of_rays_checkpoint_and_the_run_directory(tmp_path):
    ray_copy, out = tmp_path / "ray" / "checkpoint_1", tmp_path / "out"
    ray_copy.mkdir(parents=True)
    (ray_copy / "step_00000004.pt").touch()
    assert ray_train.resume_point(str(ray_copy), str(out)) == str(ray_copy / "step_00000004.pt")  # --out empty
    (out / "checkpoints").mkdir(parents=True)
    from distributed_step.checkpoint import REQUIRED_KEYS

    def checkpoint(step):
        torch.save({key: step if key == "step" else 0 for key in REQUIRED_KEYS},
                   out / "checkpoints" / f"step_{step:08d}.pt")

    checkpoint(2)
    assert ray_train.resume_point(str(ray_copy), str(out)) == str(ray_copy / "step_00000004.pt")  # Ray's newer
    (out / "checkpoints" / "step_00000008.pt").write_bytes(b"torn")  # newer but unreadable: not counted
    assert ray_train.resume_point(str(ray_copy), str(out)) == str(ray_copy / "step_00000004.pt")
    checkpoint(6)
    assert ray_train.resume_point(str(ray_copy), str(out)) == "auto"  # --out newer: the core picks it


def test_relative_paths_are_refused_on_several_nodes():
    args = ray_train.launcher_parser().parse_args(["--num-workers", "2"])
    with pytest.raises(ray_train.ConfigError, match="--out runs/x: a relative path"):
        ray_train.check_placement(args, {"CPU": 8}, 2, "runs/x", "/shared/ray")
    assert ray_train.check_placement(args, {"CPU": 8}, 1, "runs/x", "runs/x") is False


@pytest.mark.parametrize("flags, expected", [
    (["--preemption-check-every", "-1"], "--preemption-check-every -1: must be >= 0 (0: never ask)"),
    (["--max-preemptions", "-5"], "--max-preemptions -5: must be >= 0, or -1 for no limit"),
])
def test_bad_preemption_flags_are_refused_in_one_line_before_ray_starts(capsys, flags, expected):
    assert ray_train.main([*flags, "--data", "synthetic"]) == 2
    assert capsys.readouterr().err.strip() == f"distributed-step ray: error: {expected}"


@pytest.mark.parametrize("flags, expected", [
    (["--num-workers", "2:x"], "--num-workers 2:x: give a count, or MIN:MAX for an elastic run"),
    (["--num-workers", "4:2"], "--num-workers 4:2: needs 1 <= MIN <= MAX"),
    # 16 divides by 2 and 4, not by 3: an elastic run may take every size in its range
    (["--num-workers", "2:4", "--global-batch-size", "16"],
     "--num-workers 2:4: at 3 workers: --global-batch-size 16 is not divisible by the world size 3"),
    (["--resize-check-s", "0"], "--resize-check-s 0 must be > 0 and --wait-for-resources-s 60 >= 0"),
])
def test_bad_worker_ranges_are_refused_in_one_line_before_ray_starts(capsys, flags, expected):
    assert ray_train.main([*flags, "--data", "synthetic"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"distributed-step ray: error: {expected}")


def test_an_elastic_range_is_placed_by_its_minimum():
    args = ray_train.launcher_parser().parse_args(["--num-workers", "2:8"])
    assert ray_train.worker_range(args.num_workers) == (2, 8)
    assert ray_train.check_placement(args, {"CPU": 2}, 1, "/runs/x", "/runs/x") is False
    with pytest.raises(ray_train.ConfigError, match="needs 2 CPUs; the cluster has 1"):
        ray_train.check_placement(args, {"CPU": 1}, 1, "/runs/x", "/runs/x")
