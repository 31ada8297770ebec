"""What the planner takes on trust for the published runs, measured on a device.

    python benchmarks/step_shapes.py --measure shapes.json        # on a GPU: a minute
    python benchmarks/step_shapes.py --measure shapes.json --cpu-smoke   # the same code, tiny, on CPU
    python benchmarks/step_shapes.py --compare shapes.json        # anywhere: the tables of docs/planning.md

planner/published.py gives each published run the step its source published, split by
assumption: forward a third of forward + backward, the optimizer at memory bandwidth (20 bytes
per parameter), the gradients arriving as the layers' backward FLOPs say, DDP's per-bucket host
cost 20 us (step_model.BUCKET_HOST_S). --measure times the runs' models at their batches, as
`calibrate` times a step (phase by phase, each gradient's arrival from device-side events), and
DDP on a one-rank process group at 1, 5 and 25 MB buckets: there the all-reduce moves nothing,
so what differs between bucket sizes is DDP's own cost per bucket. --compare sets each figure
beside its assumption and replans the published runs with the measured shapes.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from torchvision import models

from distributed_step.config import TrainConfig
from distributed_step.parallel import numerics
from distributed_step.planner import published
from distributed_step.planner.model_profile import layer_flops, structural_profile
from distributed_step.planner.presets import SYSTEMS
from distributed_step.planner.step_model import BUCKET_HOST_S, Profile, band, fit_interference, predict
from distributed_step.tools.calibrate import Stepper

# (model, batch per device, precision): the published runs' models at their batches, and ours.
CASES = (("resnet50", 32, "fp32"), ("resnet101", 32, "fp32"), ("resnet50", 256, "fp32"),
         ("resnet50", 256, "bf16"), ("resnet101", 64, "fp32"), ("vgg16", 64, "fp32"), ("resnet18", 256, "bf16"))
DDP_CASE, DDP_CAPS_MB, DDP_ROUNDS = ("resnet50", 32, "fp32"), (1.0, 5.0, 25.0), 3
SMOKE_CASES, SMOKE_DDP_CASE = (("resnet18", 2, "fp32"), ("resnet18", 2, "bf16")), ("resnet18", 2, "fp32")


def _step(arch: str, batch: int, precision: str, image_size: int, device: torch.device, wrap=None,
          host_clock: bool = False) -> dict:
    channels_last = precision != "fp32"
    cfg = TrainConfig(image_size=image_size, precision=precision, channels_last=channels_last)
    net = getattr(models, arch)(num_classes=1000).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = wrap(net) if wrap else net
    stepper = Stepper(model, net, cfg, device, batch)
    # What calibrate did before it read the device's events: the host's clock as the hooks run.
    stepper.arrivals.on_cuda = stepper.arrivals.on_cuda and not host_clock
    runs = stepper.measure()
    sizes = [p.numel() * 4 for p in net.parameters() if p.requires_grad]
    backward = statistics.median(r["backward"] for r in runs)
    order = runs[-1]["order"]
    record = {"arch": arch, "batch": batch, "precision": precision, "image_size": image_size,
              "params": sum(p.numel() for p in net.parameters()),
              **{k: statistics.median(r[k] for r in runs) for k in ("forward", "backward", "optimizer", "step")},
              "grad_bytes": [sizes[i] for i in order],
              "grad_ready": sorted(min(1.0, statistics.median(r["ready"][k] for r in runs) / backward)
                                   for k in range(len(order)))}
    if wrap:
        record["buckets"] = _bucket_count(model)
    del model, net, runs, stepper
    gc.collect()
    return record


def _bucket_count(ddp) -> int | None:
    try:  # a private API: the rebuilt buckets' gradient views
        return len(ddp.reducer._get_zeros_like_grad_buckets())
    except (AttributeError, RuntimeError):
        return None


def measure(out: str, smoke: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    numerics.configure(deterministic=False)
    image_size, cases, ddp_case = (32, SMOKE_CASES, SMOKE_DDP_CASE) if smoke else (224, CASES, DDP_CASE)
    found = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "steps": [], "ddp": []}
    for arch, batch, precision in cases:
        found["steps"].append(_step(arch, batch, precision, image_size, device))
        print(_line(found["steps"][-1]), flush=True)
    ours = cases[-1]
    found["host_clock"] = _step(*ours, image_size, device, host_clock=True)
    print(f"host clock: {_line(found['host_clock'])}", flush=True)
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="step-shapes-"), "store"), 1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        for _ in range(DDP_ROUNDS):  # the sizes in turn, so a drift of the machine touches each alike
            for cap in DDP_CAPS_MB:
                wrap = lambda net, cap=cap: torch.nn.parallel.DistributedDataParallel(net, bucket_cap_mb=cap)
                found["ddp"].append({"bucket_cap_mb": cap, **_step(*ddp_case, image_size, device, wrap)})
                print(f"DDP, {cap:g} MB buckets: {found['ddp'][-1]['buckets']} buckets, "
                      f"{_line(found['ddp'][-1])}", flush=True)
    finally:
        dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(found, f)
    print(f"wrote {out}")


def _line(r: dict) -> str:
    return (f"{r['arch']} batch {r['batch']} {r['precision']}: forward {1e3 * r['forward']:.2f} ms, "
            f"backward {1e3 * r['backward']:.2f} ms, optimizer {1e3 * r['optimizer']:.2f} ms, "
            f"step {1e3 * r['step']:.2f} ms")


def compare(path: str, memory_gbyte_s: float = 4800.0) -> None:
    """The measured shapes beside the assumptions, and the published runs replanned with them.
    `memory_gbyte_s`: the measured device's memory bandwidth (H200: 4.8 TB/s)."""
    with open(path) as f:
        found = json.load(f)
    print(f"{found['device']}, torch {found['torch']}\n")
    print("| model | batch | precision | step ms | forward share (assumed 33%) | optimizer ms (assumed) "
          "| mean byte ready (FLOPs profile) | shift |")
    print("|---|---|---|---|---|---|---|---|")
    for r in found["steps"]:
        assumed_opt, derived = r["params"] * 20 / (memory_gbyte_s * 1e9), _structural(r)
        print(f"| {r['arch']} | {r['batch']} | {r['precision']} | {1e3 * r['step']:.1f} | "
              f"{100 * _forward_share(r):.0f}% | {1e3 * r['optimizer']:.2f} ({1e3 * assumed_opt:.2f}) | "
              f"{_mean_ready(r['grad_bytes'], r['grad_ready']):.2f} "
              f"({_mean_ready(derived.grad_bytes, derived.grad_ready):.2f}) | "
              f"{_ready_shift(r, derived):.2f} |")
    if "host_clock" in found:
        _clocks(found["steps"][-1], found["host_clock"])
    _ddp(found["ddp"])
    _replan(found["steps"])


