"""`python -m distributed_step SUBCOMMAND` (also the `distributed-step` console script).

    python -m distributed_step train [flags]                               # 1 process
    torchrun --nproc_per_node=4 -m distributed_step train [flags]          # 4 ranks, one node
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29400 --rdzv-id=JOB -m distributed_step train [flags]
    python -m distributed_step ray --num-workers 4 [flags]                # Ray Train (the [ray] extra)
    python -m distributed_step bench | doctor | calibrate | plan | plot   # the tools (tools/)
"""
from __future__ import annotations

import os
import re
import sys
import time

# Every command but train is a module with main(argv) -> exit code.
TOOLS = {"bench": "tools.bench", "plot": "tools.plot", "doctor": "tools.doctor", "calibrate": "tools.calibrate",
         "plan": "tools.plan", "ray": "launch.ray_train"}
COMMANDS = ("train", *TOOLS)
# Errors a rank only has because another rank failed (see main()).
CONSEQUENCES, CONSEQUENCE_DELAY_S = ("a collective failed", "stopped by the launcher"), 3.0
# How long a rank that finds a loopback master across hosts waits before it exits (see main()).
LOOPBACK_LINGER_S = 5.0
USAGE = ("usage: distributed-step {train,bench,plot,doctor,calibrate,plan,ray} [flags]   "
         "(distributed-step COMMAND --help)")


def _fail(message: str, code: int) -> int:
    rank = os.environ.get("RANK")
    where = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    # One write, newline included: under PYTHONUNBUFFERED=1 (as the operators set it) print()
    # writes the text and the newline separately, and two ranks' errors then merge on one line.
    sys.stderr.write(f"{where}distributed-step: error: {message}\n")
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}; {USAGE}", 2)
    if command in ("train", "bench", "doctor") and (code := _unreachable_master()):
        return code
    if command != "train":
        return _tool(command, rest)

    from distributed_step.config import ConfigError, parse_args

    try:
        config = parse_args(rest)  # flag errors exit 2 here, before torch is even imported
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from distributed_step.observe.evidence import record_failure
    from distributed_step.train import train

    try:
        train(config)
    except BaseException as exc:  # noqa: BLE001 - every failure ends as one line and an exit code
        message, code = _explain(exc, config)
        consequence = message.startswith(CONSEQUENCES)
        report = None if consequence else record_failure(exc, message, config.out)
        _fail(message + (f" (report: {report})" if report else ""), code)
        sys.stderr.flush()
        sys.stdout.flush()
        if consequence:
            # Another rank failed first. Its launcher must see that rank's failure first:
            # torchrun names as root cause the earliest failure (error-file timestamps, to the
            # second) and would otherwise blame whichever rank it lists first. It usually stops
            # this rank meanwhile; if not, this rank's report comes seconds later.
            time.sleep(CONSEQUENCE_DELAY_S)
            record_failure(exc, message, config.out)
        # Out at once: a normal exit would join DataLoader workers that ignore SIGTERM (so that
        # a preempted step can finish), and this rank would hang while the others wait for it
        # in a collective. Exiting lets gloo tell the other ranks within seconds.
        os._exit(code)
    return 0


def _unreachable_master() -> int | None:
    """Exit code 2 when MASTER_ADDR is a loopback address and the group spans hosts (peers.py),
    told before torch is imported, so that every host's ranks can say it before the rendezvous
    host's launcher, seeing its own ranks fail, closes the rendezvous and has the others killed.
    Lingering keeps this host's launcher (and its rendezvous) up while the others speak."""
    from distributed_step.parallel.peers import loopback_master_problem

    problem = loopback_master_problem()
    if problem is None:
        return None
    _fail(problem, 2)
    time.sleep(LOOPBACK_LINGER_S)
    return 2


def _explain(exc: BaseException, config) -> tuple[str, int]:
    """(one line, exit code) for a failure of `train`: 2 for bad input, 1 for the rest."""
    from distributed_step.config import ConfigError
    from distributed_step.outcome import TrainingError
    from distributed_step.parallel.preemption import sigterm_received
    from distributed_step.parallel.process_group import RendezvousError, is_peer_failure

    if isinstance(exc, ConfigError):  # bad input: the message names the flag, path or variable
        return str(exc), 2
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, (TrainingError, RendezvousError)):
        return str(exc), 1
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:  # a DataLoader worker's exception arrives with its traceback: keep the error
        text = re.sub(r"^[A-Za-z_][\w.]*: ", "", lines[-1])
    if "out of memory" in text.lower() or "can't allocate memory" in text:
        per_rank = config.global_batch_size // int(os.environ.get("WORLD_SIZE", "1") or 1)
        return (f"out of memory at --image-size {config.image_size} with {per_rank} images per rank "
                f"(--global-batch-size {config.global_batch_size}): lower one of them ({text[:160]})"), 1
    if is_peer_failure(exc):
        return (f"a collective failed: another rank stopped or the network broke; the first rank's error "
                f"is the cause ({text[:200]})"), 1
    if sigterm_received():  # the launcher is stopping this rank: whatever broke, broke because of it
        return f"stopped by the launcher (SIGTERM), after which: {type(exc).__name__}: {text[:200]}", 1
    if type(exc).__name__ == "UnreadableImage" or "unreadable image" in text:
        return text, 2
    # Not a failure we know: a bug, so its traceback is worth the lines.
    import traceback

    traceback.print_exception(exc, file=sys.stderr)
    return f"{type(exc).__name__}: {text[:300]}", 1


def _tool(command: str, argv: list[str]) -> int:
    from importlib import import_module

    from distributed_step.config import ConfigError

    try:
        return import_module(f"{__package__}.{TOOLS[command]}").main(argv)
    except ConfigError as exc:
        return _fail(str(exc), 2)


if __name__ == "__main__":
    sys.exit(main())
