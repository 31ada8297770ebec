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
    p.add_argument("--num-workers", type=int, default=2, help="training processes (ranks) (default: 2)")
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


def check_placement(args, resources: dict, alive_nodes: int, out: str, storage: str) -> bool:
    """Fail before training when the cluster can never run the job; returns use_gpu."""
    use_gpu = args.use_gpu == "yes" or (args.use_gpu == "auto" and resources.get("GPU", 0) > 0)
    need_cpu, have_cpu = args.num_workers * args.cpus_per_worker, resources.get("CPU", 0)
    if need_cpu > have_cpu:
        raise ConfigError(f"--num-workers {args.num_workers} x --cpus-per-worker {args.cpus_per_worker:g} needs "
                          f"{need_cpu:g} CPUs; the cluster has {have_cpu:g}")
    if use_gpu and args.num_workers > resources.get("GPU", 0):
        raise ConfigError(f"--num-workers {args.num_workers} with --use-gpu needs {args.num_workers} GPUs; "
                          f"the cluster has {resources.get('GPU', 0):g}")
    if alive_nodes > 1:
        for flag, path in (("--out", out), ("--storage-path", storage)):
            if not os.path.isabs(path):
                raise ConfigError(f"{flag} {path}: a relative path means a different folder on each of the "
                                  f"{alive_nodes} nodes; give an absolute path on shared storage")
    return use_gpu


def train_on_worker(config: dict) -> None:
    """Runs in every Ray Train worker: the same core torchrun runs, with Ray's device."""
    import shutil

    import ray.train
    import ray.train.torch

    from distributed_step.config import TrainConfig
    from distributed_step.observe.evidence import record_failure
    from distributed_step.parallel.preemption import PreemptionNotice
    from distributed_step.train import train

    every = config["preemption_check_every"]  # the launcher's, not a train flag
    cfg = TrainConfig(**{k: v for k, v in config.items() if k != "preemption_check_every"})
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

    def report(path: str, step: int) -> None:
        # Every worker must call report the same number of times; rank 0 attaches the file.
        if rank != 0:
            ray.train.report({"step": step})
            return
        folder = os.path.join(cfg.out, ".ray_report", f"step_{step:08d}")
        os.makedirs(folder, exist_ok=True)
        shutil.copy2(path, folder)
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(folder))
        shutil.rmtree(folder, ignore_errors=True)

    def run() -> None:
        try:
            summary = train(cfg, device=ray.train.torch.get_device(), on_checkpoint=report,  # Ray picks our GPU
                            preemption=PreemptionNotice(imminent, every) if every > 0 else None)
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
        cfg = parse_args(train_argv).validate(args.num_workers)
        if args.preemption_check_every < 0:
            raise ConfigError(f"--preemption-check-every {args.preemption_check_every}: must be >= 0 (0: never ask)")
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
        alive = sum(1 for node in ray.nodes() if node.get("Alive"))
        use_gpu = check_placement(args, ray.cluster_resources(), alive, typed_out, typed_storage)
    except (ConfigError, ConnectionError) as exc:
        return fail(str(exc))
    trainer = TorchTrainer(
        train_on_worker,
        train_loop_config={**cfg.to_dict(), "preemption_check_every": args.preemption_check_every},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.timeout_s)),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name=args.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=args.max_failures,
                                                          max_preemption_failures=args.max_preemptions),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in its own types
        return fail(f"training failed: {str(exc).strip().splitlines()[-1][:300]}", 1)
    print(f"distributed-step ray: done; run directory {cfg.out}; last Ray checkpoint {result.checkpoint}", flush=True)
    return 0
