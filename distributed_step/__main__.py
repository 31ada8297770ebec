"""`python -m distributed_step SUBCOMMAND` (also the `distributed-step` console script).

    python -m distributed_step train [flags]                               # 1 process
    torchrun --nproc_per_node=4 -m distributed_step train [flags]          # 4 ranks, one node
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29400 --rdzv-id=JOB -m distributed_step train [flags]
"""
from __future__ import annotations

import os
import sys

COMMANDS = ("train", "bench", "plot", "doctor")
USAGE = "usage: distributed-step {train,bench,plot,doctor} [flags]   (distributed-step COMMAND --help)"


def _fail(message: str, code: int) -> int:
    rank = os.environ.get("RANK")
    where = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    print(f"{where}distributed-step: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}; {USAGE}", 2)
    if command != "train":
        return _tool(command, rest)

    from .config import ConfigError, parse_args

    try:
        config = parse_args(rest)  # flag errors exit 2 here, before torch is even imported
    except ConfigError as exc:
        return _fail(str(exc), 2)
    from .dist import RendezvousError
    from .train import TrainingError, train

    try:
        train(config)
    except ConfigError as exc:  # bad input: the message names the flag, path or variable
        return _fail(str(exc), 2)
    except (TrainingError, RendezvousError) as exc:  # the run or the network failed, not the input
        return _fail(str(exc), 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return 0


def _tool(command: str, argv: list[str]) -> int:
    from importlib import import_module

    from .config import ConfigError

    try:
        return import_module(f".{command}", __package__).main(argv)
    except ConfigError as exc:
        return _fail(str(exc), 2)


if __name__ == "__main__":
    sys.exit(main())
