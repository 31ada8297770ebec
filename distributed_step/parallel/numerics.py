"""The numerics a run computes with, set once per process and recorded in config.yaml.

Two runs of the same command are bit-identical on CPU, but not on a GPU by default: cuDNN picks
convolution algorithms by timing them (cudnn.benchmark), some of which accumulate in a
nondeterministic order, and cuDNN convolutions use TF32 (10-bit mantissa) for fp32 inputs.
`--deterministic` trades speed for repeatability; without it the fixed-shape step lets cuDNN
autotune once and keep the fastest algorithms.
"""
from __future__ import annotations

import os

import torch

from distributed_step.config import ConfigError

# cuBLAS reuses workspaces across streams nondeterministically unless told their size; it reads
# this once, at its first call, so it is set before any model touches the device.
CUBLAS_DETERMINISTIC = ":4096:8"


def configure(deterministic: bool) -> dict:
    """Set the process's numerics for --deterministic (or the fast default); return what is in force."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        # Every step has the same shapes, so timing cuDNN's algorithms once pays for itself.
        # The rest are torch's defaults, set back in case this process ran --deterministic before.
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
    return in_force()


def in_force() -> dict:
    """The settings that decide whether a GPU run repeats bit for bit."""
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")}


def amp(precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype, gradient scaler) for --precision: fp16 needs a scaler (its gradients
    underflow without one), bf16 has fp32's range and needs none, fp32 runs without autocast.
    CPU autocast and GradScaler("cpu") run the same fp16 path as CUDA, so the tests cover it."""
    if precision == "fp16" and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--precision fp16 has no gradient scaler on {device.type}; use --precision bf16 or fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return dtype, torch.amp.GradScaler(device.type) if precision == "fp16" else None
