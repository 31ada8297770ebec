"""`python -m distributed_step plot PATH [PATH ...]`: PNG charts of runs and benchmarks.

    python -m distributed_step plot runs/demo                 # -> runs/demo/plots/*.png
    python -m distributed_step plot bench.jsonl --out docs/img
    python -m distributed_step plot plan.json                 # -> plan-efficiency.png

A run directory (it holds metrics.jsonl) gives loss, held-out accuracy, learning rate, images/s
and the phase breakdown of every logged window. A bench file (the JSON lines of `bench --json`)
gives images/s by world size and stacked phase bars for every variant and mode. A plan (the JSON
of `plan --json`) gives the planned scaling efficiency against devices, with its band.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

from distributed_step.config import ConfigError, OneLineErrorParser

PHASES = ("forward", "backward", "comm", "optimizer", "other")
COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "comm": "#C44E52", "optimizer": "#55A868",
          "other": "#8C8C8C"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out_dir: str, name: str, written: list[str]) -> None:
    target = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    written.append(target)


def _stacked_phases(ax, x: list, rows: list[dict], **bar) -> None:
    """One stacked bar per row, a segment per phase; "other" is what the phases leave of step_ms."""
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        if phase == "other":
            values = [r.get("other_ms", max(0.0, r.get("step_ms", 0) - sum(r.get(f"{p}_ms", 0) for p in PHASES[:-1])))
                      for r in rows]
        else:
            values = [r.get(f"{phase}_ms", 0.0) for r in rows]
        ax.bar(x, values, bottom=bottom, color=COLORS[phase], label=phase, **bar)
        bottom = [b + v for b, v in zip(bottom, values)]


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{number}: not a JSON line") from None
    if not rows:
        raise ConfigError(f"{path}: no records to plot")
    return rows


def plot_run(run_dir: str, out_dir: str) -> list[str]:
    """Charts of one training run: its metrics.jsonl (and summary.json, if finished)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir}: no metrics.jsonl (is it a run directory of `train`?)")
    rows = _read_jsonl(path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary_path):  # runs from before the final evaluation went to metrics.jsonl too
        with open(summary_path) as fh:
            final = json.load(fh)
        if final.get("eval_accuracy") is not None and not any(r["step"] == final["steps"] for r in evals):
            evals.append({"step": final["steps"], "eval_accuracy": final["eval_accuracy"]})
    plt = _pyplot()
    written: list[str] = []
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    steps = [r["step"] for r in train]
    axes[0, 0].plot(steps, [r["loss"] for r in train])
    axes[0, 0].set(title="training loss (all ranks)", xlabel="step", yscale="log")
    if evals:
        axes[0, 1].plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], marker="o")
    axes[0, 1].set(title="held-out accuracy", xlabel="step", ylim=(0, 1.02))
    axes[1, 0].plot(steps, [r.get("lr", float("nan")) for r in train])
    axes[1, 0].set(title="learning rate", xlabel="step")
    axes[1, 1].plot(steps, [r.get("images_per_s", float("nan")) for r in train])
    axes[1, 1].set(title="images/s (global)", xlabel="step", ylim=(0, None))
    _save(plt, fig, out_dir, "training.png", written)

    fig, ax = plt.subplots(figsize=(10, 4))
    _stacked_phases(ax, steps, train,
                    width=max(1, (steps[-1] - steps[0]) / max(1, len(steps)) * 0.8) if len(steps) > 1 else 0.8)
    ax.set(title="where each step's time goes (ms per step, rank 0, mean of each log window)", xlabel="step",
           ylabel="ms")
    ax.legend(loc="upper right", ncols=len(PHASES))
    _save(plt, fig, out_dir, "phases.png", written)
    ranked = [r for r in train if "rank_busy_ms" in r]
    if ranked:  # the straggler view: each rank's own time per step (data + forward + backward + optimizer)
        fig, ax = plt.subplots(figsize=(10, 4))
        ranks = max(len(r["rank_busy_ms"]) for r in ranked)  # a resumed run may have another world size
        for rank in range(ranks):
            mine = [r for r in ranked if rank < len(r["rank_busy_ms"])]
            ax.plot([r["step"] for r in mine], [r["rank_busy_ms"][rank] for r in mine], label=f"rank {rank}")
        ax.set(title="each rank's busy time per step (ms; waiting for other ranks excluded)", xlabel="step",
               ylabel="ms", ylim=(0, None))
        ax.legend(loc="upper right", ncols=min(8, ranks))
        _save(plt, fig, out_dir, "ranks.png", written)
    return written


