"""Synchronized BatchNorm on every backend.

torch.nn.SyncBatchNorm only runs on GPUs under NCCL (DDP refuses it on CPU modules, and its
kernels are CUDA-only), yet the equivalence "N ranks x B/N == 1 rank x B" needs batch statistics over the
global batch. On CPU we compute them with two differentiable all-reduces per layer: the
backward of a sum over ranks is a sum over ranks of the gradients, which is exactly the
cross-rank term of the BatchNorm backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on the sum, so each input's gradient is the sum of them all.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover every rank's samples (gloo, CPU or CUDA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # On one process the same two-pass arithmetic runs without collectives, so 1 rank x B
        # and N ranks x B/N compute the same thing. (Two passes, mean then variance, also stay
        # closer to a float64 reference than torch's fp32 CPU BatchNorm.)
        synced = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        total = _SumOverRanks.apply if synced else (lambda t: t)
        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # statistics in fp32 under autocast, as torch's BatchNorm does
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        # float64 keeps the element count exact past 2**24 (224 px x large batches) and the sums
        # accurate; the all-reduce carries 2C+1 numbers, so the width costs nothing measurable.
        local_count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64, device=x.device)
        sums = total(torch.cat([x.sum(dims, dtype=torch.float64), local_count]))
        count = sums[-1].detach()
        mean = (sums[:-1] / count).to(x.dtype)
        centered = x - mean.view(shape)
        # Two passes (mean first, then squared deviations) match a single-process BatchNorm far
        # more closely than E[x^2] - E[x]^2, which cancels catastrophically in fp32.
        var = (total((centered * centered).sum(dims, dtype=torch.float64)) / count).to(x.dtype)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                n = float(count)
                self.running_var.lerp_(var.detach() * (n / max(n - 1, 1.0)), factor)
        return out.to(dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device, backend: str) -> nn.Module:
    """Replace every BatchNorm2d: torch's SyncBatchNorm under NCCL, GlooSyncBatchNorm otherwise
    (gloo on CPU, and gloo with CUDA tensors: 2 ranks sharing one GPU, which NCCL refuses; torch's
    SyncBatchNorm gathers with all_gather_into_tensor, which gloo does not promise)."""
    if backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlooSyncBatchNorm):
            synced = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats).to(device)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            convert_sync_batchnorm(child, device, backend)
    return module
