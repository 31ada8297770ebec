#!/usr/bin/env bash
# The same 2-rank run under torchrun and under `ray job submit`, interleaved: wall time of the
# whole command (start-up included) and steady-state images/s from summary.json.
# 2 ranks, gloo, ResNet-18, synthetic 64 px, global batch 64, fp32, 30 steps.
#   bash benchmarks/ray_vs_torchrun.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
bin=$PWD/.venv/bin
work=$(mktemp -d /tmp/raybench.XXXX)
# Token authentication on, as on any cluster: a job server without it runs anyone's code.
python -c "import secrets; print(secrets.token_hex(32))" > "$work/token"
export PATH=$bin:$PATH RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$work/token RAY_USAGE_STATS_ENABLED=0
flags="--data synthetic --image-size 64 --global-batch-size 64 --steps 30 --checkpoint-every 0 --log-every 10"
ray start --head --num-cpus 4 --temp-dir "$work/ray" --dashboard-port 8299 --disable-usage-stats >/dev/null
trap 'ray stop --force >/dev/null 2>&1; rm -rf "$work"' EXIT
ips() { python -c "import json,sys; print(round(json.load(open(sys.argv[1]))['images_per_s'], 1))" "$1/summary.json"; }
for i in $(seq "$rounds"); do
  t0=$(date +%s.%N)
  torchrun --standalone --nproc_per_node=2 -m distributed_step train $flags --out "$work/t$i" >/dev/null 2>&1
  t1=$(date +%s.%N)
  ray job submit --address http://127.0.0.1:8299 --working-dir . -- \
      python -m distributed_step ray --num-workers 2 $flags --out "$work/r$i" >/dev/null 2>&1
  t2=$(date +%s.%N)
  printf 'round %d  torchrun %.1f s %s img/s   ray job submit %.1f s %s img/s\n' "$i" \
      "$(python -c "print($t1 - $t0)")" "$(ips "$work/t$i")" "$(python -c "print($t2 - $t1)")" "$(ips "$work/r$i")"
done
