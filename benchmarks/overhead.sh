#!/usr/bin/env bash
# Our training loop against the plain tutorial loop, interleaved (A B A B ...) so that machine
# noise hits both alike. 2 ranks, gloo, ResNet-18, synthetic 64 px, global batch 64, fp32.
#   bash benchmarks/overhead.sh [ROUNDS] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} steps=${2:-30}
bin=.venv/bin
out=$(mktemp -d)
export
for i in $(seq "$rounds"); do
  tut=$($bin/torchrun --standalone --nproc_per_node=2 benchmarks/tutorial_loop.py --steps "$steps" 2>/dev/null | tail -1)
  $bin/torchrun --standalone --nproc_per_node=2 -m distributed_step train --data synthetic --image-size 64 \
      --global-batch-size 64 --steps "$steps" --checkpoint-every 0 --log-every 10 --out "$out/r$i" >/dev/null 2>&1
  ours=$($bin/python -c "import json; print(json.load(open('$out/r$i/summary.json'))['images_per_s'])")
  echo "round $i  tutorial $(echo "$tut" | $bin/python -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_s"],1))') img/s  distributed_step $(printf %.1f "$ours") img/s"
done
rm -rf "$out"