def plot_bench(path: str, out_dir: str) -> list[str]:
    """Charts of a bench file: images/s against world size, and stacked phase bars."""
    rows = _read_jsonl(path)
    if not all("mode" in r and "world_size" in r for r in rows):
        raise ConfigError(f"{path}: not a `distributed-step bench --json` file")
    plt = _pyplot()
    stem = os.path.splitext(os.path.basename(path))[0]
    written: list[str] = []

    series = defaultdict(list)
    for r in rows:
        series[(r["variant"], r["mode"])].append((r["world_size"], r["images_per_s"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for (variant, mode), points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                linestyle="-" if mode == "sync" else "--",
                label=f"{variant} ({'all-reduce' if mode == 'sync' else 'no sync: bound'})")
    ax.set(title="training images/s by world size", xlabel="ranks", ylabel="images/s", ylim=(0, None))
    ax.set_xticks(sorted({r["world_size"] for r in rows}))
    ax.legend(fontsize="small")
    _save(plt, fig, out_dir, f"{stem}-throughput.png", written)

    labels = [f"{r['world_size']}r {r['variant']}\n{r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 5))
    _stacked_phases(ax, list(range(len(rows))), rows)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize="x-small")
    ax.set(title="step time by phase (ms, mean over ranks)", ylabel="ms per step")
    ax.legend()
    _save(plt, fig, out_dir, f"{stem}-phases.png", written)
    return written


def read_plan(path: str) -> list[dict] | None:
    """The rows of a `distributed-step plan --json` file; None for any other file."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    rows = record.get("rows") if isinstance(record, dict) else None
    return rows if isinstance(rows, list) and all("efficiency_band" in r for r in rows) else None


def plot_plan(path: str, rows: list[dict], out_dir: str) -> list[str]:
    """Scaling efficiency against devices, one line and band per system (log-scale devices)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["ranks"])
        x = [r["ranks"] for r in mine]
        line, = ax.plot(x, [100 * r["efficiency"] for r in mine], marker="o", label=system)
        ax.fill_between(x, [100 * r["efficiency_band"][0] for r in mine],
                        [100 * r["efficiency_band"][1] for r in mine], color=line.get_color(), alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set(title="planned scaling efficiency (band: optimistic to pessimistic inputs)", xlabel="devices",
           ylabel="% of one device's speed", ylim=(0, 105))
    ax.legend(fontsize="small")
    written: list[str] = []
    _save(plt, fig, out_dir, f"{os.path.splitext(os.path.basename(path))[0]}-efficiency.png", written)
    return written


def main(argv: list[str]) -> int:
    parser = OneLineErrorParser(prog="distributed-step plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run directories, bench JSON-lines files, plan files")
    parser.add_argument("--out", default="", help="folder for the PNGs (default: RUN_DIR/plots, or beside the "
                        "bench file)")
    args = parser.parse_args(argv)
    for path in args.paths:
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such run directory or bench file")
        out_dir = args.out or (os.path.join(path, "plots") if os.path.isdir(path) else os.path.dirname(path) or ".")
        os.makedirs(out_dir, exist_ok=True)
        plan = None if os.path.isdir(path) else read_plan(path)
        if plan is not None:
            written = plot_plan(path, plan, out_dir)
        else:
            written = plot_run(path, out_dir) if os.path.isdir(path) else plot_bench(path, out_dir)
        for target in written:
            print(target)
    return 0