def _forward_share(r: dict) -> float:
    return r["forward"] / (r["forward"] + r["backward"])


def _structural(r: dict) -> Profile:
    net = _meta(r["arch"])
    return structural_profile(r["arch"], net, r["image_size"], r["batch"], r["forward"], r["backward"],
                              r["optimizer"], layers=layer_flops(net, r["image_size"]))


def _meta(arch: str):
    with torch.device("meta"):
        return getattr(models, arch)(num_classes=1000)


def _measured(r: dict) -> Profile:
    return Profile(r["arch"], r["batch"], r["forward"], r["backward"], r["optimizer"],
                   tuple(r["grad_bytes"]), tuple(r["grad_ready"]))


def _mean_ready(sizes, ready) -> float:
    """When the average gradient byte is ready, as a fraction of backward."""
    return sum(b * at for b, at in zip(sizes, ready)) / sum(sizes)


def _ready_shift(r: dict, other: Profile) -> float:
    """The area between the two curves of bytes ready against time: how far, on average over
    the bytes, one says a byte is ready from when the other says it (a fraction of backward)."""
    def curve(sizes, ready, t):
        return sum(b for b, at in zip(sizes, ready) if at <= t) / sum(sizes)
    grid = [k / 1000 for k in range(1001)]
    return sum(abs(curve(r["grad_bytes"], r["grad_ready"], t) - curve(other.grad_bytes, other.grad_ready, t))
               for t in grid) / len(grid)


