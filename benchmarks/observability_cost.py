"""What observability adds to `train`, measured piece by piece on the reference setup (2 ranks, gloo):
the per-rank gather and straggler check, the TensorBoard write (both once per log point), and the
hang timer's re-arming (at most once per 1.9-5 s; timed here as if every step re-armed).

    .venv/bin/torchrun --standalone --nproc_per_node=2 benchmarks/observability_cost.py
"""
import os
import tempfile
import time

import torch

from distributed_step.observe.evidence import HangWatch
from distributed_step.observe.stragglers import StragglerWatch
from distributed_step.observe.tensorboard import Scalars
from distributed_step.parallel.process_group import detect, setup, teardown


def per_call_ms(fn, calls: int) -> float:
    fn()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e3 * (time.perf_counter() - began) / calls


def main() -> None:
    env = setup(detect(torch.device("cpu")), "gloo", 60, "")
    out = tempfile.mkdtemp(prefix=f"obs{env.rank}")
    phases = {"data_ms": 2.0, "forward_ms": 150.0, "backward_ms": 300.0, "comm_ms": 20.0, "optimizer_ms": 15.0}
    record = {"step": 1, "epoch": 0.1, "loss": 2.3, "lr": 0.05, "images_per_s": 120.0, "step_ms": 500.0, **phases}
    watch = StragglerWatch(env)
    gather = per_call_ms(lambda: watch.window(10, phases), 200)
    scalars = Scalars(out, True, 0)
    steps = iter(range(10**9))
    write = per_call_ms(lambda: scalars.write({**record, "step": next(steps)}), 200)
    hang = HangWatch(out, 300)
    beat = per_call_ms(lambda: hang.beat(force=True), 1000)
    hang.close()
    scalars.close()
    if env.rank == 0:
        print(f"straggler gather + check: {gather:.3f} ms per log point")
        print(f"TensorBoard write (rank 0): {write:.3f} ms per log point")
        print(f"hang timer re-arm: {beat:.4f} ms per re-arm")
    teardown(env)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
