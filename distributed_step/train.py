"""train(config) -> Summary: the one loop that torchrun, Ray Train and Kubernetes pods all run.

    detect the world -> validate -> datasets -> model -> process group -> placement -> Run:
        loaders -> resume -> DDP -> [ batch -> step -> agree -> log / eval / checkpoint ] -> model.pt

Datasets and the model are built before the process group on purpose: every check that can
fail on bad input (flags, paths, files, batch sizes) runs there, on every rank, before the
first collective, so one bad rank fails fast instead of leaving the others waiting.
"""
from __future__ import annotations

import itertools
import os
import random
import time

import torch
from torch import nn

from distributed_step import checkpoint as ckpt
from distributed_step import faults, recovery, rundir
from distributed_step.background_save import CheckpointWriter
from distributed_step.cadence import duties
from distributed_step.config import ConfigError, TrainConfig, save_yaml
from distributed_step.data.datasets import build_datasets, check_batch_fits
from distributed_step.data.device_input import DeviceFeed
from distributed_step.data.loaders import held_out_loader, loader_workers, train_loader
from distributed_step.model import build_model
from distributed_step.observe import evidence
from distributed_step.observe.clock import PhaseClock
from distributed_step.observe.metrics import JsonlLog, LossMeter, Throughput, evaluate, log, progress_bar, setup_logging
from distributed_step.observe.profiling import StepProfiler
from distributed_step.observe.prometheus import PrometheusExporter
from distributed_step.observe.stragglers import StragglerWatch
from distributed_step.optim import lr_factor, sgd
from distributed_step.outcome import Summary, TrainingError, write_outputs
from distributed_step.parallel import ddp, numerics, placement
from distributed_step.parallel.numerics import amp
from distributed_step.parallel.preemption import PreemptionNotice, PreemptionWatch, StopRequest
from distributed_step.parallel.process_group import (
    DistEnv,
    all_gather_object,
    barrier,
    broadcast_buffers_,
    broadcast_object,
    detect,
    is_peer_failure,
    setup,
    state_digest,
    teardown,
)
from distributed_step.parallel.step_flags import StepFlags
from distributed_step.parallel.syncbn import convert_sync_batchnorm
from distributed_step.step import train_step


