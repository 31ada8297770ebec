"""Baseline for docs/benchmarks.md: the plain DDP tutorial loop, written here for comparison.

torchrun + DDP(resnet18()) + SGD over a DataLoader with a DistributedSampler, on pre-generated
random images. Prints images/s the way distributed_step's summary.json does: global images per
second over the steps after the first 3.

    torchrun --standalone --nproc_per_node=2 benchmarks/tutorial_loop.py --steps 30
"""
import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision.models import resnet18

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--image-size", type=int, default=64)
parser.add_argument("--global-batch-size", type=int, default=64)
args = parser.parse_args()

dist.init_process_group("gloo")
world = dist.get_world_size()
torch.manual_seed(0)
data = TensorDataset(torch.randn(2048, 3, args.image_size, args.image_size), torch.randint(10, (2048,)))
loader = DataLoader(data, batch_size=args.global_batch_size // world, sampler=DistributedSampler(data), drop_last=True)
model = DDP(resnet18(num_classes=10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

step, timed, seconds = 0, 0, 0.0
while step < args.steps:
    tick = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        step += 1
        if step > 3:
            timed, seconds = timed + 1, seconds + time.perf_counter() - tick
        if step == args.steps:
            break
        tick = time.perf_counter()
if dist.get_rank() == 0:
    print(json.dumps({"images_per_s": args.global_batch_size * timed / seconds, "steps": step}))
dist.destroy_process_group()
