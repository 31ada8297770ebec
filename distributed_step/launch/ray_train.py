"""Run distributed_step's training core on a Ray cluster with Ray Train (TorchTrainer, Train V2).

    distributed-step ray --num-workers 4 [train flags]              # starts or joins a local Ray
    ray job submit --address http://HEAD:8265 -- \\
        distributed-step ray --num-workers 4 --out /shared/runs/r1 [train flags]
    (python -m distributed_step ray ... is the same command where the script is not on PATH)

Ray places the workers, creates the process group (gloo, or nccl with GPUs), and restarts the
workers after a failure (--max-failures). Each worker runs distributed_step.train unchanged;
every checkpoint it writes is also reported to Ray, and a restarted worker group resumes from
the newer of the last one Ray holds and the newest in --out. This launcher is the only place
in the project that imports ray, and only inside functions: the package imports without it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

from distributed_step.config import ConfigError, parse_args  # no torch import: flag errors are instant

RAY_MISSING = 'Ray is not installed: pip install "distributed-step[ray]"'


def launcher_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distributed-step ray", description="Train on a Ray cluster; every other flag goes to `train` "
        "(see python -m distributed_step train --help).")
    p.add_argument("--num-workers", default="2",
                   help="training processes (ranks), or MIN:MAX for an elastic run: Ray starts with as many as "
                        "the cluster fits and grows the group as nodes join (default: 2)")
    p.add_argument("--resize-check-s", type=float, default=60.0,
                   help="elastic runs: seconds between Ray's checks whether more workers fit (default: 60)")
    p.add_argument("--wait-for-resources-s", type=float, default=60.0,
                   help="how long to wait for the cluster to have the CPUs and GPUs of --num-workers (its "
                        "minimum), as an autoscaler adds nodes, before failing (default: 60)")
    p.add_argument("--use-gpu", choices=("auto", "yes", "no"), default="auto",
                   help="one GPU per worker; auto: when the cluster has GPUs (default: auto)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default: 1)")
    p.add_argument("--max-failures", type=int, default=0,
                   help="worker-group restarts Ray may make after a failure (default: 0)")
    p.add_argument("--max-preemptions", type=int, default=-1,
                   help="restarts after a node is preempted, counted apart from --max-failures (-1: no limit)")
    p.add_argument("--preemption-check-every", type=int, default=10,
                   help="steps between asks whether a node is being preempted (a barrier); on a notice "
                        "a checkpoint is saved at once (default: 10)")
    p.add_argument("--storage-path", default=None,
                   help="where Ray persists checkpoints; absolute, on shared storage with several nodes "
                        "(default: --out)")
    p.add_argument("--keep-best", choices=("eval_accuracy", "eval_loss", "loss"), default=None,
                   help="Ray keeps the --keep-checkpoints checkpoints best by this metric (accuracy: highest; "
                        "losses: lowest) instead of the newest; evaluate where you checkpoint (--eval-every)")
    p.add_argument("--name", default="ray", help="Ray Train run name under --storage-path (default: ray)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, a running local one, or start one)")
    return p


def fail(message: str, code: int = 2) -> int:
    print(f"distributed-step ray: error: {message}", file=sys.stderr, flush=True)
    return code


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """ray.init() retries an unreachable cluster for a long time: probe it first, with a deadline."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({exc})") from None


def worker_range(text: str) -> tuple[int, int]:
    """--num-workers N, or MIN:MAX (elastic)."""
    low, _, high = str(text).partition(":")
    try:
        low, high = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"--num-workers {text}: give a count, or MIN:MAX for an elastic run") from None
    if not 1 <= low <= high:
        raise ConfigError(f"--num-workers {text}: needs 1 <= MIN <= MAX")
    return low, high


def validate_every_size(cfg, text: str, low: int, high: int):
    """The flags must hold at every world size an elastic run may take (the global batch divides)."""
    for size in range(low, high + 1):
        try:
            cfg.validate(size)
        except ConfigError as exc:
            raise ConfigError(f"{exc}" if low == high else f"--num-workers {text}: at {size} workers: {exc}") from None
    return cfg


