"""TrainConfig: every knob of a run, its default, and one line of help.

The command line, the optional YAML file and the run directory's `config.yaml` are all views of
this one dataclass. `validate()` runs before any collective, on every rank, and raises
`ConfigError` naming the flag to change, so a bad run fails fast everywhere instead of leaving
the other ranks waiting in a collective.

This module imports no torch: `--help` and flag errors answer instantly.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad flag, path or combination; the message names what to change."""


def _opt(default: Any, help: str, choices: tuple | None = None, debug: bool = False) -> Any:
    """A field with its flag's help; `debug` fields work as flags but stay out of --help."""
    return field(default=default, metadata={"help": help, "choices": choices, "debug": debug})


@dataclass
class TrainConfig:
    # Data
    data: str = _opt("digits", "synthetic | digits | imagefolder:DIR | cifar10:DIR")
    image_size: int = _opt(32, "side of the square input images, in pixels")
    synthetic_samples: int = _opt(2048, "training samples of --data synthetic")
    workers: int = _opt(-1, "DataLoader worker processes per rank (-1: 0 for in-memory data, else up to 4)")
    decode: str = _opt("workers", "where imagefolder images are decoded: in the loader workers, or batched on the "
                       "device (nvjpeg on CUDA; files it cannot take are decoded in the workers)",
                       ("workers", "device"))
    # Length of the run
    steps: int = _opt(0, "optimizer steps to run (0: use --epochs)")
    epochs: int = _opt(8, "passes over the training set (ignored when --steps is given)")
    global_batch_size: int = _opt(128, "images per optimizer step over all ranks (per rank = B / world size)")
    grad_accum: int = _opt(1, "micro-steps per optimizer step; gradients sync only on the last one")
    seed: int = _opt(0, "seed of model init, data order and synthetic data")
    # Optimizer and schedule
    lr: float = _opt(0.05, "peak learning rate of SGD")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-4, "SGD weight decay (L2)")
    nesterov: bool = _opt(False, "use Nesterov momentum")
    schedule: str = _opt("cosine", "learning-rate schedule after warmup", ("cosine", "step", "constant"))
    warmup_steps: int = _opt(5, "steps of linear warmup from 0 to --lr")
    label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy loss")
    clip_grad: float = _opt(0.0, "clip the global gradient norm to this value (0: off)")
    fused_sgd: bool = _opt(True, "one fused kernel for the SGD update (off: torch's per-tensor foreach loop)")
    # Model
    weights: str = _opt("none", "none | DEFAULT (torchvision cache, never downloaded) | PATH to a state dict")
    small_input_stem: bool = _opt(False, "3x3 stride-1 stem without max-pool, for tiny images")
    sync_bn: bool = _opt(False, "synchronize BatchNorm statistics across ranks (SyncBatchNorm)")
    channels_last: bool = _opt(False, "channels_last memory format for model and inputs")
    precision: str = _opt("fp32", "autocast precision (fp16 with a gradient scaler, on CUDA or CPU)",
                          ("fp32", "bf16", "fp16"))
    compile: bool = _opt(False, "torch.compile the model (opt-in; slow first steps)")
    deterministic: bool = _opt(False, "bit-identical GPU runs: deterministic algorithms, no cuDNN autotuning, "
                                      "no TF32 (slower; CPU runs repeat exactly either way)")
    # Run directory, checkpoints, logging
    out: str = _opt("runs/default", "run directory: config, metrics, checkpoints, model.pt, summary")
    # Periodic saves only guard against losing every rank at once (a dead rank costs one step,
    # recovery.py), and they are staged and written in the background: docs/resuming.md has the cost.
    checkpoint_every: int = _opt(50, "save a full checkpoint every N steps, in the background (0: only at the end)")
    keep_checkpoints: int = _opt(3, "keep the newest K checkpoints")
    resume: str = _opt("auto", "auto (newest valid checkpoint in --out) | never | PATH")
    eval_every: int = _opt(0, "evaluate on the held-out set every N steps (0: only at the end)")
    log_every: int = _opt(10, "log all-reduced metrics every N steps")
    metrics_port: int = _opt(0, "rank 0 serves the logged metrics for Prometheus on this port (0: off)")
    # Distributed
    timeout_s: float = _opt(300.0, "timeout of rendezvous and of every collective, in seconds")
    backend: str = _opt("auto", "process-group backend (auto: nccl on CUDA, gloo on CPU)", ("auto", "gloo", "nccl"))
    socket_ifname: str = _opt("", "network interface for gloo/nccl traffic (sets GLOO_/NCCL_SOCKET_IFNAME)")
    bucket_cap_mb: float = _opt(10.0, "DDP gradient bucket size in MB, the first bucket's too")
    static_graph: bool = _opt(True, "tell DDP the graph is the same every step (skips its per-step search; "
                              "off with --grad-accum > 1)")
    bucket_view: bool = _opt(True, "gradients live in DDP's buckets (gradient_as_bucket_view): "
                                   "no copy back after the all-reduce")
    pin_cores: bool = _opt(True, "pin each rank's threads to its own share of the node's cores "
                           "(off when jobs share a node)")
    threads: int = _opt(0, "intra-op threads per rank (0: usable cores / ranks on this node, at most OMP_NUM_THREADS)")
    comm_hook: str = _opt("none", "gradient compression: none is exact; bf16, fp16 and powersgd change "
                          "the math (fewer bytes sent, a slightly different update); auto measures the "
                          "link at start and takes bf16 only where exact would leave over 5%% of the step "
                          "waiting on the wire", ("none", "bf16", "fp16", "powersgd", "auto"))
    powersgd_rank: int = _opt(4, "rank of PowerSGD's low-rank gradient approximation (--comm-hook powersgd)")
    profile_steps: str = _opt("", "A:B: record steps A to B with torch.profiler into <out>/profile/rank<N>.json")
    profile_ranks: str = _opt("all", "ranks that --profile-steps records: all, or a comma list like 0,3")
    # Debugging (hidden from --help): fault injection for the tests and for drills
    fail_once_at_step: int = _opt(0, "a rank dies abruptly (SIGKILL) at this step, once per --out (0: off)",
                                  debug=True)
    fail_rank: int = _opt(-1, "the rank --fail-once-at-step kills (-1: the highest)", debug=True)
    fail_phase: str = _opt("before-forward", "where in the step --fail-once-at-step kills it",
                           ("before-forward", "backward", "optimizer", "flags"), debug=True)
    fail_signal: str = _opt("kill", "how --fail-once-at-step ends the rank: kill (SIGKILL, abrupt) or term "
                            "(SIGTERM, a stop request: the rank saves and exits)", ("kill", "term"), debug=True)
    stall_at_step: int = _opt(0, "the highest rank stops joining collectives at this step (0: off)", debug=True)
    slow_rank: str = _opt("", "RANK:MS: that rank sleeps MS ms in every step's forward (a straggler drill)",
                          debug=True)

    # --- checks -----------------------------------------------------------------------------
    def validate(self, world_size: int = 1) -> TrainConfig:
        """Raise ConfigError naming the flag; checks that need no collective and no data."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        kind = self.data.split(":", 1)[0]
        need(kind in ("synthetic", "digits", "imagefolder", "cifar10"),
             f"--data {self.data!r}: expected synthetic, digits, imagefolder:DIR or cifar10:DIR")
        if kind in ("imagefolder", "cifar10"):
            need(":" in self.data and self.data.split(":", 1)[1] != "",
                 f"--data {kind} needs a directory: --data {kind}:DIR")
        need(self.image_size >= 8, f"--image-size {self.image_size}: must be at least 8")
        steps = re.fullmatch(r"(\d+):(\d+)", self.profile_steps)
        need(not self.profile_steps or (steps is not None and 1 <= int(steps[1]) <= int(steps[2])),
             f"--profile-steps {self.profile_steps!r}: expected A:B with 1 <= A <= B, e.g. 20:25")
        need(self.profile_ranks == "all" or re.fullmatch(r"\d+(,\d+)*", self.profile_ranks) is not None,
             f"--profile-ranks {self.profile_ranks!r}: expected all or ranks like 0,3")
        need(not self.slow_rank or re.fullmatch(r"\d+:\d+", self.slow_rank) is not None,
             f"--slow-rank {self.slow_rank!r}: expected RANK:MS, e.g. 1:200")
        need(self.decode == "workers" or kind == "imagefolder",
             f"--decode device: only --data imagefolder:DIR has files to decode (not {kind})")
        need(self.synthetic_samples >= 1, "--synthetic-samples must be positive")
        need(self.steps >= 0, f"--steps {self.steps}: must be >= 0")
        need(self.steps > 0 or self.epochs > 0, "--epochs must be positive when --steps is 0")
        need(self.global_batch_size > 0, "--global-batch-size must be positive")
        need(self.grad_accum >= 1, "--grad-accum must be at least 1")
        need(self.global_batch_size % world_size == 0,
             f"--global-batch-size {self.global_batch_size} is not divisible by the world size {world_size}")
        per_rank = self.global_batch_size // world_size
        need(per_rank % self.grad_accum == 0,
             f"--grad-accum {self.grad_accum} does not divide the per-rank batch {per_rank} "
             f"(--global-batch-size {self.global_batch_size} / world size {world_size})")
        # BatchNorm cannot normalise one sample: its variance over a batch of one is zero.
        need(per_rank // self.grad_accum >= 2,
             f"--grad-accum {self.grad_accum}: micro-batches of {per_rank // self.grad_accum} sample per rank "
             f"(--global-batch-size {self.global_batch_size} / world size {world_size} / --grad-accum); "
             "BatchNorm needs at least 2")
        need(self.lr > 0, "--lr must be positive")
        need(0 <= self.momentum < 1, "--momentum must be in [0, 1)")
        need(not self.nesterov or self.momentum > 0, "--nesterov needs --momentum > 0")
        need(self.weight_decay >= 0, "--weight-decay must be >= 0")
        need(self.warmup_steps >= 0, "--warmup-steps must be >= 0")
        need(0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)")
        need(self.clip_grad >= 0, "--clip-grad must be >= 0")
        for name in ("checkpoint_every", "eval_every", "fail_once_at_step", "stall_at_step", "workers"):
            need(getattr(self, name) >= (-1 if name == "workers" else 0), f"--{_flag(name)} must be >= 0")
        need(self.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1")
        need(self.log_every >= 1, "--log-every must be at least 1")
        need(0 <= self.metrics_port <= 65535, f"--metrics-port {self.metrics_port}: must be a port, 1-65535 (0: off)")
        need(self.timeout_s > 0, "--timeout-s must be positive")
        need(self.bucket_cap_mb > 0, "--bucket-cap-mb must be positive")
        need(self.threads >= 0, "--threads must be >= 0 (0: automatic)")
        need(self.powersgd_rank >= 1, "--powersgd-rank must be at least 1")
        if self.resume not in ("auto", "never"):
            need(os.path.isfile(self.resume), f"--resume {self.resume}: no such checkpoint file")
        if self.weights not in ("none", "DEFAULT"):
            need(os.path.isfile(self.weights), f"--weights {self.weights}: no such file")
        for name in ("schedule", "precision", "backend", "comm_hook"):
            choices = _field(name).metadata["choices"]
            need(getattr(self, name) in choices,
                 f"--{_flag(name)} {getattr(self, name)!r}: choose from {', '.join(choices)}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field(name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name)


def field_type(name: str) -> type:
    """The Python type of a TrainConfig field (annotations are strings here)."""
    kind = _field(name).type
    return {"bool": bool, "int": int, "float": float, "str": str}[kind if isinstance(kind, str) else kind.__name__]


def _flag(name: str) -> str:
    return name.replace("_", "-")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints usage + error; on N ranks that is a wall. Print one line instead."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "distributed-step train") -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog=prog, description="Train a DDP ResNet-18 (run under torchrun for several ranks).",
                            argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file with the same keys as the flags; flags override it")
    add_config_flags(parser)
    return parser


def add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One flag per TrainConfig field (or the named ones), with its help and default."""
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        flag, meta = "--" + _flag(f.name), f.metadata
        help_text = argparse.SUPPRESS if meta["debug"] else f"{meta['help']} (default: {f.default})"
        kind = field_type(f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, type=kind, choices=meta["choices"],
                                metavar=None if meta["choices"] else kind.__name__.upper(),
                                help=help_text)


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid YAML{at} ({problem})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: unreadable ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in RUN_FACTS:
            continue  # a run directory's config.yaml can be fed back in as it is
        if name not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        values[name] = _coerce(name, value, path)
    return values


