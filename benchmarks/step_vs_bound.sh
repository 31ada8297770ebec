#!/usr/bin/env bash
# The figures of docs/benchmarks.md ("How fast is the step, and where do its milliseconds go?"
# and the knob tables): each command runs one `bench` whose variants and modes are interleaved
# in the same processes. JSON lines go to docs/bench/, charts to docs/img/.
#   bash benchmarks/step_vs_bound.sh [STEPS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5} rounds=${2:-3}
py=.venv/bin/python
mkdir -p docs/bench docs/img
bench() { local name=$1; shift; rm -f "docs/bench/$name.jsonl"
  echo "== $name: bench $*"; $py -m distributed_step bench --steps "$steps" --rounds "$rounds" --warmup 2 \
      --json "docs/bench/$name.jsonl" "$@"; }
# Reference configuration: 2 ranks, ResNet-18, synthetic 64 px, global batch 64, fp32.
# The headline: the defaults against 25 MB buckets and the tutorial, alternating every 3 steps.
rm -f docs/bench/reference.jsonl
$py -m distributed_step bench --world-sizes 2 --steps 3 --rounds 10 --warmup 2 --sweep bucket_cap_mb=10,25 \
    --compare-tutorial --json docs/bench/reference.jsonl
bench knobs --world-sizes 2 --sweep bucket_view=false,true --sweep static_graph=false,true --compare-tutorial
bench buckets --world-sizes 2 --sweep bucket_cap_mb=2,5,10,25,50
bench threads --world-sizes 2 --sweep threads=1,2
bench pinning --world-sizes 2 --sweep pin_cores=false,true --compare-tutorial
bench hooks --world-sizes 2 --sweep comm_hook=none,bf16,fp16,powersgd
bench kernels --world-sizes 2 --sweep channels_last=false,true --sweep precision=fp32,bf16
bench compile --world-sizes 2 --sweep compile=false,true
bench scaling --world-sizes 1,2,4 --compare-tutorial
bench batch --world-sizes 2 --sweep batch_per_rank=8,16,32,64,128
$py -m distributed_step plot docs/bench/knobs.jsonl docs/bench/hooks.jsonl docs/bench/batch.jsonl docs/bench/scaling.jsonl --out docs/img
