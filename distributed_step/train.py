"""train(config) -> Summary: the one loop that torchrun, Ray Train and Kubernetes pods all run.

    dist.setup -> datasets -> sampler -> loader -> [ step -> metrics -> checkpoint ] -> model.pt

Every check that can fail on bad input runs before the first collective, on every rank.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import checkpoint as ckpt
from . import ddp
from .config import ConfigError, TrainConfig, save_yaml
from .data import build_datasets, check_batch_fits, held_out_loader, loader_workers, train_loader
from .dist import (DistEnv, _default_device, all_gather_object, all_reduce_, barrier, broadcast_buffers_,
                   broadcast_object, read_world, setup, state_digest, teardown)
from .metrics import JsonlLog, LossMeter, Throughput, evaluate, log, setup_logging
from .model import build_model
from .step import PhaseClock, sgd, train_step
from .syncbn import convert_sync_batchnorm


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, disagreeing ranks); the message names the step."""


@dataclass
class Summary:
    status: str  # "complete" or "preempted"
    world_size: int
    steps: int
    epochs: float
    final_loss: float | None
    wall_time_s: float
    images_per_s: float | None
    resumed_from: str | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_samples: int | None = None
    replica_digests: list = field(default_factory=list)


class _StopRequest:
    """SIGTERM (Kubernetes, torchrun, a preempted VM) only sets a flag; the ranks agree on it
    at the end of the step, save, and exit 0 well inside the ~30 s grace period."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        # Signal handlers can only be installed from the main thread (Ray runs us in another).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second SIGTERM: stop waiting for the step to end
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def train(cfg: TrainConfig, device: torch.device | None = None, on_checkpoint=None) -> Summary:
    """Train on this process's rank. `device` overrides the default (Ray assigns one);
    `on_checkpoint(path, step)` is called on every rank after each checkpoint is on disk."""
    rank, local_rank, world_size, _ = read_world()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world_size = torch.distributed.get_world_size()  # the launcher (Ray) made the group
    # Everything that can fail on bad input runs here, on every rank, before any collective.
    cfg.validate(world_size)
    device = device or _default_device(local_rank)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs CUDA (its GradScaler); use --precision bf16 or fp32 on CPU")
    _check_writable(cfg.out)
    sets = build_datasets(cfg)
    check_batch_fits(sets, cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = build_model(sets.num_classes, cfg.weights, cfg.small_input_stem, cfg.channels_last)
    env = setup(cfg.backend, cfg.timeout_s, cfg.socket_ifname, device)
    setup_logging(env)
    ddp.place(cfg, env)
    try:
        return _Run(cfg, env, sets, net, on_checkpoint).fit()
    finally:
        teardown(env)


def _check_writable(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the run directory ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise ConfigError(f"--out {out}: the run directory is not writable")


def _lr_factor(cfg: TrainConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if cfg.schedule == "step":
            return 0.1 ** int(progress * 3)  # /10 at one third and at two thirds of the run
        return 1.0
    return factor


class _Run:
    def __init__(self, cfg: TrainConfig, env: DistEnv, sets, net: nn.Module, on_checkpoint):
        self.cfg, self.env, self.sets, self.on_checkpoint = cfg, env, sets, on_checkpoint
        self.started = time.perf_counter()
        pin = env.device.type == "cuda"
        workers = loader_workers(cfg, sets, env.local_world_size)
        self.loader = train_loader(sets, cfg, env.rank, env.world_size, workers, pin)
        self.held_out = held_out_loader(sets, 2 * cfg.global_batch_size // env.world_size,
                                        env.rank, env.world_size, workers, pin)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        self.precision = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

        self.net = net
        if cfg.sync_bn:
            self.net = convert_sync_batchnorm(self.net, env.device)
        self.net = self.net.to(env.device)
        self.optimizer = sgd(self.net.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov,
                             fused=cfg.fused_sgd)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(cfg, self.total_steps))
        self.step, self.resumed_from, self.saved_step, self.last_loss = 0, None, -1, None
        self.lr_used = cfg.lr * _lr_factor(cfg, self.total_steps)(0)
        self._check_ranks_agree()
        self._resume()  # load before wrapping in DDP, into the plain module
        self.model = ddp.wrap(self.net, env, cfg)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.metrics = JsonlLog(os.path.join(cfg.out, "metrics.jsonl"), env, self.step)

    # --- setup helpers ----------------------------------------------------------------------
    def _check_ranks_agree(self) -> None:
        """Uneven shards hang the first collective that one rank skips: fail with a message."""
        counts = all_gather_object((self.steps_per_epoch, self.total_steps), self.env)
        if len(set(counts)) != 1:
            raise TrainingError(f"ranks disagree on (steps per epoch, total steps): {counts}")

    def _resume(self) -> None:
        cfg, env = self.cfg, self.env
        # Rank 0 chooses and every rank loads that file (so --out must be shared storage); a bad
        # choice is broadcast too, so every rank fails with the same message instead of waiting.
        path, error = broadcast_object(self._choose_checkpoint() if env.is_main else None, env)
        if error:
            raise ConfigError(error)
        if path is None:
            return
        try:
            state = ckpt.load_checkpoint(path)
        except ValueError as exc:
            raise ConfigError(f"--resume: {exc} (is --out on storage every node shares?)") from None
        if state["global_batch_size"] != cfg.global_batch_size:
            raise ConfigError(f"--global-batch-size {cfg.global_batch_size} differs from the checkpoint's "
                              f"{state['global_batch_size']} ({path}); the data position would not match")
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step, self.resumed_from, self.saved_step = state["step"], path, state["step"]
        self.last_loss = state.get("last_loss")
        log.info("resumed from %s at step %d (epoch %d, batch %d; saved by %d ranks, now %d)", path,
                 state["step"], state["epoch"], state["batches_in_epoch"], state.get("world_size", 0),
                 env.world_size)

    def _choose_checkpoint(self) -> tuple[str | None, str | None]:
        """(path to resume from, error); rank 0 only."""
        cfg = self.cfg
        if cfg.resume == "never":
            path, step = None, 0
        elif cfg.resume == "auto":
            step, path = ckpt.find_newest_valid(cfg.out) or (0, None)
        else:
            try:
                path, step = cfg.resume, ckpt.load_checkpoint(cfg.resume)["step"]
            except ValueError as exc:
                return None, f"--resume: {exc}"
        for moved in ckpt.set_aside_newer(cfg.out, step):
            log.warning("set aside %s: newer than step %d, where this run starts", moved, step)
        return path, None

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> Summary:
        cfg, env = self.cfg, self.env
        if env.is_main:
            save_yaml(cfg, os.path.join(cfg.out, "config.yaml"), {"world_size": env.world_size})
        log.info("training %d steps (%d per epoch), global batch %d on %d rank(s), %s/%s",
                 self.total_steps, self.steps_per_epoch, cfg.global_batch_size, env.world_size,
                 env.device.type, env.backend)
        clock, meter, throughput = PhaseClock(env.device), LossMeter(env.device), Throughput()
        clock.watch_gradients(self.net)
        bar = _progress(env, self.total_steps, self.step)
        # Window time counts training steps only (data, step, flags), not evaluation or saving.
        window_seconds, window_steps = 0.0, 0
        stopping = False  # only ever set from the all-reduced flag, so every rank agrees
        with _StopRequest() as stop:
            while self.step < self.total_steps and not stopping:
                epoch, done = divmod(self.step, self.steps_per_epoch)
                self.loader.sampler.set_position(epoch, done)
                tick = time.perf_counter()
                for images, labels in self.loader:
                    self._maybe_fail_once()
                    images = images.to(env.device, non_blocking=True)
                    labels = labels.to(env.device, non_blocking=True)
                    if cfg.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    clock.start()
                    loss = train_step(self.model, self.optimizer, images, labels, self.loss_fn, clock,
                                      accum=cfg.grad_accum, precision=self.precision, scaler=self.scaler,
                                      clip_grad=cfg.clip_grad)
                    self.lr_used = self.optimizer.param_groups[0]["lr"]
                    self.scheduler.step()
                    self.step += 1
                    # One small all-reduce per step: do all ranks agree to stop, is any loss bad?
                    flags = all_reduce_(torch.tensor([float(stop.requested), float(not torch.isfinite(loss))],
                                                     device=env.device), self.env, op=torch.distributed.ReduceOp.MAX)
                    if flags[1]:
                        raise TrainingError(f"loss is not finite at step {self.step} (lower --lr or set --clip-grad); "
                                            f"the last good checkpoint in {cfg.out} is kept")
                    stopping = bool(flags[0]) and self.step < self.total_steps  # the last step just finishes
                    meter.update(loss)
                    step_seconds = time.perf_counter() - tick
                    window_steps, window_seconds = window_steps + 1, window_seconds + step_seconds
                    throughput.add(cfg.global_batch_size, step_seconds)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps or stopping:
                        self.last_loss = self._log(meter, clock, window_steps, window_seconds, bar)
                        window_seconds, window_steps = 0.0, 0
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                        self.metrics.write({"step": self.step, **self._evaluate()})
                    if stopping or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                        self._checkpoint()
                    if stopping or self.step >= self.total_steps:
                        break
                    tick = time.perf_counter()
        if bar is not None:
            bar.close()
        if stopping:
            log.info("stopped by SIGTERM at step %d; checkpoint saved; run again to resume", self.step)
            return self._finish("preempted", throughput, final=False)
        if self.saved_step != self.step:
            self._checkpoint()  # never lose a finished step
        return self._finish("complete", throughput, final=True)

    def _maybe_fail_once(self) -> None:
        """Fault injection: the highest rank dies abruptly before step K, once per run directory."""
        k = self.cfg.fail_once_at_step
        if k and self.step + 1 == k and self.env.rank == self.env.world_size - 1:
            marker = os.path.join(self.cfg.out, f".failed_once_at_step_{k}")
            if not os.path.exists(marker):
                with open(marker, "w") as fh:
                    fh.write(f"rank {self.env.rank} died here on purpose (--fail-once-at-step {k})\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                log.warning("--fail-once-at-step %d: killing this rank now", k)
                os.kill(os.getpid(), signal.SIGKILL)

    def _log(self, meter: LossMeter, clock: PhaseClock, steps: int, seconds: float, bar) -> float:
        loss = meter.reduce(self.env)
        phases = {f"{name}_ms": round(ms / steps, 3) for name, ms in clock.read_ms().items()}
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), "loss": loss,
                  "lr": self.lr_used,  # the rate this step used (the scheduler already points at the next)
                  "images_per_s": round(self.cfg.global_batch_size * steps / seconds, 2),
                  "step_ms": round(1e3 * seconds / steps, 3), **phases}
        self.metrics.write(record)
        if bar is not None:
            bar.update(self.step - bar.n)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_s']:.0f}")
        else:
            log.info("step %d/%d  loss %.4f  lr %.4g  %.0f img/s  (fwd %.0f / bwd %.0f / comm %.0f / opt %.0f ms)",
                     self.step, self.total_steps, loss, record["lr"], record["images_per_s"],
                     *(phases.get(f"{name}_ms", 0) for name in ("forward", "backward", "comm", "optimizer")))
        return loss

    def _evaluate(self) -> dict:
        if self.held_out is None:
            return {}
        broadcast_buffers_(self.net, self.env)  # evaluate rank 0's BatchNorm statistics everywhere
        result = evaluate(self.net, self.held_out, self.env, self.precision, self.cfg.channels_last)
        log.info("step %d  held-out loss %.4f  accuracy %.4f (%d samples)", self.step,
                 result["eval_loss"], result["eval_accuracy"], result["eval_samples"])
        return result

    def _checkpoint(self) -> None:
        # The loss check covers the forward; this covers the update after it. Replicas are
        # identical, so every rank reaches the same verdict without a collective.
        if not all(torch.isfinite(p).all() for p in self.net.parameters()):
            raise TrainingError(f"weights are not finite after step {self.step} (lower --lr or set --clip-grad); "
                                f"the last good checkpoint in {self.cfg.out} is kept")
        broadcast_buffers_(self.net, self.env)
        path = None
        if self.env.is_main:
            began = time.perf_counter()
            epoch, done = divmod(self.step, self.steps_per_epoch)
            state = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler else None,
                     "step": self.step, "epoch": epoch, "batches_in_epoch": done,
                     "global_batch_size": self.cfg.global_batch_size, "world_size": self.env.world_size,
                     "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                     "config": self.cfg.to_dict(), "last_loss": self.last_loss}
            path = ckpt.save_checkpoint(state, self.cfg.out, self.cfg.keep_checkpoints)
            log.info("saved %s in %.2f s", path, time.perf_counter() - began)
        # The others wait here, not in the next step's collective, where a slow save would
        # look like a hang and trip the collective timeout.
        path = broadcast_object(path, self.env)
        self.saved_step = self.step
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, self.step)

    def _finish(self, status: str, throughput: Throughput, final: bool) -> Summary:
        cfg, env = self.cfg, self.env
        summary = Summary(status, env.world_size, self.step, round(self.step / self.steps_per_epoch, 3),
                          self.last_loss, 0.0, throughput.images_per_s, self.resumed_from)
        if final:
            result = self._evaluate()
            summary.eval_loss, summary.eval_accuracy = result.get("eval_loss"), result.get("eval_accuracy")
            summary.eval_samples = result.get("eval_samples")
            # No broadcast here: the final checkpoint already gave every rank rank 0's buffers,
            # so the digests check the replicas rather than paper over a difference.
            summary.replica_digests = all_gather_object(state_digest(self.net.state_dict()), env)
            if len(set(summary.replica_digests)) != 1:
                raise TrainingError(f"replicas differ after step {self.step}: {summary.replica_digests}")
            if env.is_main:
                weights = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
                ckpt.save_atomic(weights, os.path.join(cfg.out, "model.pt"))
        summary.wall_time_s = round(time.perf_counter() - self.started, 3)
        if env.is_main:
            with open(os.path.join(cfg.out, "summary.json"), "w") as fh:
                json.dump(asdict(summary), fh, indent=2)
            log.info("%s: %s", status, json.dumps({k: v for k, v in asdict(summary).items()
                                                   if k != "replica_digests"}))
        barrier(env)
        return summary


def _progress(env: DistEnv, total: int, initial: int):
    """A tqdm bar on rank 0 when stderr is a terminal; log lines otherwise."""
    if not env.is_main or not os.isatty(2):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
