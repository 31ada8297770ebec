"""`distributed-step plan`: the step at 8 ... 1,024 devices, from a calibration and interconnects.

    distributed-step plan --calibration cal.json --gpus 8,64,256,1024 \\
        --interconnect h100-ib400,h100-100gbe --speedup 40 --json plan.json
    distributed-step plan --calibration cal.json --gpus 2,4,8 --interconnect measured
    distributed-step plot --plan plan.json                     # efficiency against devices

For every device count and interconnect: the step time, images/s, the scaling efficiency (one
device's step alone over the step at N) with its band, the communication left after backward,
and the fastest hook and bucket size (docs/planning.md says how the model works and how well it
predicted what could be checked). The calibration's device is the one planned for unless
--speedup (how many times faster the target device computes the same step) or --compute-ms
(its forward, backward and optimizer times) say otherwise. `measured` plans on the link the
calibration measured, extended to more hosts like it.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, replace

from distributed_step.config import ConfigError, OneLineErrorParser, TrainConfig
from distributed_step.planner import presets
from distributed_step.planner.calibration import CalibrationError, load
from distributed_step.planner.step_model import band, best

DEFAULT_GPUS = "8,64,256,1024"
DEFAULT_SYSTEMS = "h100-ib400,h100-100gbe"


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text}: expected whole numbers separated by commas, like 8,64,256") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text}: every device count must be at least 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="distributed-step plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", required=True, help="the file `distributed-step calibrate` wrote")
    parser.add_argument("--arch", default=None, help="the model the plan is for (refused if the calibration's differs)")
    parser.add_argument("--gpus", default=DEFAULT_GPUS, help=f"device counts (default: {DEFAULT_GPUS})")
    parser.add_argument("--interconnect", default=DEFAULT_SYSTEMS,
                        help=f"systems: {', '.join(presets.SYSTEMS)}, or measured (default: {DEFAULT_SYSTEMS})")
    parser.add_argument("--speedup", type=float, default=1.0,
                        help="the target device computes this many times faster than the calibration's")
    parser.add_argument("--compute-ms", default="", help="the target device's forward,backward,optimizer ms")
    parser.add_argument("--hook", default="none", choices=("none", "fp16", "bf16"), help="the hook to plan with")
    parser.add_argument("--bucket-cap-mb", type=float, default=TrainConfig.bucket_cap_mb,
                        help="the bucket size to plan with (default: train's)")
    parser.add_argument("--json", default="", help="also write the plan here (for `distributed-step plot --plan`)")
    return parser


def plan(argv: list[str]) -> tuple[list[dict], str]:
    args = build_parser().parse_args(argv)
    try:
        cal = load(args.calibration, args.arch)
    except CalibrationError as exc:
        raise ConfigError(str(exc)) from None
    counts = _ints(args.gpus, "--gpus")
    if not (math.isfinite(args.speedup) and args.speedup > 0):
        raise ConfigError(f"--speedup {args.speedup}: must be a number above 0")
    if not (math.isfinite(args.bucket_cap_mb) and args.bucket_cap_mb > 0):
        raise ConfigError(f"--bucket-cap-mb {args.bucket_cap_mb}: must be a number of MB above 0")
    profile = cal.profile.faster(args.speedup)
    if args.compute_ms:
        try:
            times = [float(v) / 1e3 for v in args.compute_ms.split(",")]
        except ValueError:
            times = []
        if len(times) != 3 or not all(math.isfinite(t) and t > 0 for t in times):
            raise ConfigError(f"--compute-ms {args.compute_ms}: expected forward,backward,optimizer in ms, all above 0")
        scale = sum(times) / profile.alone_s
        profile = replace(profile.faster(1 / scale), forward_s=times[0], backward_s=times[1], optimizer_s=times[2])
    systems = []
    for name in [s.strip() for s in args.interconnect.split(",") if s.strip()]:
        if name == "measured":
            if cal.link is None:
                raise ConfigError(f"--interconnect measured: {args.calibration} measured no link (one rank)")
            systems.append(cal.link.system())
        else:
            try:
                systems.append(presets.system(name))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    rows = []
    for system in systems:
        for n in counts:
            low, mid, high = band(profile, system, n, args.hook, args.bucket_cap_mb)
            top = best(profile, system, n)
            rows.append({**asdict(mid), "efficiency_band": [round(high.efficiency, 4), round(low.efficiency, 4)],
                         "step_s_band": [low.step_s, high.step_s], "best_hook": top.hook,
                         "best_bucket_mb": top.bucket_mb, "best_step_s": top.step_s})
    return rows, args.json


def format_table(rows: list[dict]) -> str:
    lines = [(f"{'system':<16}{'devices':>8}{'step ms':>9}{'images/s':>11}{'efficiency':>12}{'band':>14}"
              f"{'exposed ms':>12}  best")]
    for r in rows:
        lo, hi = r["efficiency_band"]
        lines.append(f"{r['system']:<16}{r['ranks']:>8}{1e3 * r['step_s']:>9.1f}{r['images_per_s']:>11,.0f}"
                     f"{100 * r['efficiency']:>11.1f}%{f'{100 * lo:.0f}-{100 * hi:.0f}%':>14}"
                     f"{1e3 * r['exposed_s']:>12.1f}  {r['best_hook']}, {r['best_bucket_mb']:g} MB")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows, out = plan(argv)
    print(format_table(rows), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0