def train(cfg: TrainConfig, device: torch.device | None = None, on_checkpoint=None,
          preemption: PreemptionNotice | None = None, on_record=None) -> Summary:
    """Train on this process's rank. `device` overrides the default (Ray assigns one);
    `on_checkpoint(path, step)` is called on every rank after each checkpoint is on disk;
    `preemption` says when a node is about to be reclaimed: a checkpoint is saved at once;
    `on_record(record)` gets each record of metrics.jsonl, on every rank."""
    world = detect(device)
    # Everything that can fail on bad input runs here, on every rank, before any collective.
    cfg.validate(world.world_size)
    amp(cfg.precision, world.device)  # refuses a precision this device cannot run
    placement.check_memory(cfg, world.world_size, world.local_world_size, world.device)
    numerics.configure(cfg.deterministic)  # before the model touches the device (cuBLAS reads it once)
    rundir.prepare(cfg.out)
    exporter = PrometheusExporter(cfg.metrics_port) if cfg.metrics_port and world.rank == 0 else None
    if world.device.type == "cuda" and cfg.backend in ("auto", "nccl"):
        evidence.nccl_flight_recorder(cfg.out)  # before the process group reads it
    sets = build_datasets(cfg)
    check_batch_fits(sets, cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = build_model(sets.num_classes, weights=cfg.weights, small_input_stem=cfg.small_input_stem,
                      channels_last=cfg.channels_last)
    env = setup(world, cfg.backend, cfg.timeout_s, cfg.socket_ifname)
    setup_logging(env)
    placement.place(cfg, env)
    lock = rundir.RunLock(cfg.out)
    try:
        return Run(cfg, env, sets, net, lock, on_checkpoint, preemption, [exporter, on_record]).fit()
    finally:
        lock.release()
        teardown(env)


class Run:
    """One rank's run: the loaders, the model and its optimizer, the counters, and the loop."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, sets, net: nn.Module, lock: rundir.RunLock, on_checkpoint,
                 preemption: PreemptionNotice | None = None, listeners=()):
        self.cfg, self.env, self.sets, self.on_checkpoint = cfg, env, sets, on_checkpoint
        self.preemption = PreemptionWatch(preemption)
        self.started = time.perf_counter()
        # One writer per run directory, decided by rank 0 and told to every rank before anything
        # in --out is read or written.
        refused = broadcast_object(lock.acquire() if env.is_main else None, env)
        if refused:
            raise ConfigError(refused)
        pin = env.device.type == "cuda"
        workers = loader_workers(cfg, sets, env.local_world_size)
        self.loader = train_loader(sets, cfg, env.rank, env.world_size, workers, pin)
        self.held_out = held_out_loader(sets, 2 * cfg.global_batch_size // env.world_size,
                                        env.rank, env.world_size, workers, pin)
        self.steps_per_epoch = len(self.loader)
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        self.precision, self.scaler = amp(cfg.precision, env.device)
        self.flags = StepFlags(env)
        self.feed = DeviceFeed(sets.train_transform, env.device, cfg.channels_last,
                               getattr(sets.train, "samples", None))
        self.held_out_feed = DeviceFeed(sets.held_out_transform, env.device, cfg.channels_last,
                                        getattr(sets.held_out, "samples", None))

        self.net = convert_sync_batchnorm(net, env.device, env.backend) if cfg.sync_bn else net
        self.net = self.net.to(env.device)
        self.optimizer = sgd(self.net.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov,
                             fused=cfg.fused_sgd, scaler=self.scaler)
        self.schedule = lr_factor(cfg.schedule, cfg.warmup_steps, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.step, self.resumed_from, self.saved_step, self.last_loss = 0, None, -1, None
        self.resumed_hook = None  # the hook --comm-hook auto chose before a restart, kept after it
        self.lr_used, self.stopping = cfg.lr * self.schedule(0), False
        self._check_ranks_agree()
        self._resume()  # load before wrapping in DDP, into the plain module
        self.model = ddp.wrap(self.net, env, cfg, self.resumed_hook)
        self.comm_hook = getattr(self.model, "comm_hook", cfg.comm_hook)  # what auto chose, if asked
        self.link = getattr(self.model, "link_report", None)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.metrics = JsonlLog(os.path.join(cfg.out, "metrics.jsonl"), env, self.step, listeners)
        self.clock, self.meter, self.timer = PhaseClock(env.device), LossMeter(env.device), Throughput()
        self.clock.watch_gradients(self.net)
        self.stragglers, self.profiler = StragglerWatch(env), StepProfiler(cfg, env.rank, env.device)
        self.watch = evidence.HangWatch(cfg.out, cfg.timeout_s)  # stacks if this rank stops moving
        # A peer's failure costs at most the step it interrupts (recovery.py). (SyncBN's running
        # statistics are the same on every rank: no need to send rank 0's.)
        self.survivor = recovery.Survivor(env, self.net, self.model, lambda: self.step + 1, not cfg.sync_bn)
        faults.arm(cfg, self.net, self.optimizer, lambda: self.step + 1, env.rank, env.world_size)
        self.bar = None  # the progress bar, on rank 0 of an interactive terminal (_announce)
        self.writer = CheckpointWriter(cfg.out, cfg.keep_checkpoints)

    # --- the checkpoint state, written and read in one place --------------------------------
    def state_dict(self) -> dict:
        """Everything a checkpoint holds: exactly checkpoint.REQUIRED_KEYS."""
        epoch, done = divmod(self.step, self.steps_per_epoch)
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "step": self.step, "epoch": epoch, "batches_in_epoch": done,  # epoch/batch: for readers
                "global_batch_size": self.cfg.global_batch_size, "world_size": self.env.world_size,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                "config": {**self.cfg.to_dict(), "comm_hook_chosen": self.comm_hook}, "last_loss": self.last_loss}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state`; the data position follows from (step, global batch). The flags
        of this run apply from here on, except those that would change what is being trained
        (checkpoint.FIXED_ON_RESUME), which are refused."""
        cfg, saved = self.cfg, state["config"]
        ckpt.check_resumable(state, cfg, self.net.fc.out_features)
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The optimizer's state brought back the checkpoint's hyperparameters: this run's flags
        # win, and the rate of the next step comes from this run's schedule.
        # fused/foreach too: the checkpoint's choice would otherwise come back with its groups
        # (and a fused SGD under fp16's scaler is what sgd() forbids).
        kernel = {k: self.optimizer.defaults[k] for k in ("fused", "foreach")}
        for group in self.optimizer.param_groups:
            group.update(momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                         initial_lr=cfg.lr, lr=cfg.lr * self.schedule(state["step"]), **kernel)
        self.scheduler.base_lrs = [cfg.lr] * len(self.optimizer.param_groups)
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = self.saved_step = state["step"]
        self.last_loss = state["last_loss"]
        if cfg.comm_hook == "auto" and state["world_size"] == self.env.world_size:  # same links, same math
            self.resumed_hook = saved.get("comm_hook_chosen")  # (an explicit --comm-hook always wins)

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
        path, error = broadcast_object(ckpt.choose(cfg.out, cfg.resume) if env.is_main else None, env)
        if error:
            raise ConfigError(error)
        if path is None:
            return
        try:
            state = ckpt.load_checkpoint(path)
        except ValueError as exc:
            raise ConfigError(f"--resume: {exc} (is --out on storage every node shares?)") from None
        try:
            self.load_state_dict(state)
        except ConfigError as exc:
            raise ConfigError(f"{exc} ({path})") from None
        self.resumed_from = path
        log.info("resumed from %s at step %d (epoch %d, batch %d; saved by %d ranks, now %d)", path,
                 state["step"], state["epoch"], state["batches_in_epoch"], state["world_size"], env.world_size)

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> Summary:
        try:
            self._announce()
            return self._fit()
        finally:
            # A failure leaves by os._exit (__main__), which would cut a background write of the
            # last finished step short: wait for it on every way out.
            self.writer.finish()
            self.survivor.close()
            self.watch.close()
            self.metrics.close()
            self.profiler.close()

    def _fit(self) -> Summary:
        # SIGTERM stays a flag until the end: the final checkpoint and model.pt are written too,
        # and so is a survivor's checkpoint, which the launcher's SIGTERM must not cut short.
        with StopRequest() as stop:
            try:
                return self._loop(stop)
            except Exception as exc:
                if is_peer_failure(exc):  # the survivors hold the last finished step: save it
                    if self.env.is_main and self.writer.finish() != self.saved_step:
                        self.saved_step = -1  # the background write of saved_step failed
                    self.survivor.save(self.state_dict, self.step, self.saved_step, self.cfg.out,
                                       self.cfg.keep_checkpoints)
                raise

    def _loop(self, stop: StopRequest) -> Summary:
        for images, labels in self._batches():  # ends after the last step, or once the ranks agree to stop
            loss = self._step(images, labels)
            self.stopping = self._agree(stop.requested, loss)
            self._after_step(loss)
        if self.bar is not None:
            self.bar.close()
        if self.stopping:
            log.info("stopped by SIGTERM at step %d; checkpoint saved; run again to resume", self.step)
            return self._finish("preempted", final=False)
        if self.saved_step != self.step:
            self._checkpoint()  # never lose a finished step
        return self._finish("complete", final=True)

    def _announce(self) -> None:
        cfg, env = self.cfg, self.env
        link = {"comm_hook_chosen": self.comm_hook, **({"link": self.link.as_record()} if self.link else {})}
        if env.is_main:
            save_yaml(cfg, os.path.join(cfg.out, "config.yaml"),
                      {"world_size": env.world_size, "numerics": numerics.in_force(), **link})
        if self.link:
            log.info("%s", self.link.describe())
            self.metrics.write({"step": self.step, "comm_hook": self.comm_hook,
                                **{f"link_{k}": v for k, v in self.link.as_record().items() if k != "hook"}})
        log.info("training %d steps (%d per epoch), global batch %d on %d rank(s), %s/%s",
                 self.total_steps, self.steps_per_epoch, cfg.global_batch_size, env.world_size,
                 env.device.type, env.backend)
        self.bar = progress_bar(env, self.total_steps, self.step)

    def _batches(self):
        """(images, labels) on the device for every remaining step. Owns the epochs (the
        sampler's position, so a resumed run continues mid-epoch), the device input (copy,
        augmentation, normalisation: self.feed), and the start of each step's timer (before the
        fetch: waiting for data counts)."""
        while self.step < self.total_steps and not self.stopping:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            self.loader.sampler.set_position(epoch, done)
            self.timer.begin()
            for images, labels in self.feed(itertools.islice(self.loader, self.total_steps - self.step)):
                faults.inject(self.cfg, self.step + 1, self.env.rank, self.env.world_size, "before-forward")
                self.watch.beat()
                yield images, labels
                if self.stopping:
                    return
                self.timer.begin()

    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        self.profiler.before(self.step + 1)
        self.clock.start()
        faults.slow_down(self.cfg, self.env.rank)  # inside the forward phase
        self.survivor.step_begins()
        loss = train_step(self.model, self.optimizer, images, labels, self.loss_fn, self.clock,
                          accum=cfg.grad_accum, precision=self.precision, scaler=self.scaler,
                          clip_grad=cfg.clip_grad)
        self.lr_used = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        self.survivor.step_ends()
        self.profiler.after(self.step)
        return loss

    def _agree(self, stop_requested: bool, loss: torch.Tensor) -> bool:
        """One small asynchronous all-reduce per step (parallel/step_flags.py): does any rank want to stop
        (SIGTERM), is any rank's loss not finite? Read a step late, except before this step
        writes, evaluates or logs anything. Returns whether to stop, the same on every rank."""
        self.flags.post(self.step, stop_requested, loss)
        faults.inject(self.cfg, self.step, self.env.rank, self.env.world_size, "flags")
        if duties(self.cfg, self.step, self.total_steps, stopping=False).writes or self.flags.stop:
            self.flags.settle()  # (on a stop too: its checkpoint must not hold this step if it was not finite)
        if self.flags.non_finite_step is not None:
            raise TrainingError(f"loss is not finite at step {self.flags.non_finite_step} (lower --lr or set "
                                f"--clip-grad); the last good checkpoint in {self.cfg.out} is kept")
        return self.flags.stop and self.step < self.total_steps  # the last step just finishes

    def _after_step(self, loss: torch.Tensor) -> None:
        """Close the step's timer, then log, evaluate and checkpoint at their intervals."""
        todo = duties(self.cfg, self.step, self.total_steps, self.stopping)
        self.meter.update(loss)
        self.timer.end(self.cfg.global_batch_size)
        if todo.log:
            self.last_loss = self._log()
        if todo.evaluate:
            self.metrics.write({"step": self.step, **self._evaluate()})
        if self.preemption.save_now(self.step):
            self._checkpoint()
        elif todo.checkpoint:  # periodic saves write in the background; the last, the stop's, at once
            self._checkpoint(background=not self.stopping and self.step < self.total_steps)

    def _log(self) -> float:
        loss = self.meter.reduce(self.env)
        steps, seconds = self.timer.take_window()
        phases = {f"{name}_ms": round(ms / steps, 3) for name, ms in self.clock.read_ms().items()}
        phases["data_ms"] = round(1e3 * self.feed.take_wait_s() / steps, 3)  # waiting for the loader
        ranks = self.stragglers.window(self.step, phases)  # every rank's phases; warns of a slow one
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 3), "loss": loss,
                  "lr": self.lr_used,  # the rate this step used (the scheduler already points at the next)
                  "images_per_s": round(self.cfg.global_batch_size * steps / seconds, 2),
                  "step_ms": round(1e3 * seconds / steps, 3), **phases, **ranks}
        self.metrics.write(record)
        if self.bar is not None:
            self.bar.update(self.step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{record['images_per_s']:.0f}")
        else:
            log.info("step %d/%d  loss %.4f  lr %.4g  %.0f img/s  (data %.0f / fwd %.0f / bwd %.0f / comm %.0f / "
                     "opt %.0f ms)", self.step, self.total_steps, loss, record["lr"], record["images_per_s"],
                     *(phases.get(f"{name}_ms", 0) for name in ("data", "forward", "backward", "comm", "optimizer")))
        return loss

    def _evaluate(self) -> dict:
        if self.held_out is None:
            return {}
        self.watch.beat(force=True)
        broadcast_buffers_(self.net, self.env)  # evaluate rank 0's BatchNorm statistics everywhere
        result = evaluate(self.net, self.watch.beating(self.held_out_feed(self.held_out)), self.env, self.precision)
        log.info("step %d  held-out loss %.4f  accuracy %.4f (%d samples)", self.step,
                 result["eval_loss"], result["eval_accuracy"], result["eval_samples"])
        return result

    def _checkpoint(self, background: bool = False) -> None:
        # The loss check covers the forward; this covers the update after it. Replicas are
        # identical, so every rank reaches the same verdict without a collective.
        if not all(torch.isfinite(p).all() for p in self.net.parameters()):
            raise TrainingError(f"weights are not finite after step {self.step} (lower --lr or set --clip-grad); "
                                f"the last good checkpoint in {self.cfg.out} is kept")
        broadcast_buffers_(self.net, self.env)
        self.watch.beat(force=True)
        written, error = self.writer.save(self.state_dict, self.step, background) if self.env.is_main else ([], None)
        # The others wait here, not in the next step's collective, where a slow save would
        # look like a hang and trip the collective timeout.
        written, error = broadcast_object((written, error), self.env)
        if error:
            raise TrainingError(error)
        # What a survivor may count as on disk: rank 0 waits for its own write first (_fit).
        self.saved_step = self.step if self.env.is_main or not background else max(
            [step for _, step in written], default=self.saved_step)
        for path, step in written if self.on_checkpoint else ():
            self.on_checkpoint(path, step)

    def _finish(self, status: str, final: bool) -> Summary:
        cfg, env = self.cfg, self.env
        summary = Summary(status, env.world_size, self.step, round(self.step / self.steps_per_epoch, 3),
                          self.last_loss, 0.0, self.timer.images_per_s, self.resumed_from)
        if final:
            result = self._evaluate()
            if result:
                self.metrics.write({"step": self.step, **result})  # the last point of the eval curves
            summary.eval_loss, summary.eval_accuracy = result.get("eval_loss"), result.get("eval_accuracy")
            summary.eval_samples = result.get("eval_samples")
            # No broadcast here: the final checkpoint already gave every rank rank 0's buffers,
            # so the digests check the replicas rather than paper over a difference.
            summary.replica_digests = all_gather_object(state_digest(self.net.state_dict()), env)
            if len(set(summary.replica_digests)) != 1:
                raise TrainingError(f"replicas differ after step {self.step}: {summary.replica_digests}")
        summary.stragglers = self.stragglers.episodes
        summary.wall_time_s = round(time.perf_counter() - self.started, 3)
        if env.is_main:
            self.watch.beat(force=True)
            write_outputs(summary, self.net if final else None, cfg.out)
        barrier(env)
        return summary