def _clocks(device_clock: dict, host_clock: dict) -> None:
    """A plan from each (this torchvision model, no jitter): the host's clock says the gradients
    were ready earlier than they were, which matters where buckets wait for them."""
    print(f"\n{device_clock['arch']} {device_clock['precision']}, batch {device_clock['batch']}: "
          f"mean byte ready at {_mean_ready(device_clock['grad_bytes'], device_clock['grad_ready']):.2f} of "
          f"backward by device events, {_mean_ready(host_clock['grad_bytes'], host_clock['grad_ready']):.2f} "
          f"by the host's clock")
    for system, n in (("h100-25gbe", 64), ("h100-100gbe", 256)):
        for bucket_mb in (10.0, 25.0):
            plans = [predict(_measured(r), SYSTEMS[system], n, bucket_mb=bucket_mb) for r in (device_clock, host_clock)]
            print(f"  {system} x {n}, {bucket_mb:g} MB buckets: efficiency {100 * plans[0].efficiency:.1f}% "
                  f"from device events, {100 * plans[1].efficiency:.1f}% from the host's clock")


def _ddp(rows: list[dict]) -> None:
    print("\nDDP on a one-rank group, the sizes in turn (step ms per round):")
    caps = sorted({r["bucket_cap_mb"] for r in rows})
    medians = {}
    for cap in caps:
        mine = [r for r in rows if r["bucket_cap_mb"] == cap]
        medians[cap] = statistics.median(r["step"] for r in mine)
        print(f"  {cap:g} MB, {mine[0]['buckets']} buckets: " + ", ".join(f"{1e3 * r['step']:.2f}" for r in mine)
              + f" (median {1e3 * medians[cap]:.2f})")
    small, large = caps[0], caps[-1]
    extra = _count(rows, small) - _count(rows, large)
    if extra:
        print(f"  per extra bucket: {1e6 * (medians[small] - medians[large]) / extra:.0f} us "
              f"(the model: {1e6 * BUCKET_HOST_S:.0f} us)")


def _count(rows: list[dict], cap: float) -> int:
    return next(r["buckets"] for r in rows if r["bucket_cap_mb"] == cap) or 0


def _replan(steps: list[dict]) -> None:
    """Each published run with its forward share and gradient arrivals as measured for its model
    (fp32, or bf16 for the AMP run; the largest batch measured, the most device-bound), the
    interference refitted the same way."""
    def shaped(run, profile: Profile) -> Profile | None:
        precision = "bf16" if "AMP" in run.name else "fp32"
        mine = [r for r in steps if r["arch"] == run.arch and r["precision"] == precision]
        if not mine:
            return None
        r = max(mine, key=lambda r: r["batch"])
        compute, share = profile.forward_s + profile.backward_s, _forward_share(r)
        return replace(profile, forward_s=share * compute, backward_s=(1 - share) * compute,
                       grad_bytes=tuple(r["grad_bytes"]), grad_ready=tuple(r["grad_ready"]))

    fit = shaped(published.FIT_RUN, published.profile(published.FIT_RUN))
    if fit is None:
        return
    kappa = fit_interference(fit, published.system_for(published.FIT_RUN), published.FIT_RANKS,
                             published.FIT_STEP_S, published.FIT_RUN.bucket_mb)
    print(f"\nThe published runs with the measured shapes (interference refitted: {kappa:.3f}):")
    print("| run | published | model, FLOPs shape | model, measured shape | moved |")
    print("|---|---|---|---|---|")
    derived = {row["run"]: row["model"] for row in published.table()}
    for run in published.RUNS:
        profile = shaped(run, published.profile(run))
        if profile is None:
            continue
        system = replace(published.system_for(run), interference=None)  # the refitted figure, not the preset's
        _, mid, _ = band(replace(profile, interference=kappa), system, run.ranks, bucket_mb=run.bucket_mb)
        print(f"| {run.name} | {100 * run.published:.1f}% | {100 * derived[run.name]:.1f}% | "
              f"{100 * mid.efficiency:.1f}% | {100 * (mid.efficiency - derived[run.name]):+.1f} points |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", metavar="JSON", help="time the cases here and write them")
    parser.add_argument("--cpu-smoke", action="store_true", help="with --measure: tiny cases on CPU")
    parser.add_argument("--compare", metavar="JSON", help="set a measured file beside the planner's assumptions")
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.cpu_smoke)
    if args.compare:
        compare(args.compare)
    if not (args.measure or args.compare):
        parser.error("give --measure JSON or --compare JSON")
