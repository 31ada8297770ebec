"""Shared by the three test rooms (unit, integration, k8s): start real training processes
(torchrun or plain python) and read what they leave."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testing.machine import BIN, ROOT, free_port  # noqa: F401 - the tests take them from here too

# Small and fast: 32 px images, 3 steps per epoch, a handful of steps.
TINY = ["--data", "synthetic", "--synthetic-samples", "48", "--global-batch-size", "16",
        "--image-size", "32", "--warmup-steps", "0", "--log-every", "1"]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                    "MASTER_", "TORCHELASTIC",
                                                                    "TORCH_DISABLE_SHARE_RDZV"))}
    # No TORCH_DISABLE_SHARE_RDZV_TCP_STORE: restarts must work with the plain torchrun command.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def torchrun_cmd(nproc: int, args: list[str], *torchrun_flags: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *torchrun_flags,
            "-m", "distributed_step", "train", *args]


def python_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "distributed_step", "train", *args]


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("env", child_env())
    cwd = kw.pop("cwd", ROOT)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=cwd, **kw)
    proc.output = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


def run_ok(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    proc = run(cmd, timeout, **kw)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.output[-4000:]}"
    return proc


def run_all_ok(cmds: list[list[str]], timeout: float = 300, at_once: int = 2, **kw) -> list:
    """run_ok for each command, `at_once` of them side by side: a run spends much of its time
    waiting (imports, rendezvous, restarts), so two share the 2 cores well. Results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        return list(pool.map(lambda cmd: run_ok(cmd, timeout, **kw), cmds))


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def network(hosts: int = 2, **kw):
    """Hosts as network namespaces on one switch (testing/netlab.py), removed afterwards whatever
    happens; skipped where namespaces cannot be made (no root, no iproute2)."""
    from testing.netlab import NetlabError, Network, available

    why = available()
    if why:
        pytest.skip(why)
    try:
        return Network(hosts, **kw).__enter__()
    except NetlabError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")


def shape_or_skip(net, rate: str) -> None:
    """Shape every link of `net` to `rate`; skip where this kernel has no tbf qdisc."""
    from testing.netlab import NetlabError

    try:
        net.shape(rate)
    except NetlabError as exc:
        pytest.skip(f"cannot shape links here: {exc}")
