"""`python -m distributed_step bench`: where every millisecond of the training step goes.

    python -m distributed_step bench --world-sizes 1,2,4           # spawns its own ranks
    torchrun --nproc_per_node=2 -m distributed_step bench          # or runs in torchrun's ranks
    python -m distributed_step bench --world-sizes 2 --sweep bucket_cap_mb=5,25,100 --json out.jsonl
    python -m distributed_step bench --input --data imagefolder:DIR --image-size 224   # the loader alone

It runs the real step (`step.train_step` on a model wrapped by `ddp.wrap`, exactly as `train`
does) on synthetic images, and the same step under `no_sync()`: no gradient all-reduce at all,
the compute-only bound. Blocks of both modes, and of every variant of a sweep, are interleaved
round by round in the same processes, so machine noise hits them alike. Each step is split into
forward, backward (to the last gradient), exposed communication (the all-reduce time that
backward did not hide), optimizer, and the rest; the parts add up to the step time. `x bound`
divides by the ranks' mean no-sync step; `x slowest` by the slowest rank's, which is what a
synchronous step can reach at best, so it leaves out how unevenly the ranks compute.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from contextlib import nullcontext

import torch
from torch import nn

from distributed_step.config import ConfigError, OneLineErrorParser, TrainConfig, add_config_flags, field_type
from distributed_step.data.datasets import synthetic_batch
from distributed_step.model import build_model
from distributed_step.observe.clock import PhaseClock
from distributed_step.optim import sgd
from distributed_step.parallel import ddp, numerics, placement
from distributed_step.parallel.numerics import amp
from distributed_step.parallel.process_group import (
    DistEnv,
    all_gather_object,
    barrier,
    broadcast_params_,
    detect,
    setup,
    state_digest,
    teardown,
)
from distributed_step.step import train_step

# The TrainConfig fields that shape the step; the bench takes them as flags and sweeps them.
STEP_FLAGS = ("image_size", "global_batch_size", "channels_last", "precision", "compile", "bucket_cap_mb",
              "static_graph", "bucket_view", "threads", "pin_cores", "comm_hook", "powersgd_rank", "fused_sgd",
              "backend", "seed")
PHASES = ("forward", "backward", "comm", "optimizer")
# What the PyTorch DDP tutorial runs under torchrun: every knob at torch's default.
TUTORIAL = {"bucket_cap_mb": 25.0, "static_graph": False, "bucket_view": False,
            "comm_hook": "none", "channels_last": False, "precision": "fp32", "compile": False, "fused_sgd": False,
            "pin_cores": False}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="distributed-step bench", argument_default=argparse.SUPPRESS,
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", default="", help="spawn these world sizes in turn, e.g. 1,2,4 "
                        "(default: the current launch, or 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode per round (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant and mode (default: 3)")
    parser.add_argument("--batch-per-rank", type=int, default=0,
                        help="images per rank per step (0: --global-batch-size / world size)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                        help="one variant per value (repeatable: the product); KEY is a flag name")
    parser.add_argument("--compare-tutorial", action="store_true", default=False,
                        help="add the DDP tutorial's settings (every knob at torch's default) as a variant")
    parser.add_argument("--json", default="", help="append one JSON line per variant and mode to this file")
    add_config_flags(parser, STEP_FLAGS)
    parser.set_defaults(image_size=64, global_batch_size=64)  # the reference configuration
    return parser


@dataclasses.dataclass
class Variant:
    label: str
    cfg: TrainConfig
    batch_per_rank: int


def _value(key: str, raw: str):
    if key == "batch_per_rank":
        return int(raw)
    kind = field_type(key)
    if kind is bool:
        if raw.lower() not in ("true", "false", "1", "0", "on", "off"):
            raise ConfigError(f"--sweep {key}: {raw!r} is not a boolean")
        return raw.lower() in ("true", "1", "on")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"--sweep {key}: {raw!r} is not a {kind.__name__}") from None


def variants(args: dict, world_size: int) -> list[Variant]:
    """The base configuration, one variant per sweep combination, and the tutorial if asked."""
    base = {k: v for k, v in args.items() if k in STEP_FLAGS}
    axes = []
    for item in args["sweep"]:
        key, _, values = item.partition("=")
        key = key.replace("-", "_")
        if key not in STEP_FLAGS + ("batch_per_rank",) or not values:
            raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2 with KEY one of "
                              f"{', '.join(STEP_FLAGS + ('batch_per_rank',))}")
        axes.append([(key, _value(key, v)) for v in values.split(",")])
    combos = [dict(c) for c in itertools.product(*axes)] or [{}]
    if args["compare_tutorial"]:
        # torchrun gives each rank one thread when it starts several, and leaves one alone.
        combos.append({"tutorial": True, **TUTORIAL, "threads": 1 if world_size > 1 else 0})
    out = []
    for combo in combos:
        settings = {**base, **{k: v for k, v in combo.items() if k in STEP_FLAGS}}
        per_rank = combo.get("batch_per_rank", args["batch_per_rank"])
        if per_rank:
            settings["global_batch_size"] = per_rank * world_size
        cfg = TrainConfig(data="synthetic", **settings).validate(world_size)
        label = "tutorial" if combo.get("tutorial") else \
            " ".join(f"{k}={v}" for k, v in combo.items()) or "default"
        out.append(Variant(label, cfg, cfg.global_batch_size // world_size))
    return out


class _Bench:
    """One variant on this rank: its model, optimizer, fixed batch and per-step records."""

    def __init__(self, variant: Variant, env: DistEnv):
        cfg, self.env, self.variant = variant.cfg, env, variant
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.net = build_model(10, channels_last=cfg.channels_last).to(env.device)
        self.ddp = ddp.wrap(self.net, env, cfg)
        report = getattr(self.ddp, "link_report", None)  # --comm-hook auto: what it measured and chose
        self.chosen = {"comm_hook_chosen": getattr(self.ddp, "comm_hook", cfg.comm_hook),
                       **({"link_check": report.as_record()} if report else {})}
        self.model = torch.compile(self.ddp) if cfg.compile else self.ddp
        self.images, self.labels = synthetic_batch(variant.batch_per_rank, cfg.image_size, 10, env.device,
                                                   cfg.seed * 1000 + env.rank,  # each rank its own batch
                                                   cfg.channels_last)
        self.precision, self.scaler = amp(cfg.precision, env.device)
        self.optimizer = sgd(self.net.parameters(), 0.01, 0.9, 5e-4, fused=cfg.fused_sgd, scaler=self.scaler)
        self.clock = PhaseClock(env.device)
        self.clock.watch_gradients(self.net)
        self.loss_fn = nn.CrossEntropyLoss()
        self.records: dict[str, list[dict]] = {"sync": [], "nosync": []}

    def run(self, mode: str, steps: int, record: bool) -> None:
        placement.place(self.variant.cfg, self.env)
        barrier(self.env)  # blocks start together, so no rank's wait is counted as work
        cuda = self.env.device.type == "cuda"
        for _ in range(steps):
            self.clock.start()
            began = time.perf_counter()
            no_sync = self.ddp.no_sync() if mode == "nosync" and self.ddp is not self.net else nullcontext()
            with no_sync:
                train_step(self.model, self.optimizer, self.images, self.labels, self.loss_fn, self.clock,
                           precision=self.precision, scaler=self.scaler)
            if cuda:
                torch.cuda.synchronize()
            step_ms = (time.perf_counter() - began) * 1e3
            phases = self.clock.read_ms()
            if record:
                self.records[mode].append({"step_ms": step_ms, **{f"{p}_ms": phases.get(p, 0.0) for p in PHASES}})

    def check_sync(self) -> dict:
        """Prove what each mode communicates: from identical replicas with fresh optimizer state,
        one step under no_sync must leave them different (each rank saw its own batch, nothing
        was summed), and one synchronized step must leave them identical (hooks included)."""
        verdict = {}
        for mode in ("nosync", "sync"):
            broadcast_params_(self.net, self.env)
            self.optimizer.state.clear()  # momentum from diverged steps would split the replicas
            self.run(mode, 1, record=False)
            digests = all_gather_object(state_digest({k: p for k, p in self.net.named_parameters()}), self.env)
            verdict[f"replicas_equal_after_{mode}"] = len(set(digests)) == 1
        return verdict

    def summary(self, mode: str) -> dict:
        rows = self.records[mode]
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
        steps = sorted(r["step_ms"] for r in rows)
        mean["step_ms_median"] = steps[len(steps) // 2]
        return mean


def run_rank(args: dict) -> list[dict] | None:
    """Measure every variant on this rank; rank 0 returns the records (the others None)."""
    world = detect()
    plan = variants(args, world.world_size)
    numerics.configure(deterministic=False)  # the numerics `train` runs with by default
    env = setup(world, plan[0].cfg.backend)
    try:
        benches = [_Bench(v, env) for v in plan]
        compiled = {}
        for i, bench in enumerate(benches):
            before = _graph_breaks()
            for mode in ("sync", "nosync"):
                bench.run(mode, args["warmup"], record=False)  # compiles, with --compile
            if bench.variant.cfg.compile:
                # Each break splits the compiled graph in two, with Python in between.
                after = _graph_breaks()
                compiled[i] = {"graph_breaks": sum(after.values()) - sum(before.values()),
                               "graph_break_reasons": sorted(" ".join(k.split())[:160] for k in after
                                                             if after[k] > before.get(k, 0))}
        for r in range(args["rounds"]):
            # Rotate the order every round so no variant always runs first (or just after another).
            for bench in benches[r % len(benches):] + benches[:r % len(benches)]:
                for mode in (("sync", "nosync") if r % 2 == 0 else ("nosync", "sync")):
                    bench.run(mode, args["steps"], record=True)
        checks = [{**(b.check_sync() if env.distributed else {}), **compiled.get(i, {}), **b.chosen}
                  for i, b in enumerate(benches)]
        gathered = all_gather_object([[b.summary(m) for m in ("sync", "nosync")] for b in benches], env)
    finally:
        teardown(env)
    if env.rank != 0:
        return None
    return _records(plan, gathered, checks, env, args)


def _graph_breaks() -> dict[str, int]:
    """Graph breaks torch.compile has taken in this process so far, by reason (torch._dynamo's counters)."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def _records(plan: list[Variant], gathered: list, checks: list[dict], env: DistEnv, args: dict) -> list[dict]:
    """Average each figure over the ranks; the parts of the step add up to its time by construction."""
    records = []
    flops = {size: flop_per_image(size) for size in {v.cfg.image_size for v in plan}}
    for i, variant in enumerate(plan):
        by_mode = {}
        for j, mode in enumerate(("sync", "nosync")):
            per_rank = [g[i][j] for g in gathered]
            fig = {k: round(sum(r[k] for r in per_rank) / len(per_rank), 3) for k in per_rank[0]}
            fig["other_ms"] = round(fig["step_ms"] - sum(fig[f"{p}_ms"] for p in PHASES), 3)
            fig["images_per_s"] = round(variant.cfg.global_batch_size / fig["step_ms"] * 1e3, 2)
            # Achieved arithmetic rate over all ranks: compare it with the hardware's peak.
            fig["tflops"] = round(fig["images_per_s"] * flops[variant.cfg.image_size] / 1e12, 4)
            # A synchronous step cannot beat its slowest rank: without sync each rank runs at
            # its own pace, so the mean bound also counts how unevenly the ranks compute.
            fig["slowest_rank_ms"] = round(max(r["step_ms"] for r in per_rank), 3)
            by_mode[mode] = fig
        for mode, fig in by_mode.items():
            records.append({"variant": variant.label, "mode": mode, "world_size": env.world_size,
                            "device": env.device.type, "batch_per_rank": variant.batch_per_rank,
                            "steps": args["steps"] * args["rounds"], **fig,
                            "vs_bound": round(fig["step_ms"] / by_mode["nosync"]["step_ms"], 3),
                            # Medians resist the odd slow step of a shared machine: the headline.
                            "vs_bound_median": round(fig["step_ms_median"] / by_mode["nosync"]["step_ms_median"], 3),
                            # Bound by the slowest rank's compute: what is left is communication.
                            "vs_slowest_bound": round(fig["step_ms"] / by_mode["nosync"]["slowest_rank_ms"], 3),
                            **checks[i],
                            "config": {k: getattr(variant.cfg, k) for k in STEP_FLAGS}})
    return records


def flop_per_image(image_size: int) -> float:
    """Floating-point operations of one training image (forward + backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build_model(10)
    counter = FlopCounterMode(display=False)
    with counter:  # two images: BatchNorm refuses to train on one
        nn.functional.cross_entropy(net(torch.randn(2, 3, image_size, image_size)), torch.tensor([0, 1])).backward()
    return float(counter.get_total_flops()) / 2


def _spawned_rank(local_rank: int, world_size: int, port: int, args: dict, result_path: str) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    records = run_rank(args)
    if records is not None:
        with open(result_path, "w") as fh:
            json.dump(records, fh)


def spawn(args: dict, world_size: int) -> list[dict]:
    """Start `world_size` fresh ranks on this machine and return rank 0's records."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "records.json")
        mp.start_processes(_spawned_rank, args=(world_size, port, args, result), nprocs=world_size,
                           start_method="spawn")
        with open(result) as fh:
            return json.load(fh)


def format_table(records: list[dict]) -> str:
    head = (f"{'world':>5} {'variant':<36} {'mode':<6} {'img/s':>8} {'step ms':>8} {'fwd':>7} {'bwd':>7} "
            f"{'comm':>6} {'opt':>6} {'other':>6} {'x bound':>7} {'median':>7} {'x slowest':>9}")
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r['world_size']:>5} {r['variant'][:36]:<36} {r['mode']:<6} {r['images_per_s']:>8.1f} "
                     f"{r['step_ms']:>8.1f} {r['forward_ms']:>7.1f} {r['backward_ms']:>7.1f} {r['comm_ms']:>6.1f} "
                     f"{r['optimizer_ms']:>6.1f} {r['other_ms']:>6.1f} {r['vs_bound']:>7.3f} "
                     f"{r['vs_bound_median']:>7.3f} {r['vs_slowest_bound']:>9.3f}")
    lines += [f"{r['variant']}: {r['graph_breaks']} graph break(s) under torch.compile: "
              + "; ".join(r["graph_break_reasons"]) for r in records if "graph_breaks" in r and r["mode"] == "sync"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "--input" in argv:
        from distributed_step.tools import input_bench

        return input_bench.main(argv)
    args = vars(build_parser().parse_args(argv))
    for name in ("steps", "rounds"):
        if args[name] < 1:
            raise ConfigError(f"--{name} must be at least 1")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "RANK" in os.environ
    if launched:
        if args["world_sizes"]:
            raise ConfigError("--world-sizes spawns its own ranks: drop it under torchrun (the launch sets the world)")
        records = run_rank(args)
    else:
        try:
            sizes = [int(s) for s in (args["world_sizes"] or "1").split(",")]
        except ValueError:
            raise ConfigError(f"--world-sizes {args['world_sizes']!r}: expected integers like 1,2,4") from None
        if any(s < 1 for s in sizes):
            raise ConfigError("--world-sizes: every size must be at least 1")
        for size in sizes:
            variants(args, size)  # fail on bad settings here, before any rank starts
        records = []
        for size in sizes:
            records += run_rank(args) if size == 1 else spawn(args, size)
    if records is None:
        return 0
    print(format_table(records), flush=True)
    if args["json"]:
        with open(args["json"], "a") as fh:
            fh.writelines(json.dumps(record) + "\n" for record in records)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
