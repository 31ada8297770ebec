"""How well `plan` predicts what it was not fitted on: fit on two emulated hosts, predict four
and eight, at several link rates (docs/planning.md).

    sudo python benchmarks/plan_validation.py [--rates 1gbit,2500mbit,10gbit] [--hosts 2,4,8]

For each rate: `calibrate` on two hosts (one rank each; testing/netlab.py, links shaped with tc
tbf) measures the step and fits the link; then the step is replayed on 2, 4 and 8 hosts
(testing/replay.py: ranks sleep the calibrated compute while real DDP all-reduces real
buckets over the shaped links), and the replay's median step is set against the plan's. The
replay's backward still shares the CPU with DDP's bucket copies and gloo's threads, so its
interference is fitted on the two hosts (the replayed step there), and used for four and eight.
At 1 Gbit/s and four hosts, each hook and bucket size is also replayed, to see whether the plan's
choice is within 5% of the best measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_step.planner.calibration import load
from distributed_step.planner.step_model import best, fit_interference, predict
from testing.netlab import Network

CHOICES = [("none", 5.0), ("none", 25.0), ("none", 100.0), ("bf16", 25.0)]


def env() -> dict:
    # One thread per rank: two or more ranks on two cores would otherwise spin against each other.
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    return {**inherited, "OMP_NUM_THREADS": "1"}


def calibrate(rate: str, folder: str, size: list[str]) -> str:
    out = os.path.join(folder, f"cal-{rate}.json")
    with Network(2, rate=rate) as net:
        procs = net.torchrun(1, ["-m", "distributed_step", "calibrate", "--out", out, *size], run_id="cal", env=env())
        outputs = net.wait(procs, timeout=400)
    if any(p.returncode for p in procs):
        raise SystemExit(f"calibrate at {rate} failed:\n{outputs[0][-2000:]}")
    return out


def replay(rate: str, hosts: int, cal: str, hook: str = "none", bucket_mb: float = 25.0, steps: int = 10) -> float:
    with Network(hosts, rate=rate) as net:
        procs = net.torchrun(1, ["-m", "testing.replay", "--calibration", cal, "--steps", str(steps),
                                 "--hook", hook, "--bucket-cap-mb", str(bucket_mb)], run_id="replay", env=env())
        outputs = net.wait(procs, timeout=600)
    if any(p.returncode for p in procs):
        raise SystemExit(f"replay at {rate} on {hosts} hosts failed:\n{outputs[0][-2000:]}")
    line = next(x for x in outputs[0].splitlines() if x.startswith('{"step_ms"'))
    return json.loads(line)["step_ms"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="1gbit,2500mbit,10gbit")
    parser.add_argument("--hosts", default="2,4,8")
    parser.add_argument("--image-size", default="32")
    parser.add_argument("--batch-per-rank", type=int, default=16)
    args = parser.parse_args()
    size = ["--global-batch-size", str(2 * args.batch_per_rank), "--image-size", args.image_size]
    folder = tempfile.mkdtemp(prefix="plan-validation-")
    rows, errors = [], []
    for rate in args.rates.split(","):
        cal_path = calibrate(rate, folder, size)
        cal = load(cal_path)
        system = cal.link.system()
        # Fitted on the two hosts: the replay's own interference (DDP's copies and gloo's threads
        # beside the sleeping backward; jitter is left out, the replay has none to speak of).
        fitted_ms = replay(rate, cal.link.ranks, cal_path)
        kappa = fit_interference(replace(cal.profile, jitter_s=0.0), system, cal.link.ranks, fitted_ms / 1e3)
        profile = replace(cal.profile, interference=kappa, jitter_s=0.0)
        print(f"{rate:>9} replay's interference fitted on {cal.link.ranks} hosts: {kappa:.3f}", flush=True)
        for hosts in [int(h) for h in args.hosts.split(",")]:
            planned = 1e3 * predict(profile, system, hosts).step_s
            measured = fitted_ms if hosts == cal.link.ranks else replay(rate, hosts, cal_path)
            error = planned / measured - 1
            fitted = hosts == cal.link.ranks
            if not fitted:
                errors.append(abs(error))
            rows.append((rate, hosts, planned, measured, error, fitted))
            print(f"{rate:>9} {hosts} hosts: planned {planned:7.1f} ms, replayed {measured:7.1f} ms, "
                  f"error {100 * error:+5.1f}%{'  (the fitted count)' if fitted else ''}", flush=True)
        print(f"{rate:>9} link fitted: {cal.link.bus_gbyte_s:.4f} GB/s bus, {cal.link.fixed_us:.0f} us fixed; "
              f"step alone {1e3 * cal.profile.alone_s:.1f} ms", flush=True)
        if rate == args.rates.split(",")[0] and 4 in [int(h) for h in args.hosts.split(",")]:
            chosen = best(profile, system, 4, choices_mb=sorted({mb for _, mb in CHOICES}))
            measured = {c: replay(rate, 4, cal_path, *c) for c in CHOICES}
            fastest = min(measured, key=measured.get)
            mine = measured.get((chosen.hook, chosen.bucket_mb))
            for c, ms in measured.items():
                print(f"{rate:>9} 4 hosts, hook {c[0]}, {c[1]:g} MB: replayed {ms:7.1f} ms, planned "
                      f"{1e3 * predict(profile, system, 4, *c).step_s:7.1f} ms", flush=True)
            verdict = "not replayed" if mine is None else f"{mine:.1f} ms, {100 * (mine / measured[fastest] - 1):+.1f}%"
            print(f"plan's choice: {chosen.hook}, {chosen.bucket_mb:g} MB -> {verdict}"
                  f" against the fastest replayed ({fastest[0]}, {fastest[1]:g} MB: {measured[fastest]:.1f} ms)")
    if errors:
        print(f"held-out counts: median |error| {100 * statistics.median(errors):.1f}%, "
              f"worst {100 * max(errors):.1f}% over {len(errors)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
