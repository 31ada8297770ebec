"""What recovery costs a step in steady state, and what a periodic save costs it, measured
side by side in one run (these machines are noisy).

    python benchmarks/recovery_cost.py [--image-size 64] [--batch 16] [--rounds 12]

Two gloo ranks train a ResNet-18 under DDP. Rounds alternate between the step as train.py runs it
(the BatchNorm snapshot before the forward, rank 0's statistics sent after it) and the bare step;
the median of each is printed. Then the cost on the step's path of a ResNet-18 checkpoint
written in the foreground (torch.save, fsync, rename) and staged for the background.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.models import resnet18

from distributed_step import checkpoint as ckpt
from distributed_step.background_save import staged
from distributed_step.parallel.process_group import DistEnv
from distributed_step.recovery import Survivor


def rank_main(rank: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    env = DistEnv(rank, rank, 2, 2, torch.device("cpu"), "gloo", True)
    torch.manual_seed(0)
    net = resnet18(num_classes=10)
    model = nn.parallel.DistributedDataParallel(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    survivor_on, step = [False], [0]
    survivor = Survivor(env, net, model, lambda: step[0], carry_statistics=True)
    hook = survivor.rank0.send
    survivor.rank0.send = lambda s: hook(s) if survivor_on[0] else None
    x, y = torch.randn(args.batch, 3, args.image_size, args.image_size), torch.randint(10, (args.batch,))
    times = {True: [], False: []}
    for round_ in range(args.rounds + 1):
        survivor_on[0] = round_ % 2 == 0
        dist.barrier()
        began = time.perf_counter()
        for _ in range(args.steps):
            step[0] += 1
            if survivor_on[0]:
                survivor.step_begins()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            survivor.step_ends()
        if round_:  # the first is a warm-up
            times[survivor_on[0]].append((time.perf_counter() - began) / args.steps)
    if rank == 0:
        state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step[0]}
        with tempfile.TemporaryDirectory() as out:
            fore, stage = [], []
            for _ in range(5):
                began = time.perf_counter()
                ckpt.save_checkpoint(state, out, keep=1)
                fore.append(time.perf_counter() - began)
                began = time.perf_counter()
                staged(state)
                stage.append(time.perf_counter() - began)
        results.update(on=statistics.median(times[True]), off=statistics.median(times[False]),
                       fore=statistics.median(fore), stage=statistics.median(stage),
                       mb=sum(t.numel() * t.element_size() for t in net.state_dict().values()) / 2**20)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="images per rank")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--rounds", type=int, default=12, help="rounds, alternating with and without")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(port, args, results), nprocs=2)
        r = dict(results)
    print(f"ResNet-18, 2 gloo ranks, {args.batch} images of {args.image_size} px per rank, "
          f"{args.rounds} rounds of {args.steps} steps, medians:")
    print(f"  step with recovery {1e3 * r['on']:.1f} ms, without {1e3 * r['off']:.1f} ms: "
          f"{100 * (r['on'] / r['off'] - 1):+.2f}%")
    print(f"  checkpoint (weights {r['mb']:.0f} MiB + momentum): foreground save {1e3 * r['fore']:.0f} ms, "
          f"staged for the background {1e3 * r['stage']:.0f} ms")


if __name__ == "__main__":
    main()
