"""The planner against published scaling runs: the table of docs/planning.md.

    python benchmarks/plan_published.py

Each run of distributed_step/planner/published.py, its published efficiency beside the model's,
with the model's band, and the bucket-size check (1 MB against 25 MB buckets).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_step.planner.published import table


def main() -> int:
    rows = table()
    print("| run | published | model | band | off by |")
    print("|---|---|---|---|---|")
    for r in rows[:-1]:
        low, high = r["band"]
        band = f"{100 * low:.0f}-{100 * high:.0f}%"
        print(f"| {r['run']} | {100 * r['published']:.1f}% | {100 * r['model']:.1f}% | {band} "
              f"| {100 * (r['model'] - r['published']):+.1f} points |")
    last = rows[-1]
    print(f"| {last['run']} (step time) | {100 * last['published']:+.1f}% | {100 * last['model']:+.1f}% | | "
          f"{'sign right' if (last['model'] < 0) == (last['published'] < 0) else 'sign wrong'} |")
    print(f"\nFitted interference (NCCL on GPUs): {last['interference']:.3f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
