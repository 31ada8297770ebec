"""Where PowerSGD's time goes on CPU: 2 ranks on this host (gloo), ResNet-18 at 64 px, 32 images
per rank, 1 thread each; per variant the median step, backward and the time inside the hook.

    .venv/bin/python benchmarks/powersgd_cost.py [STEPS]      # BUCKET_MB=10 STATIC_GRAPH=1: train's

Variants, interleaved round by round: exact; PowerSGD as `--comm-hook powersgd` registers it
(per tensor, each bucket finished before backward goes on); the same with rank 1; and with
same-shape tensors compressed in one batched matmul. (torch's batched_powerSGD_hook, the whole
bucket as one matrix, fails its own shape assertion in _orthogonalize on torch 2.14.1.)
Inside the per-tensor hook: the time in its own call (compress P = MQ, start the first
all-reduce), the time waiting for its future (the all-reduces, orthogonalisation, Q = M^T P,
decompression), and of that the orthogonalisation.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distributed_step.model import build_model

TIMES: dict[str, float] = {"call": 0.0, "wait": 0.0, "orthogonalize": 0.0}


def timed_orthogonalize(original):
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES["orthogonalize"] += time.perf_counter() - began
    return wrapper


def ordered(hook):
    def run(state, bucket):
        began = time.perf_counter()
        future = hook(state, bucket)
        called = time.perf_counter()
        future.wait()
        TIMES["call"] += called - began
        TIMES["wait"] += time.perf_counter() - called
        return future
    return run


def variant(name: str, net: nn.Module) -> DDP:
    model = DDP(net, bucket_cap_mb=float(os.environ.get("BUCKET_MB", "25")), gradient_as_bucket_view=True,
                static_graph=os.environ.get("STATIC_GRAPH") == "1")
    if name != "exact":
        state = powerSGD_hook.PowerSGDState(None, matrix_approximation_rank=1 if name == "powersgd-r1" else 4,
                                            start_powerSGD_iter=2, min_compression_rate=2, warm_start=True,
                                            batch_tensors_with_same_shape=name == "same-shape")
        model.register_comm_hook(state, ordered(powerSGD_hook.powerSGD_hook))
    return model


def rank_main(rank: int, steps: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    powerSGD_hook._orthogonalize = timed_orthogonalize(powerSGD_hook._orthogonalize)
    names = ["exact", "powersgd", "powersgd-r1", "same-shape"]
    models = {n: variant(n, build_model(10)) for n in names}
    gen = torch.Generator().manual_seed(rank)
    images, labels = torch.randn(32, 3, 64, 64, generator=gen), torch.randint(10, (32,), generator=gen)
    rows = {n: [] for n in names}
    for round_ in range(steps + 3):
        for name in names[round_ % 4:] + names[:round_ % 4]:
            model = models[name]
            TIMES.update(call=0.0, wait=0.0, orthogonalize=0.0)
            dist.barrier()
            began = time.perf_counter()
            loss = nn.functional.cross_entropy(model(images), labels)
            forward = time.perf_counter()
            loss.backward()
            done = time.perf_counter()
            if round_ >= 3:  # past PowerSGD's exact warm-up iterations
                rows[name].append({"step": done - began, "backward": done - forward, **TIMES})
            model.zero_grad(set_to_none=True)
    if rank == 0:
        print(f"{'variant':<12} {'fwd+bwd ms':>10} {'backward':>9} {'hook call':>9} {'hook wait':>9} {'orthog.':>8}")
        for name, rs in rows.items():
            med = {k: 1e3 * statistics.median(r[k] for r in rs) for k in rs[0]}
            print(f"{name:<12} {med['step']:>10.1f} {med['backward']:>9.1f} {med['call']:>9.1f} "
                  f"{med['wait']:>9.1f} {med['orthogonalize']:>8.1f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.start_processes(rank_main, args=(int(sys.argv[1]) if len(sys.argv) > 1 else 8, free), nprocs=2,
                       start_method="spawn")
