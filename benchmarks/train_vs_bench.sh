#!/usr/bin/env bash
# `train` against `bench` on the same step, interleaved (bench, train, bench, train, ...): how
# much of the step's own speed the whole loop keeps (input, flags, logging). Reference config:
# 2 ranks, gloo, synthetic 64 px, global batch 64, fp32. Target (issue 11): train >= 0.97x bench.
#   bash benchmarks/train_vs_bench.sh [ROUNDS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} steps=${2:-30}
bin=.venv/bin
out=$(mktemp -d)
for i in $(seq "$rounds"); do
  $bin/torchrun --standalone --nproc_per_node=2 -m distributed_step bench --image-size 64 --global-batch-size 64 \
      --steps "$steps" --rounds 1 --warmup 3 --json "$out/bench$i.jsonl" >/dev/null 2>&1
  $bin/torchrun --standalone --nproc_per_node=2 -m distributed_step train --data synthetic --image-size 64 \
      --global-batch-size 64 --steps $((steps + 3)) --checkpoint-every 0 --log-every 10 --out "$out/r$i" \
      >"$out/train$i.log" 2>&1
  $bin/python - "$out/bench$i.jsonl" "$out/r$i" "$i" <<'PY'
import json, sys
bench = [json.loads(line) for line in open(sys.argv[1])]
sync = next(r for r in bench if r["mode"] == "sync")["images_per_s"]
run = json.load(open(sys.argv[2] + "/summary.json"))["images_per_s"]
data = [json.loads(line).get("data_ms") for line in open(sys.argv[2] + "/metrics.jsonl")]
data = [d for d in data if d is not None]
print(f"round {sys.argv[3]}  bench {sync:.1f} img/s  train {run:.1f} img/s  train/bench {run / sync:.3f}  "
      f"data_ms {sum(data) / len(data):.2f}")
PY
done
rm -rf "$out"
