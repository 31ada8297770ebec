"""How well `plan` predicts what it was not fitted on: fit on two emulated hosts, predict four
and eight, at several link rates (docs/planning.md).

    sudo python benchmarks/plan_validation.py [--rates 1gbit,2500mbit,10gbit] [--hosts 2,4,8]
    sudo python benchmarks/plan_validation.py --rates 1gbit --real 2,4     # real training instead

For each rate: `calibrate` on two hosts (one rank each; testing/netlab.py, links shaped with tc
tbf) measures the step and fits the link; then the step is replayed on 2, 4 and 8 hosts
(testing/replay.py: ranks sleep the calibrated compute while real DDP all-reduces real
buckets over the shaped links), and the replay's median step is set against the plan's. The
replay has costs of its own that no plan of a real step should carry (its sleeping autograd
nodes, the barrier before each step), so one per-step constant is fitted on the two hosts (the
replayed step there) and kept for four and eight; the plan without it is printed too. On four
and eight hosts the all-reduce alone is measured as well, and the same plan made on the link
fitted there: what is left of the error then is the step model's, not the link model's.
The emulated hosts share this machine's cores, which move every packet of every link, so the
testbed carries less than all its links at once; its capacity is measured once, on two hosts
with links unshaped, and planned with (`System.fabric_gbyte_s`) beside the plan without it.
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

from distributed_step.config import TrainConfig
from distributed_step.planner.calibration import Link, load
from distributed_step.planner.collectives import System, all_reduce_s, fit
from distributed_step.planner.step_model import best, predict
from testing.netlab import Network

CHOICES = [(hook, mb) for hook in ("none", "bf16") for mb in (5.0, 25.0, 100.0)]


def env() -> dict:
    # One thread per rank: two or more ranks on two cores would otherwise spin against each other.
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    return {**inherited, "OMP_NUM_THREADS": "1"}


def calibrate(rate: str, folder: str, size: list[str], hosts: int = 2) -> str:
    out = os.path.join(folder, f"cal-{rate}-{hosts}.json")
    with Network(hosts, rate=rate) as net:
        procs = net.torchrun(1, ["-m", "distributed_step", "calibrate", "--out", out, *size], run_id="cal", env=env())
        outputs = net.wait(procs, timeout=400)
    if any(p.returncode for p in procs):
        raise SystemExit(f"calibrate at {rate} failed:\n{outputs[0][-2000:]}")
    return out


def train(rate: str, hosts: int, folder: str, size: list[str], steps: int = 14) -> float:
    """A real training run's median step (ms), past its first three."""
    out = os.path.join(folder, f"run-{rate}-{hosts}")
    flags = ["--data", "synthetic", "--synthetic-samples", "640", "--steps", str(steps), "--log-every", "1",
             "--warmup-steps", "0", "--checkpoint-every", "0", "--eval-every", "0", "--out", out]
    with Network(hosts, rate=rate) as net:
        procs = net.torchrun(1, ["-m", "distributed_step", "train", *size, *flags], run_id="train", env=env())
        outputs = net.wait(procs, timeout=600)
    if any(p.returncode for p in procs):
        raise SystemExit(f"train at {rate} on {hosts} hosts failed:\n{outputs[0][-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as lines:
        records = [json.loads(line) for line in lines if line.strip()]
    return statistics.median(r["step_ms"] for r in records if "step_ms" in r and r["step"] > 2)


def real_training(rate: str, counts: list[int], folder: str, batch_per_rank: int, image_size: str) -> None:
    """The plan against real training on each count, from a calibration on that count (compute
    measured with as many ranks sharing the cores as the run has), and past the first count also
    on the first count's link."""
    links = {}
    for hosts in counts:
        size = ["--global-batch-size", str(hosts * batch_per_rank), "--image-size", image_size]
        cal = load(calibrate(rate, folder, size, hosts))
        links[hosts] = cal.link.system()
        measured = train(rate, hosts, folder, size)
        line = f"{rate:>9} {hosts} hosts, real training: {measured:7.1f} ms"
        for source in sorted({counts[0], hosts}):  # at the bucket size calibrate and train ran with
            planned = 1e3 * predict(cal.profile, links[source], hosts, bucket_mb=TrainConfig.bucket_cap_mb).step_s
            error = 100 * (planned / measured - 1)
            line += f"; planned on the link of {source} hosts {planned:7.1f} ms ({error:+5.1f}%)"
        print(line, flush=True)


def testbed_capacity(folder: str, cal: str, hosts: int = 2) -> float:
    """GB/s that all emulated links carry together: the unshaped all-reduce's bytes sent by all
    ranks (2(n-1) S), over its time (with t = 2(n-1)/n S / B, that is n B)."""
    measured = torchrun(None, hosts, ["--calibration", cal, "--link-only"])["all_reduce_s"]
    bus, _ = fit([(int(size), t) for size, t in measured.items()], hosts)
    print(f"the testbed carries {hosts * bus:.2f} GB/s in all ({hosts} hosts, links unshaped: "
          f"{bus:.2f} GB/s bus)", flush=True)
    return hosts * bus


def torchrun(rate: str | None, hosts: int, args: list[str]) -> dict:
    """Rank 0's last JSON line of `python -m testing.replay ARGS` on `hosts` emulated hosts."""
    with Network(hosts, rate=rate) as net:
        procs = net.torchrun(1, ["-m", "testing.replay", *args], run_id="replay", env=env())
        outputs = net.wait(procs, timeout=600)
    if any(p.returncode for p in procs):
        raise SystemExit(f"testing.replay {' '.join(args)} at {rate} on {hosts} hosts failed:\n{outputs[0][-2000:]}")
    return json.loads([x for x in outputs[0].splitlines() if x.startswith("{")][-1])


def replay(rate: str, hosts: int, cal: str, hook: str = "none", bucket_mb: float = 25.0, steps: int = 10) -> float:
    return torchrun(rate, hosts, ["--calibration", cal, "--steps", str(steps), "--hook", hook,
                                  "--bucket-cap-mb", str(bucket_mb)])["step_ms"]


def link_at(rate: str, hosts: int, cal: str, planned: System, testbed: System) -> System:
    """The all-reduce alone on `hosts` hosts, each size against the plan (without and with the
    testbed's capacity); the link fitted there (rank 0's times of 1 to 64 MiB, where calibrate
    takes the slowest rank's of 64 KiB to 64 MiB)."""
    measured = torchrun(rate, hosts, ["--calibration", cal, "--link-only"])["all_reduce_s"]
    samples = tuple((int(size), t) for size, t in measured.items())
    for name, system in (("", planned), (", with the testbed's capacity", testbed)):
        errors = "  ".join(f"{size >> 20} MiB {100 * (all_reduce_s(size, hosts, system)[0] / t - 1):+.1f}%"
                           for size, t in samples)
        print(f"{rate:>9} {hosts} hosts, the all-reduce alone, planned{name} against measured: {errors}", flush=True)
    return Link(hosts, 1, "gloo", samples, *fit(samples, hosts)).system()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="1gbit,2500mbit,10gbit")
    parser.add_argument("--hosts", default="2,4,8")
    parser.add_argument("--image-size", default="32")
    parser.add_argument("--batch-per-rank", type=int, default=16)
    parser.add_argument("--real", metavar="HOSTS", help="instead of the replay: real training on these host "
                        "counts (like 2,4), at the first rate")
    args = parser.parse_args()
    if args.real:
        real_training(args.rates.split(",")[0], [int(h) for h in args.real.split(",")], tempfile.mkdtemp(
            prefix="plan-validation-"), args.batch_per_rank, args.image_size)
        return 0
    size = ["--global-batch-size", str(2 * args.batch_per_rank), "--image-size", args.image_size]
    folder = tempfile.mkdtemp(prefix="plan-validation-")
    errors, model_errors, testbed_errors = [], [], []
    capacity = None
    for rate in args.rates.split(","):
        cal_path = calibrate(rate, folder, size)
        cal = load(cal_path)
        capacity = capacity or testbed_capacity(folder, cal_path)
        system = cal.link.system()
        testbed = replace(system, fabric_gbyte_s=capacity)
        # What the replay runs is the network and DDP: the calibration's interference (real compute
        # beside real traffic) and jitter have no place in it.
        bare = replace(cal.profile, jitter_s=0.0, interference=0.0)
        fitted_ms = replay(rate, cal.link.ranks, cal_path)
        constant = fitted_ms / 1e3 - predict(bare, testbed, cal.link.ranks).step_s
        profile = replace(bare, ddp_overhead_s=bare.ddp_overhead_s + constant)
        print(f"{rate:>9} the replay's own cost per step, fitted on {cal.link.ranks} hosts: {1e3 * constant:.1f} ms",
              flush=True)
        for hosts in [int(h) for h in args.hosts.split(",")]:
            planned = 1e3 * predict(profile, system, hosts).step_s
            on_testbed = 1e3 * predict(profile, testbed, hosts).step_s
            unfitted = 1e3 * predict(bare, system, hosts).step_s
            measured = fitted_ms if hosts == cal.link.ranks else replay(rate, hosts, cal_path)
            error = planned / measured - 1
            fitted = hosts == cal.link.ranks
            if not fitted:
                errors.append(abs(error))
                testbed_errors.append(abs(on_testbed / measured - 1))
                # The step model alone: the same plan on the link measured at this host count.
                given_link = 1e3 * predict(profile, link_at(rate, hosts, cal_path, system, testbed), hosts).step_s
                model_errors.append(abs(given_link / measured - 1))
            print(f"{rate:>9} {hosts} hosts: planned {planned:7.1f} ms, replayed {measured:7.1f} ms, "
                  f"error {100 * error:+5.1f}%{'  (the fitted count)' if fitted else ''}; "
                  f"with the testbed's capacity {on_testbed:7.1f} ms ({100 * (on_testbed / measured - 1):+5.1f}%); "
                  f"without the constant {unfitted:7.1f} ms ({100 * (unfitted / measured - 1):+5.1f}%)"
                  + ("" if fitted else f"; on the link measured there {given_link:7.1f} ms "
                     f"({100 * (given_link / measured - 1):+5.1f}%)"), flush=True)
        print(f"{rate:>9} link fitted: {cal.link.bus_gbyte_s:.4f} GB/s bus, {cal.link.fixed_us:.0f} us fixed; "
              f"step alone {1e3 * cal.profile.alone_s:.1f} ms", flush=True)
        if rate == args.rates.split(",")[0] and 4 in [int(h) for h in args.hosts.split(",")]:
            chosen = best(profile, system, 4, choices_mb=sorted({mb for _, mb in CHOICES}))  # among those replayed
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
              f"worst {100 * max(errors):.1f}% over {len(errors)}; on the link measured at each count: "
              f"median {100 * statistics.median(model_errors):.1f}%, worst {100 * max(model_errors):.1f}%; "
              f"planned with the testbed's capacity: median {100 * statistics.median(testbed_errors):.1f}%, "
              f"worst {100 * max(testbed_errors):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
