"""The step over real-world links: hosts as network namespaces (testing/netlab.py), one
rank per host, every link shaped by tc to a rate; `bench` sweeps the comm hooks on each link.

    .venv/bin/python benchmarks/slow_links.py                        # 2 hosts; 1gbit, 10gbit, unshaped
    .venv/bin/python benchmarks/slow_links.py --hosts 2 --rates 1gbit --hooks none,bf16 --steps 3

Prints one row per (link, hook) and appends the bench records, with the link's measured TCP rate
and the wire-time floor, to --json (default docs/bench/slow_links.jsonl). The floor: a ring
all-reduce sends 2(N-1)/N x the gradient bytes per rank, at the link's rate; the best a step can
do is max(compute-only step, that wire time). Needs root (network namespaces).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from testing.netlab import Network, rate_bits

SPEED_PROBE = """
import socket, sys, time
if sys.argv[1] == "serve":
    conn, _ = socket.create_server((sys.argv[2], 5201)).accept()
    n, began = 0, time.perf_counter()
    while chunk := conn.recv(1 << 20):
        n += len(chunk)
    print(n * 8 / (time.perf_counter() - began) / 1e9)
else:
    time.sleep(1.0)
    conn, block, began = socket.create_connection((sys.argv[2], 5201)), bytes(1 << 20), time.perf_counter()
    while time.perf_counter() - began < float(sys.argv[3]):
        conn.sendall(block)
"""


def link_gbit(net: Network, seconds: float = 2.0) -> float:
    """One TCP stream from host 0 to host 1, in Gbit/s: what the shaped link really carries."""
    server = net.popen(1, [sys.executable, "-c", SPEED_PROBE, "serve", net.addrs[1]])
    client = net.popen(0, [sys.executable, "-c", SPEED_PROBE, "send", net.addrs[1], str(seconds)])
    return float(net.wait([server, client], timeout=seconds + 30)[0].strip())


def wire_bytes(hook: str, powersgd_rank: int) -> float:
    """Bytes one rank's gradient puts into the all-reduce under `hook` (compressed where it is)."""
    from distributed_step.model import build_model

    params = [p for p in build_model(10).parameters()]
    if hook in ("bf16", "fp16"):
        return sum(p.numel() * 2 for p in params)
    if hook == "powersgd":  # rank-r factors P (n x r) and Q (m x r) where that compresses 2x or more
        total = 0.0
        for p in params:
            n, m = p.shape[0], p.numel() // p.shape[0]
            low = (n + m) * powersgd_rank
            total += 4 * (low if p.dim() > 1 and n * m >= 2 * low else p.numel())
        return total
    return sum(p.numel() * 4 for p in params)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--rates", default="1gbit,10gbit,none", help="tc rates; none: unshaped")
    parser.add_argument("--hooks", default="none,bf16,powersgd,auto")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "docs" / "bench" / "slow_links.jsonl"))
    parser.add_argument("bench_flags", nargs="*", help="after --: more bench flags")
    args = parser.parse_args()
    bench = ["-m", "distributed_step", "bench", "--sweep", f"comm_hook={args.hooks}", "--image-size", "64",
             "--batch-per-rank", "32", "--threads", "1", "--no-pin-cores", "--steps", str(args.steps),
             "--rounds", str(args.rounds), "--warmup", "2", *args.bench_flags]
    rows = []
    for rate in args.rates.split(","):
        shaped = None if rate == "none" else rate
        with Network(args.hosts, rate=shaped) as net, tempfile.TemporaryDirectory() as tmp:
            measured = link_gbit(net)
            out = Path(tmp) / "records.jsonl"
            procs = net.torchrun(1, [*bench, "--json", str(out)], run_id=f"slow-{rate}",
                                 env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
            outputs = net.wait(procs, timeout=3600)
            if any(p.returncode for p in procs):
                print("\n".join(o[-3000:] for o in outputs), file=sys.stderr)
                return 1
            records = [json.loads(line) for line in out.read_text().splitlines()]
        link_bits = rate_bits(shaped) if shaped else measured * 1e9
        for r in records:
            r.update(link=rate, link_measured_gbit=round(measured, 3), hosts=args.hosts)
            n = r["world_size"]
            hook = r.get("comm_hook_chosen", r["config"]["comm_hook"])
            sent = 2 * (n - 1) / n * wire_bytes(hook, r["config"]["powersgd_rank"])
            r["wire_ms"] = round(sent * 8 / link_bits * 1e3, 1)
        nosync = {r["variant"]: r for r in records if r["mode"] == "nosync"}
        for r in records:
            if r["mode"] == "sync":
                bound = max(nosync[r["variant"]]["step_ms"], r["wire_ms"])
                r["vs_floor"] = round(r["step_ms"] / bound, 3)
                rows.append(r)
        with open(args.json, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    print(f"{'link':<8} {'measured':>9} {'hook':<22} {'step ms':>8} {'comm':>6} {'x bound':>7} {'median':>7} "
          f"{'wire ms':>8} {'x max(compute, wire)':>20}")
    for r in rows:
        print(f"{r['link']:<8} {r['link_measured_gbit']:>8.2f}G {r['variant']:<22} {r['step_ms']:>8.1f} "
              f"{r['comm_ms']:>6.1f} {r['vs_bound']:>7.3f} {r['vs_bound_median']:>7.3f} {r['wire_ms']:>8.1f} "
              f"{r['vs_floor']:>20.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