def wait_for_placement(args, timeout_s: float, out: str, storage: str) -> bool:
    """check_placement, retried while the cluster grows (an autoscaler adding nodes), at most
    `timeout_s`; says once what it waits for. Returns use_gpu."""
    import ray

    deadline, said = time.monotonic() + timeout_s, False
    while True:
        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
        try:
            return check_placement(args, ray.cluster_resources(), alive, out, storage)
        except ConfigError as exc:
            if "relative path" in str(exc) or time.monotonic() >= deadline:
                raise
            if not said:
                print(f"distributed-step ray: waiting up to {timeout_s:g} s for the cluster to grow: {exc}",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(2.0)


def check_placement(args, resources: dict, alive_nodes: int, out: str, storage: str) -> bool:
    """Fail before training when the cluster cannot run the job's smallest group; returns use_gpu."""
    use_gpu = args.use_gpu == "yes" or (args.use_gpu == "auto" and resources.get("GPU", 0) > 0)
    workers = worker_range(args.num_workers)[0]
    need_cpu, have_cpu = workers * args.cpus_per_worker, resources.get("CPU", 0)
    if need_cpu > have_cpu:
        raise ConfigError(f"--num-workers {args.num_workers} x --cpus-per-worker {args.cpus_per_worker:g} needs "
                          f"{need_cpu:g} CPUs; the cluster has {have_cpu:g}")
    if use_gpu and workers > resources.get("GPU", 0):
        raise ConfigError(f"--num-workers {args.num_workers} with --use-gpu needs {workers} GPUs; "
                          f"the cluster has {resources.get('GPU', 0):g}")
    if alive_nodes > 1:
        for flag, path in (("--out", out), ("--storage-path", storage)):
            if not os.path.isabs(path):
                raise ConfigError(f"{flag} {path}: a relative path means a different folder on each of the "
                                  f"{alive_nodes} nodes; give an absolute path on shared storage")
    return use_gpu


def train_on_worker(config: dict) -> None:
    """Runs in every Ray Train worker: the same core torchrun runs, with Ray's device."""

    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    from distributed_step.config import TrainConfig
    from distributed_step.observe.evidence import record_failure
    from distributed_step.parallel.preemption import PreemptionNotice
    from distributed_step.train import train

    every, run_dir = config["preemption_check_every"], config["ray_run_dir"]  # the launcher's, not train flags
    cfg = TrainConfig(**{k: v for k, v in config.items() if k not in ("preemption_check_every", "ray_run_dir")})
    rank = ray.train.get_context().get_world_rank()
    asked = []  # seconds of each ask: the barrier's cost, printed at the end

    def imminent() -> bool:
        began = time.perf_counter()
        info = ray.train.get_preemption_info()
        asked.append(time.perf_counter() - began)
        if info is not None:
            print(f"[rank {rank}] distributed-step ray: preemption notice ({info}); saving a checkpoint now",
                  file=sys.stderr, flush=True)
        return info is not None

    logged: dict[int, dict] = {}  # step -> the scalars logged at it (training, then evaluation)

    def on_record(record: dict) -> None:
        """Every log point and evaluation goes to Ray (Result.metrics, the dashboard); each rank
        gets the same records at the same steps, so the reports stay in step across workers."""
        if "loss" not in record and "eval_accuracy" not in record:
            return
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"}
        logged[record["step"]] = merged = {**logged.get(record["step"], {}), **scalars}
        for old in sorted(logged)[:-4]:
            del logged[old]
        ray.train.report(merged)

    def report(path: str, step: int) -> None:
        # With the metrics of the step it holds, so that --keep-best can rank it.
        metrics = {**logged.get(max([s for s in logged if s <= step], default=-1), {}), "step": step}
        if rank != 0:  # every worker reports as often; rank 0 attaches the file
            ray.train.report(metrics)
            return
        if not os.path.exists(path):  # pruned already (--keep-checkpoints 1 and a newer save): nothing to attach
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=ray_checkpoint(path, step, run_dir),
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    def run() -> None:
        try:
            summary = train(cfg, device=ray.train.torch.get_device(), on_checkpoint=report,  # Ray picks our GPU
                            preemption=PreemptionNotice(imminent, every) if every > 0 else None,
                            on_record=on_record)
            if asked and rank == 0:
                print(f"distributed-step ray: asked about preemption {len(asked)} times, "
                      f"{1e3 * sum(asked) / len(asked):.1f} ms each", flush=True)
        except BaseException as exc:
            # Ray logs the traceback; the report in the run directory outlives Ray's session logs.
            path = record_failure(exc, f"{type(exc).__name__}: {exc}", cfg.out)
            if path:
                print(f"[rank {rank}] distributed-step: failure report: {path}", file=sys.stderr, flush=True)
            raise
        if summary.status == "preempted":  # SIGTERM: the checkpoint is saved and reported
            raise StoppedBySigterm(f"stopped by SIGTERM at step {summary.steps}; its checkpoint is saved "
                                   f"and the restarted worker group resumes from it")

    stop_on_sigterm_in_the_actor()
    # Which node holds which rank: what to drain, or to look at, when one misbehaves.
    print(f"[rank {rank}] distributed-step ray: on node {ray.get_runtime_context().get_node_id()}", flush=True)
    restored = ray.train.get_checkpoint()
    if restored is None:
        run()
        return
    with restored.as_directory() as folder:
        cfg.resume = resume_point(folder, cfg.out)
        run()


def ray_checkpoint(path: str, step: int, run_dir: str):
    """The checkpoint file as a Ray Checkpoint, without writing it twice: in a folder of its own in
    Ray's run directory (--storage-path/--name), which Ray registers where it is (NO_UPLOAD; Ray
    takes that only inside its run directory). A hard link where the run directory shares the
    file system of --out (the default), else a copy: the one write that storage needs."""
    import shutil

    import ray.train

    folder = os.path.join(run_dir, f"step_{step:08d}")
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, os.path.basename(path))
    if not os.path.exists(target):
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)
    return ray.train.Checkpoint.from_directory(folder)