def _coerce(name: str, value: Any, path: str) -> Any:
    """YAML reads `1e-3` as a string and `5` as an int where a float is due: cast to the field's type."""
    kind = _field(name).type
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        # YAML's null would become "None" (a run directory named None), and true/false would
        # pass as 1/0 for a number: both are mistakes, not values.
        if value is None or (kind != "bool") == isinstance(value, bool):
            raise ValueError
        if kind == "int" and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return value if kind == "bool" else {"int": int, "float": float, "str": str}[kind](value)
    except (TypeError, ValueError):
        shown = "null" if value is None else repr(value)
        raise ConfigError(f"--config {path}: {name}: expected {kind}, got {shown}") from None


# Settings a platform sets for every container of a job (a Kubernetes component merges them into
# the job's environment ConfigMap), below --config and the flags.
PLATFORM_ENV = {"metrics_port": "DS_METRICS_PORT"}


def platform_defaults() -> dict:
    values = {}
    for name, variable in PLATFORM_ENV.items():
        text = os.environ.get(variable, "").strip()
        if text:
            try:
                values[name] = field_type(name)(text)
            except ValueError:
                raise ConfigError(f"${variable}={text!r}: expected {field_type(name).__name__} "
                                  f"(it sets --{_flag(name)})") from None
    return values


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < --config YAML < flags. Raises ConfigError; argparse exits 2 on unknown flags."""
    args = vars(build_parser().parse_args(argv))
    values = platform_defaults()
    values.update(load_yaml(args.pop("config")) if "config" in args else {})
    if "steps" in args and "epochs" in args:
        raise ConfigError("give --steps or --epochs, not both")
    values.update(args)
    if "epochs" in args:
        values["steps"] = 0  # --epochs on the command line wins over a YAML `steps`
    return TrainConfig(**values)


# Written next to the configuration in a run's config.yaml (train.Run._announce), not part of it.
RUN_FACTS = ("world_size", "numerics", "comm_hook_chosen", "link")


def save_yaml(config: TrainConfig, path: str, extra: dict) -> None:
    """config.yaml of a run: the configuration and the run facts beside it, readable by --config."""
    if set(extra) - set(RUN_FACTS):  # else --config would refuse the file this writes
        raise ValueError(f"not in RUN_FACTS: {sorted(set(extra) - set(RUN_FACTS))}")
    with open(path, "w") as fh:
        yaml.safe_dump({**config.to_dict(), **extra}, fh, sort_keys=False)
