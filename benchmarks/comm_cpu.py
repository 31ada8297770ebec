"""What one all-reduce of ResNet-18's gradients costs in CPU time, by transport and precision.

    torchrun --standalone --nproc_per_node=2 benchmarks/comm_cpu.py [ROUNDS]

On a CPU job every cycle spent communicating is taken from backward on the same cores, so the
figure that matters is CPU time per rank, not wall time. Each rank is pinned to its own core
(as `train` does) and runs one compute thread. Rows: gloo all-reduce in fp32, bf16 and fp16
(four ~11 MB buckets in flight, as DDP sends them); the casts a compression hook adds, with a
fresh buffer every step (torch's hooks) and with buffers reused across steps;
and a shared-memory all-reduce prototype (each rank copies in, sums its slice, copies out).
Medians over ROUNDS rounds (default 7) of 5 calls; rank 0 prints milliseconds per 44.7 MB.
"""
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torchvision

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
cores = sorted(os.sched_getaffinity(0))
for tid in os.listdir("/proc/self/task"):
    os.sched_setaffinity(int(tid), {cores[rank % len(cores)]})
numel = sum(p.numel() for p in torchvision.models.resnet18(num_classes=10).parameters())
grads = [torch.randn(numel // 4) for _ in range(4)]
half = {dt: [g.to(dt) for g in grads] for dt in (torch.bfloat16, torch.float16)}
reused = [torch.empty(g.numel(), dtype=torch.bfloat16) for g in grads]

# Shared memory: one slot per rank, then the sum; per-rank arrival counters (x86 store order).
path = f"/dev/shm/comm_cpu-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
if rank == 0:
    with open(path, "wb") as fh:
        fh.truncate(4 * (world + 1) * numel + 64 * world)
dist.barrier()
raw = torch.from_file(path, shared=True, size=(world + 1) * numel + 16 * world, dtype=torch.float32)
dist.barrier()
if rank == 0:
    os.unlink(path)
slots, summed = raw[:world * numel].view(world, numel), raw[world * numel:(world + 1) * numel]
arrived = raw[(world + 1) * numel:].view(torch.int64)[::8]
calls = [0]


def arrive(number):
    arrived[rank] = number
    while int(arrived.min()) < number:
        time.sleep(2e-5)


def shm_all_reduce(g):
    calls[0] += 1
    n = g.numel()
    slots[rank, :n].copy_(g)
    arrive(2 * calls[0] - 1)
    lo, hi = rank * n // world, (rank + 1) * n // world
    torch.sum(slots[:, lo:hi], 0, out=summed[lo:hi])
    summed[lo:hi].div_(world)
    arrive(2 * calls[0])
    g.copy_(summed[:n])


def gloo(tensors):
    for work in [dist.all_reduce(t, async_op=True) for t in tensors]:
        work.wait()


def casts_fresh():  # torch's bf16_compress_hook: .to() allocates every step
    for g in grads:
        packed = g.to(torch.bfloat16).div_(world)
        g.copy_(packed)


def casts_reused():
    for g, packed in zip(grads, reused):
        packed.copy_(g)
        packed.div_(world)
        g.copy_(packed)


rows = {"gloo all-reduce fp32": lambda: gloo(grads),
        "gloo all-reduce bf16": lambda: gloo(half[torch.bfloat16]),
        "gloo all-reduce fp16": lambda: gloo(half[torch.float16]),
        "bf16 casts, fresh buffers (torch's hook)": casts_fresh,
        "bf16 casts, reused buffers": casts_reused,
        "shared-memory all-reduce fp32 (prototype)": lambda: [shm_all_reduce(g) for g in grads]}
taken = {name: [] for name in rows}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 7):
    for name, fn in rows.items():  # interleaved, so drift hits every row alike
        fn()
        dist.barrier()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(5):
            fn()
        taken[name].append(((time.process_time() - cpu) / 5 * 1e3, (time.perf_counter() - wall) / 5 * 1e3))
        dist.barrier()
if rank == 0:
    print(f"{world} ranks, {numel * 4 / 1e6:.1f} MB of fp32 gradients; ms per all-reduce, median")
    print(f"{'':44s} {'CPU':>7s} {'wall':>7s}")
    for name, got in taken.items():
        print(f"{name:44s} {statistics.median(c for c, _ in got):7.1f} {statistics.median(w for _, w in got):7.1f}")
dist.destroy_process_group()
