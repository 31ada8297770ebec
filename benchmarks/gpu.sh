#!/usr/bin/env bash
# Every GPU check in one call, sized for at most ~5 minutes on one H200-class card:
#   1. the GPU tests (pytest -m gpu: 2 ranks sharing the GPU = 1 rank, --deterministic repeats
#      bit for bit, fp16 trains the digits, channels_last + compile + bf16 trains; NCCL SyncBN
#      with 2+ GPUs);
#   2. the step's table (`bench`, 224 px synthetic, fp32/bf16 x contiguous/channels_last, then
#      compile off/on on bf16 channels_last), one rank per GPU;
#   3. the input path: `train --data synthetic` on the same step against bench's img/s, and
#      cudnn.benchmark (the default) against --deterministic;
#   4. the loader alone (`bench --input`), and `train` on 500x375 JPEGs with --decode workers
#      and --decode device.
# Results go to ${OUT:-/tmp/gpu}: summary.txt (what ran, what could not, the figures),
# gpu-bench.jsonl, the run directories. It runs from the checkout with the image's own torch
# (PYTHONPATH=., no install), so it needs only torch, torchvision, PyYAML and scikit-learn;
# pytest for part 1. Compare bench's `tflops` with the card's peak (H200 SXM: 989 dense bf16).
#   bash benchmarks/gpu.sh [BATCH_PER_RANK]
#   bash benchmarks/gpu.sh --cpu-smoke     # the same script, tiny, on CPU: checks the script
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
out=${OUT:-/tmp/gpu}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
note() { echo "$*" | tee -a "$out/summary.txt"; }
: > "$out/summary.txt"

if [ "${1:-}" = "--cpu-smoke" ]; then
  gpus=1 size=(--image-size 32) batch=2 steps=(--steps 1 --rounds 1 --warmup 1) train_steps=8
  export DS_GPU_TESTS_ON_CPU=1  # the GPU tests' own code, on CPU tensors (the quick ones)
  tests=(-k "sharing or deterministic or device_reaches")
else
  gpus=$($py -c "import torch; print(torch.cuda.device_count())")
  [ "$gpus" -ge 1 ] || { note "no CUDA device visible: nothing to measure"; exit 1; }
  size=(--image-size 224) batch=${1:-256} steps=(--steps 10 --rounds 2 --warmup 5) train_steps=60
  tests=()
fi
note "$($py -c "import torch, torchvision, platform; d = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}, {d}, {torch.cuda.device_count()} GPU(s)')")"
[ "$gpus" -ge 2 ] || note "not run: NCCL across GPUs (needs 2+ GPUs; NCCL refuses 2 ranks on one GPU)"
note "not run here: several nodes (NCCL over a network): docs/benchmarks.md says how to check it"

# 1. GPU tests
if $py -c "import pytest" 2>/dev/null; then
  timeout 240 $py -m pytest -q -rs -m gpu tests/integration/test_gpu.py "${tests[@]}" -p no:cacheprovider \
    2>&1 | tee "$out/gpu-tests.txt" | tail -8
  note "gpu tests: $(tail -1 "$out/gpu-tests.txt")"
else
  note "not run: the GPU tests (pytest is not installed in this image)"
fi

# 2. the step's table
run_bench() {
  if [ "$gpus" -eq 1 ]; then $py -m distributed_step bench "$@"
  else $py -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m distributed_step bench "$@"; fi
}
common=("${size[@]}" --batch-per-rank "$batch" "${steps[@]}" --json "$out/gpu-bench.jsonl")
run_bench "${common[@]}" --sweep precision=fp32,bf16 --sweep channels_last=false,true | tee "$out/bench.txt"
# Compilation takes a minute per variant: measured on the fastest eager setting only.
run_bench "${common[@]}" --precision bf16 --channels-last --sweep compile=false,true | tee -a "$out/bench.txt"

# 3. train on the same step: the input path, and cudnn.benchmark against --deterministic
train() {  # NAME FLAGS...: one run on every GPU; prints its img/s (global, after 3 steps)
  local name=$1; shift
  $py -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m distributed_step train --data synthetic \
    "${size[@]}" --global-batch-size $((batch * gpus)) --precision bf16 --channels-last --steps "$train_steps" \
    --log-every 10 --checkpoint-every 0 --resume never --out "$out/$name" "$@" > "$out/$name.log" 2>&1 \
    && $py -c "import json; print(round(json.load(open('$out/$name/summary.json'))['images_per_s'] or 0))" \
    || echo "failed (see $out/$name.log)"
}
bench_ips=$($py -c "import json
rows = [json.loads(line) for line in open('$out/gpu-bench.jsonl')]
same = [r for r in rows if r['mode'] == 'sync' and r['config']['precision'] == 'bf16'
        and r['config']['channels_last'] and not r['config']['compile']]
print(round(same[-1]['images_per_s']) if same else 0)")
train_ips=$(train train-default)
note "bench, bf16 channels_last, eager, sync: $bench_ips img/s"
note "train --data synthetic, same step: $train_ips img/s ($($py -c "print(f'{$train_ips / max($bench_ips, 1):.2f}')" 2>/dev/null || echo '?')x bench)"
note "the same, --deterministic (cudnn.benchmark off, no TF32): $(train train-deterministic --deterministic) img/s"
note "data wait in that run (mean data_ms over its log windows): $($py -c "import json
rows = [json.loads(l) for l in open('$out/train-default/metrics.jsonl')]
d = [r['data_ms'] for r in rows if 'data_ms' in r]; print(round(sum(d) / max(len(d), 1), 2))" 2>/dev/null || echo '?') ms"

# 4. the input path alone (no model), and an ImageFolder of JPEGs through train, decoded in the
# loader workers (libjpeg-turbo) and on the GPU (--decode device: batched nvjpeg)
if [ "${1:-}" = "--cpu-smoke" ]; then jpegs=40 counts=0,1 batches=3; else jpegs=3000 counts=4,8,12 batches=30; fi
$py -m distributed_step bench --input --data synthetic "${size[@]}" --worker-counts "$counts" \
  --batches "$batches" --baseline | tee "$out/input.txt"
$py -m distributed_step bench --input --make-jpegs "$out/jpegs" --jpegs "$jpegs" --data "imagefolder:$out/jpegs" \
  "${size[@]}" --worker-counts "$counts" --batches "$batches" --baseline | tee -a "$out/input.txt"
for decode in workers device; do
  jpeg_ips=$(train "train-jpeg-$decode" --data "imagefolder:$out/jpegs" --workers "${counts##*,}" --decode "$decode")
  note "train --data imagefolder (500x375 JPEGs) --decode $decode, same step: $jpeg_ips img/s ($($py -c "print(f'{$jpeg_ips / max($bench_ips, 1):.2f}')" 2>/dev/null || echo '?')x bench)"
done
