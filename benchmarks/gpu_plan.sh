#!/usr/bin/env bash
# The planner's inputs on a GPU, in one call (about 4 minutes on one H200, the GPU tests last):
#   1. `calibrate` of the project's ResNet-18 at 224 px, 256 images, bf16 channels_last and fp32:
#      the step phase by phase and each gradient's arrival, for `plan --calibration`;
#   2. benchmarks/step_shapes.py --measure: the published runs' models at their batches, and
#      DDP's own cost per bucket on a one-rank group (what planner/published.py assumes);
#   3. the GPU tests (pytest -m gpu), capped at 4 minutes.
# Results in ${OUT:-/tmp/gpu-plan}: cal-bf16.json, cal-fp32.json, shapes.json, gpu-plan.log.
# Runs from the checkout with the image's own torch (PYTHONPATH=., no install).
#   bash benchmarks/gpu_plan.sh                # on the GPU machine
#   bash benchmarks/gpu_plan.sh --cpu-smoke    # the same script, tiny, on CPU: checks the script
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
out=${OUT:-/tmp/gpu-plan}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
smoke=() size=224 batch=256
if [ "${1:-}" = "--cpu-smoke" ]; then smoke=(--cpu-smoke) size=32 batch=4; fi
{
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: on CPU"
  $py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  for precision in bf16 fp32; do
    layout=$([ "$precision" = bf16 ] && echo --channels-last || echo --no-channels-last)
    $py -m distributed_step calibrate --out "$out/cal-$precision.json" --image-size "$size" \
      --global-batch-size "$batch" --precision "$precision" "$layout"
  done
  $py benchmarks/step_shapes.py --measure "$out/shapes.json" "${smoke[@]}"
  if [ ${#smoke[@]} -eq 0 ]; then
    timeout 240 $py -m pytest -q -rs -m gpu tests/integration/test_gpu.py -p no:cacheprovider
  fi
} 2>&1 | tee "$out/gpu-plan.log"
