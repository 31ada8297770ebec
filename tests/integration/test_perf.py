"""The performance tools report the truth: bench's breakdown covers the step, its bound really
skips the all-reduce, compression hooks keep replicas in sync and still learn the digits, and
doctor and plot say what they find. (How fast anything runs is for docs/benchmarks.md.)"""
import json
import os
import subprocess

import pytest

from tests.helpers import BIN, ROOT, child_env, run, run_ok, summary, torchrun_cmd

pytestmark = pytest.mark.slow

PHASES = ("forward_ms", "backward_ms", "comm_ms", "optimizer_ms")


@pytest.fixture(scope="module")
def bench_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    proc = run_ok([str(BIN / "python"), "-m", "distributed_step", "bench", "--world-sizes", "1,2", "--steps", "2",
                   "--rounds", "2", "--warmup", "1", "--image-size", "32", "--batch-per-rank", "4",
                   "--sweep", "comm_hook=none,bf16,powersgd", "--json", str(out)], timeout=600)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return records, proc.stdout, out


def test_bench_breakdown_adds_up_to_the_measured_step(bench_records):
    records, table, _ = bench_records
    assert {(r["world_size"], r["mode"]) for r in records} == {(w, m) for w in (1, 2) for m in ("sync", "nosync")}
    assert len(records) == 2 * 2 * 3 and all(r["steps"] == 4 for r in records)
    for r in records:
        parts = sum(r[p] for p in PHASES)
        # The phases are measured, not derived: what they leave out ("other") must be small.
        assert all(r[p] > 0 for p in ("forward_ms", "backward_ms", "optimizer_ms")), r
        assert 0 <= r["other_ms"] < 0.05 * r["step_ms"], r
        # The slowest rank bounds a synchronous step: at least the mean, equal on one rank.
        assert r["slowest_rank_ms"] >= r["step_ms"] - 0.01, r
        assert r["vs_slowest_bound"] <= r["vs_bound"] + 0.001, r
        if r["world_size"] == 1:
            assert r["slowest_rank_ms"] == pytest.approx(r["step_ms"], abs=0.01), r
        assert parts + r["other_ms"] == pytest.approx(r["step_ms"], abs=0.01)
        assert r["images_per_s"] == pytest.approx(4 * r["world_size"] / r["step_ms"] * 1e3, rel=1e-3)
        # ResNet-18 at 32 px: ~0.22 GFLOP per training image, counted by torch's flop counter.
        assert r["tflops"] == pytest.approx(r["images_per_s"] * 0.2173e9 / 1e12, rel=2e-3, abs=2e-4)
    assert "x bound" in table and table.count("\n") >= len(records)


def test_bench_bound_skips_the_allreduce_and_hooks_keep_replicas_equal(bench_records):
    records, _, _ = bench_records
    two = [r for r in records if r["world_size"] == 2]
    assert {r["config"]["comm_hook"] for r in two} == {"none", "bf16", "powersgd"}
    for r in two:
        # From identical replicas, a no_sync step leaves them different (nothing was summed) and
        # a synchronized step, with or without compression, leaves them bit-identical.
        assert r["replicas_equal_after_nosync"] is False, r
        assert r["replicas_equal_after_sync"] is True, r
    for r in records:
        if r["mode"] == "nosync":
            assert r["vs_bound"] == 1.0 and r["comm_ms"] < 0.05 * r["step_ms"], r
    # Under sync, backward ends only once the last bucket (10 MB of the first layers' gradients)
    # is all-reduced: that wait is what the clock splits off as "comm".
    exact = {r["mode"]: r for r in two if r["config"]["comm_hook"] == "none"}
    assert exact["sync"]["comm_ms"] > max(1.0, 5 * exact["nosync"]["comm_ms"]), exact


def test_hooked_runs_reach_the_digits_accuracy_and_plot(tmp_path, bench_records):
    """bf16 and PowerSGD change the update, so prove they still learn: the embedded default
    (digits, 8 epochs) with each hook, the two 2-rank runs side by side on the 2 cores."""
    procs = {}
    for hook in ("bf16", "powersgd"):
        cmd = torchrun_cmd(2, ["--comm-hook", hook, "--out", str(tmp_path / hook)])
        procs[hook] = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    for hook, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output[-3000:]
        result = summary(tmp_path / hook)
        assert result["eval_accuracy"] >= 0.95, (hook, result)
        assert len(set(result["replica_digests"])) == 1

    from distributed_step.tools import plot

    _, _, bench_file = bench_records
    assert plot.main([str(tmp_path / "bf16"), str(bench_file), "--out", str(tmp_path / "png")]) == 0
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == ["bench-phases.png", "bench-throughput.png", "phases.png", "ranks.png", "training.png"]
    for png in (tmp_path / "png").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_doctor_reports_every_check_and_flags_oversubscription():
    # Two ranks with two threads each on a 2-core machine: everything OK but the core count.
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "distributed_step", "doctor",
           "--threads", "2", "--repeats", "2"]
    proc = run(cmd, timeout=300)
    assert proc.returncode == 0, proc.output[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("OK", "WARN", "FAIL"))]
    assert any(line.startswith("OK") and "2 rank(s) on 1 host(s)" in line for line in lines), lines
    assert any(line.startswith("OK") and "all-reduce of 44.7 MB" in line for line in lines), lines
    assert any(line.startswith("OK") and "/dev/shm" in line for line in lines), lines
    assert any(line.startswith("OK") and "identical parameters on all 2 rank(s)" in line for line in lines), lines
    assert any(line.startswith("OK") and "recommended --comm-hook" in line for line in lines), lines
    # per rank against the others (a WARN only if a rank is 1.15x off: these two share 2 cores)
    for what in ("own training step", "matmul per rank", "memory copy per rank", "all-reduce within each host"):
        assert any(line.startswith(("OK", "WARN")) and what in line for line in lines), (what, lines)
    # --pin-cores (the default, as in `train`) gives each rank its own core: [0], [1] here.
    assert any(line.startswith("OK") and "cores per rank" in line and "(disjoint)" in line for line in lines), lines
    oversubscribed = any(line.startswith("WARN") and "oversubscribed" in line for line in lines)
    assert oversubscribed == (4 > len(os.sched_getaffinity(0))), lines


def test_bad_bench_and_plot_input_fails_fast_naming_the_flag(tmp_path):
    proc = run([str(BIN / "python"), "-m", "distributed_step", "bench", "--sweep", "bucket_cap_mb=big"])
    assert proc.returncode == 2 and "--sweep bucket_cap_mb: 'big' is not a float" in proc.stderr, proc.output
    from distributed_step.config import ConfigError
    from distributed_step.tools import plot

    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        plot.main([str(tmp_path)])
