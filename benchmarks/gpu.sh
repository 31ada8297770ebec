#!/usr/bin/env bash
# The step on GPUs: nccl, 224 px synthetic ImageNet-sized images, fp32 vs bf16, channels_last
# and torch.compile on and off, one rank per GPU. Prints the table and writes JSON lines to
# ${OUT:-/tmp}/gpu-bench.jsonl; compare the `tflops` column with the card's peak (H200 SXM:
# 989 TFLOP/s dense bf16, 67 TFLOP/s fp32 without tensor cores, 494 TFLOP/s tf32).
#   bash benchmarks/gpu.sh [BATCH_PER_RANK]
#   bash benchmarks/gpu.sh --cpu-smoke     # the same variants, tiny, on CPU: checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
out=${OUT:-/tmp}/gpu-bench.jsonl
if [ "${1:-}" = "--cpu-smoke" ]; then
  gpus=1 size=(--image-size 32 --batch-per-rank 2 --steps 1 --rounds 1 --warmup 1)
else
  gpus=$($py -c "import torch; print(torch.cuda.device_count())")
  [ "$gpus" -ge 1 ] || { echo "no CUDA device visible" >&2; exit 1; }
  $py -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPU(s)')"
  size=(--image-size 224 --batch-per-rank "${1:-256}" --steps 10 --rounds 2 --warmup 5)
fi
args=("${size[@]}" --sweep precision=fp32,bf16 --sweep channels_last=false,true --json "$out")
# Compilation takes a minute per variant: measured separately, on the fastest eager setting.
compiled=("${size[@]}" --precision bf16 --channels-last --sweep compile=false,true --json "$out")
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
if [ "$gpus" -eq 1 ]; then
  $py -m distributed_step bench "${args[@]}"
  $py -m distributed_step bench "${compiled[@]}"
else
  $py -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m distributed_step bench "${args[@]}"
  $py -m torch.distributed.run --standalone --nproc_per_node="$gpus" -m distributed_step bench "${compiled[@]}"
fi