class StoppedBySigterm(RuntimeError):
    """Ends a worker that SIGTERM stopped after its checkpoint: returning would end the run."""


def stop_on_sigterm_in_the_actor() -> None:
    """Ray Train runs the training function on a thread of the worker actor, where no signal
    handler can be installed, and Ray's own handler on the actor's main thread exits at once.
    The main thread runs the actor's methods between Ray's polls: have it install the handler
    that turns SIGTERM into a stop request (the ranks agree, save, report, and the group is
    restarted from that checkpoint). RayTrainWorker.execute is Ray Train's; where it is missing,
    SIGTERM ends the worker as before and only the preemption notice saves."""
    import ray

    from distributed_step.parallel.preemption import stop_on_sigterm

    try:
        ray.get(ray.get_runtime_context().current_actor.execute.remote(stop_on_sigterm), timeout=60)
    except Exception as exc:  # noqa: BLE001 - an internal of Ray's: warn, train on
        print(f"distributed-step ray: SIGTERM will not save a checkpoint on this worker ({type(exc).__name__}: "
              f"{str(exc).strip()[:200]})", file=sys.stderr, flush=True)


def resume_point(ray_folder: str, out: str) -> str:
    """--resume for a restarted worker group: Ray's checkpoint, unless --out holds a newer one.
    Ray registers a checkpoint only once it has collected every worker's report of it, so after
    a worker dies Ray's newest can be older than the newest file the core wrote; both are on
    shared storage, so the newer wins and no finished step is lost."""
    from distributed_step.checkpoint import find_newest_valid

    files = sorted(name for name in os.listdir(ray_folder) if name.startswith("step_") and name.endswith(".pt"))
    if not files:
        return "auto"
    ray_step = int(files[-1][len("step_"):-len(".pt")])
    local = find_newest_valid(out)  # (step, path) of the newest that loads: a torn file does not count
    return "auto" if local and local[0] >= ray_step else os.path.join(ray_folder, files[-1])


def main(argv: list[str] | None = None) -> int:
    args, train_argv = launcher_parser().parse_known_args(argv)
    try:
        low, high = worker_range(args.num_workers)
        cfg = validate_every_size(parse_args(train_argv), args.num_workers, low, high)
        if args.preemption_check_every < 0:
            raise ConfigError(f"--preemption-check-every {args.preemption_check_every}: must be >= 0 (0: never ask)")
        if args.resize_check_s <= 0 or args.wait_for_resources_s < 0:
            raise ConfigError(f"--resize-check-s {args.resize_check_s:g} must be > 0 and --wait-for-resources-s "
                              f"{args.wait_for_resources_s:g} >= 0")
        if args.max_preemptions < -1:
            raise ConfigError(f"--max-preemptions {args.max_preemptions}: must be >= 0, or -1 for no limit")
    except ConfigError as exc:
        return fail(str(exc))
    try:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError:
        return fail(RAY_MISSING)
    typed_out, typed_storage = cfg.out, args.storage_path or cfg.out  # as given, for the multi-node check
    cfg.out = os.path.abspath(cfg.out)
    storage = os.path.abspath(typed_storage)
    try:
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            check_reachable(address)
        ray.init(address=address, log_to_driver=True)
        use_gpu = wait_for_placement(args, args.wait_for_resources_s, typed_out, typed_storage)
    except (ConfigError, ConnectionError) as exc:
        return fail(str(exc))
    trainer = TorchTrainer(
        train_on_worker,
        train_loop_config={**cfg.to_dict(), "preemption_check_every": args.preemption_check_every,
                           "ray_run_dir": os.path.join(storage, args.name)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.timeout_s)),
        scaling_config=ScalingConfig(num_workers=low if low == high else (low, high), use_gpu=use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker},
                                     elastic_resize_monitor_interval_s=args.resize_check_s),
        run_config=RunConfig(name=args.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=args.max_failures,
                                                          max_preemption_failures=args.max_preemptions),
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute=args.keep_best,
                                 checkpoint_score_order="max" if args.keep_best == "eval_accuracy" else "min")),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in its own types
        return fail(f"training failed: {str(exc).strip().splitlines()[-1][:300]}", 1)
    print(f"distributed-step ray: done; run directory {cfg.out}; last Ray checkpoint {result.checkpoint}", flush=True)
    shown = {k: result.metrics[k] for k in ("step", "loss", "images_per_s", "eval_accuracy") if k in result.metrics}
    print(f"distributed-step ray: Ray's last metrics {json.dumps(shown)}", flush=True)
    return 0
