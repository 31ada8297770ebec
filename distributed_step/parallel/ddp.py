"""How the model is made data-parallel: DDP with its measured knobs and an optional gradient
compression hook (threads and cores of each rank: placement.py).

`train` and `bench` both call these, so the benchmark measures exactly the step that trains.
Each default was chosen by `python -m distributed_step bench` (docs/benchmarks.md).
"""
from __future__ import annotations

from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from distributed_step.config import TrainConfig
from distributed_step.parallel import hook_policy
from distributed_step.parallel.process_group import DistEnv


def wrap(net: nn.Module, env: DistEnv, cfg: TrainConfig, hook: str | None = None) -> nn.Module:
    """DDP around `net` (a no-op on one process) with the configuration's knobs: gradients are
    all-reduced bucket by bucket while backward is still computing the earlier layers. `hook`
    overrides --comm-hook (a resumed run keeps the hook "auto" chose). The DDP module carries
    the hook in use (.comm_hook) and, for "auto", what decided it (.link_report)."""
    if not env.distributed:
        return net
    hook, report = hook or cfg.comm_hook, None
    if hook == "auto":  # measured before DDP exists: its buckets would otherwise be in the timing
        report = hook_policy.measure(net, env.world_size, env.device, cfg)
        hook = report.hook
    model = DDP(net, device_ids=[env.device] if env.device.type == "cuda" else None,
                bucket_cap_mb=cfg.bucket_cap_mb,
                # The gradients live inside the communication buckets: no copy in, no copy out.
                gradient_as_bucket_view=cfg.bucket_view,
                # The graph is the same every step, so DDP can skip searching it for unused
                # parameters and fix the bucket order after the first iteration. It assumes every
                # backward syncs: accumulation's no_sync micro-steps trip an internal assert.
                static_graph=cfg.static_graph and cfg.grad_accum == 1,
                # No broadcast of BatchNorm buffers inside every forward: a collective there makes
                # a fast rank wait in its forward for a slow one, which hides who is slow (each
                # rank's forward would show the slowest's time; stragglers.py compares them). Rank
                # 0's buffers evolve the same either way (it only ever received its own), and they
                # are broadcast before every evaluation and checkpoint (train.py).
                **_no_buffer_sync())
    register_comm_hook(model, hook, cfg.powersgd_rank)
    model.comm_hook, model.link_report = hook, report
    return model


def _no_buffer_sync() -> dict:
    """torch 2.14 renamed broadcast_buffers (deprecated, with a warning) to forward_sync_buffers."""
    import inspect

    names = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def register_comm_hook(model: DDP, name: str, powersgd_rank: int = 4) -> None:
    """"none" is the exact path: gradients are summed in fp32, so N ranks equal one process.
    The others compress what is sent and therefore change the arithmetic of every step."""
    if name == "none":
        return
    if name == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif name == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "powersgd":
        # Low-rank gradient approximation with error feedback. The first iterations use the
        # exact all-reduce; PowerSGD needs at least two of them to start its warm state.
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=2, min_compression_rate=2,
                                            use_error_feedback=True, warm_start=True)
        model.register_comm_hook(state, _one_bucket_at_a_time(powerSGD_hook.powerSGD_hook))
    else:
        raise ValueError(f"unknown comm hook {name!r}")  # TrainConfig.validate() names the choices


def _one_bucket_at_a_time(hook):
    """PowerSGD issues its second all-reduce (Q) from a callback of its first (P). With several
    buckets in flight those callbacks race, so two ranks can issue them in different orders and
    gloo, which matches collectives by order, fails ("Received data size doesn't match expected
    size"; seen with 10 MB buckets or a static graph). Finishing each bucket before backward
    goes on keeps one order on every rank; on CPU the overlap it gives up was not free anyway."""
    def ordered(state, bucket):
        future = hook(state, bucket)
        future.wait()
        return future
    return ordered
