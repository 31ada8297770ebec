"""Published scaling runs, as the planner's inputs and the efficiency each source reported.

Each run gives what its source published: the model, the batch per device, one device's step
time (from its own single-device figure), the system, the device count and the efficiency. The
split of that step is not published: forward is a third of forward + backward (backward does
about twice forward's work), and the optimizer's momentum SGD costs its memory traffic (about 20
bytes per parameter: read weight, gradient and momentum, write weight and momentum) at the
device's memory bandwidth. Where the gradients arrive in backward comes from the model's layers
(planner.model_profile). What no source gives is the interference of NCCL's traffic with the
backward kernels beside it: it is fitted once, on the PyTorch DDP benchmark's 8-GPU step (one
V100 node), and the same figure is used for every other GPU run.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import torch
from torch import nn
from torchvision import models

from distributed_step.planner.collectives import System
from distributed_step.planner.model_profile import layer_flops, structural_profile
from distributed_step.planner.presets import SYSTEMS
from distributed_step.planner.step_model import DDP_BUCKETING, Profile, band, fit_interference, predict

PYTORCH_DDP = "pytorch/pytorch benchmarks/distributed/ddp/README.md (8 DGX-1V, PyTorch 1.4, p50)"
DLE = "NVIDIA DeepLearningExamples PyTorch/Classification/ConvNets/resnet50v1.5 README (DGX A100 80GB, 21.03)"
HOROVOD = "horovod/horovod README and docs/benchmarks.rst (128 servers x 4 P100, 25 Gb/s RoCE)"
TF_P100 = "TensorFlow r1 performance benchmarks, DGX-1 P100, synthetic data, batch 64 (one-GPU step)"
# Horovod fuses the gradients ready in each cycle into one all-reduce of at most its fusion
# buffer: 64 MB by default until v0.21 (docs/tensor-fusion.rst), when these runs were made.
HOROVOD_FUSION_MB = 64.0
MEMORY_GBYTE_S = {"V100": 900.0, "A100": 2039.0, "P100": 732.0}


@dataclass(frozen=True)
class Run:
    name: str
    arch: str
    device: str
    batch: int
    alone_s: float  # one device's step, no DDP
    system: str
    ranks: int
    published: float  # scaling efficiency the source reports
    source: str
    ddp_overhead_s: float = 0.0  # the source's one-device DDP step minus its plain step, if published
    bucket_mb: float = 25.0
    ddp: str = "given-cap"  # how the source's DDP bucketed: step_model's "given-cap", "default" or "pytorch-1.4"


RUNS = (
    Run("PyTorch DDP, ResNet-50, 16 V100", "resnet50", "V100", 32, 0.097, "v100-ib100x4", 16, 0.097 / 0.104,
        PYTORCH_DDP, ddp_overhead_s=0.003, ddp="pytorch-1.4"),
    Run("PyTorch DDP, ResNet-101, 16 V100", "resnet101", "V100", 32, 0.162, "v100-ib100x4", 16, 0.162 / 0.179,
        PYTORCH_DDP, ddp_overhead_s=0.009, ddp="pytorch-1.4"),
    Run("DLE ResNet-50 TF32, 8 A100", "resnet50", "A100", 256, 256 / 938, "a100-ib200", 8, 7248 / 938 / 8, DLE,
        ddp_overhead_s=0.003, ddp="default"),
    Run("DLE ResNet-50 AMP, 8 A100", "resnet50", "A100", 256, 256 / 2470, "a100-ib200", 8, 16621 / 2470 / 8, DLE,
        ddp_overhead_s=0.003, ddp="default"),
    Run("Horovod ResNet-101, 512 P100", "resnet101", "P100", 64, None, "p100-pcie-25gbe", 512, 0.90, HOROVOD,
        bucket_mb=HOROVOD_FUSION_MB),
    Run("Horovod VGG-16, 512 P100", "vgg16", "P100", 64, 64 / 154, "p100-pcie-25gbe", 512, 0.68, HOROVOD,
        bucket_mb=HOROVOD_FUSION_MB),
)
# The interference fit: the PyTorch benchmark's ResNet-50 at 8 V100 in one node, 0.104 s.
FIT_RUN, FIT_RANKS, FIT_STEP_S = RUNS[0], 8, 0.104


@cache
def _layers(arch: str) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return getattr(models, arch)(num_classes=1000)


def profile(run: Run, interference: float = 0.0) -> Profile:
    return replace(_profile(run), interference=interference)


@cache
def _profile(run: Run) -> Profile:
    net = _layers(run.arch)
    params = sum(p.numel() for p in net.parameters())
    alone = run.alone_s if run.alone_s is not None else _interpolated_p100_step(run)
    optimizer = params * 20 / (MEMORY_GBYTE_S[run.device] * 1e9)
    compute = alone - optimizer
    derived = structural_profile(run.arch, net, 224, run.batch, compute / 3, 2 * compute / 3, optimizer,
                                 layers=_flops(run.arch), ddp_overhead_s=run.ddp_overhead_s)
    return replace(derived, **DDP_BUCKETING[run.ddp])


@cache
def _flops(arch: str) -> tuple:
    return tuple(layer_flops(_layers(arch), 224))


def _interpolated_p100_step(run: Run) -> float:
    """ResNet-101 is not in TF_P100: its per-image time between ResNet-50's (219 img/s) and
    ResNet-152's (91.8 img/s), by forward FLOPs."""
    def flops(arch: str) -> float:
        return sum(f for _, f in _flops(arch))
    low, high, mid = flops("resnet50"), flops("resnet152"), flops(run.arch)
    per_image = 1 / 219 + (mid - low) / (high - low) * (1 / 91.8 - 1 / 219)
    return run.batch * per_image


def fitted_interference() -> float:
    """The interference that makes the 8-GPU ResNet-50 step of the PyTorch benchmark 0.104 s."""
    return fit_interference(profile(FIT_RUN), SYSTEMS[FIT_RUN.system], FIT_RANKS, FIT_STEP_S, FIT_RUN.bucket_mb)


def system_for(run: Run) -> System:
    return SYSTEMS[run.system]


def table() -> list[dict]:
    """Each run's published efficiency beside the model's, with the band and the bucket-size check."""
    kappa = fitted_interference()
    rows = []
    for run in RUNS:
        p, system = profile(run, kappa), system_for(run)
        low, mid, high = band(p, system, run.ranks, bucket_mb=run.bucket_mb)
        rows.append({"run": run.name, "published": run.published, "model": mid.efficiency,
                     "band": (high.efficiency, low.efficiency), "exposed_ms": 1e3 * mid.exposed_s,
                     "comm_ms": 1e3 * mid.comm_s, "step_ms": 1e3 * mid.step_s, "source": run.source})
    small = predict(profile(RUNS[0], kappa), system_for(RUNS[0]), 16, bucket_mb=1.0)
    large = predict(profile(RUNS[0], kappa), system_for(RUNS[0]), 16, bucket_mb=25.0)
    return rows + [{"run": "PyTorch DDP, ResNet-50, 16 V100: 1 MB against 25 MB buckets",
                    "published": -0.038, "model": large.step_s / small.step_s - 1, "source": PYTORCH_DDP,
                    "interference": kappa}]
