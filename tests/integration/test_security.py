"""On one host the ranks answer to nobody outside it: every port they listen on is bound to the
loopback interface, so a connection from another host (a network namespace) is refused."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, TINY, child_env, python_cmd

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PROBE = """
import json, socket, sys
out = {}
for port in map(int, sys.argv[2:]):
    try:
        socket.create_connection((sys.argv[1], port), timeout=3).close()
        out[port] = "connected"
    except OSError as exc:
        out[port] = type(exc).__name__
print(json.dumps(out))
"""


def listening(ns: str) -> list[tuple[str, int]]:
    lines = subprocess.run(["ip", "netns", "exec", ns, "ss", "-ltnH"], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    return [(address.rsplit(":", 1)[0], int(address.rsplit(":", 1)[1])) for address in (ln.split()[3] for ln in lines)]


def probe(ns: str, address: str, ports: list[int]) -> dict:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, address, *map(str, ports)],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return {int(k): v for k, v in json.loads(out).items()}


def test_a_one_host_run_listens_on_loopback_only(two_hosts, tmp_path):
    host, other = two_hosts.names
    # A listener on every interface of the host, reachable from the other: the probe can see it.
    control = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-c",
                                "import socket, time; s = socket.create_server(('0.0.0.0', 29777)); time.sleep(600)"])
    ranks = [subprocess.Popen(["ip", "netns", "exec", host, *python_cmd(TINY + ["--steps", "400", "--out",
                                                                                str(tmp_path / "run")])],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=child_env(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT="29500"))
             for r in (0, 1)]
    try:
        deadline = time.time() + 90
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.5)  # the store and gloo's pairs are up once a step is logged
        sockets = [(a, p) for a, p in listening(host) if p != 29777]
        assert (("127.0.0.1", 29500) in sockets) and len(sockets) >= 2, sockets  # the store, gloo's pairs
        assert all(address == "127.0.0.1" for address, _ in sockets), sockets
        answers = probe(other, two_hosts.addrs[0], [port for _, port in sockets] + [29777])
        assert answers.pop(29777) == "connected", "the probe could not reach the host at all"
        assert set(answers.values()) == {"ConnectionRefusedError"}, answers
    finally:
        for proc in ranks:
            proc.send_signal(signal.SIGTERM)
        control.kill()
        for proc in ranks:
            proc.wait(timeout=60)
