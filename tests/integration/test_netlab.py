"""The emulated network itself (testing/netlab.py): whatever ends the process that made
it, no namespace, no process inside one and no /etc/netns file is left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from testing import netlab
from tests.helpers import ROOT

pytestmark = pytest.mark.netns

# Makes two hosts with a process running on one, prints the names and that pid, then waits.
OWNER = """
import sys, time
from testing.netlab import Network
net = Network(2).__enter__()
sleeper = net.popen(0, ["sleep", "300"])
print(" ".join([*net.names, net.switch]), sleeper.pid, flush=True)
time.sleep(300)
"""


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def start_owner() -> tuple[subprocess.Popen, list[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    *names, pid = proc.stdout.readline().split()
    assert len(names) == 3 and set(names) <= namespaces()
    return proc, names, int(pid)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status waits for init, which may be slow to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone(names: list[str], pid: int) -> bool:
    return (not set(names) & namespaces() and not running(pid)
            and not any(os.path.exists(f"/etc/netns/{name}") for name in names))


def test_a_terminated_or_killed_owner_leaves_nothing_behind():
    proc, names, sleeper = start_owner()
    proc.send_signal(signal.SIGTERM)  # as pytest's runner or a CI job timeout would
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert gone(names, sleeper)

    # SIGKILL runs no cleanup at all: the namespaces outlive their owner, named by its pid ...
    proc, names, sleeper = start_owner()
    proc.kill()
    proc.wait(timeout=30)
    assert set(names) <= namespaces()
    # ... so the next network made on this machine sweeps them, and removes its own when done.
    with netlab.Network(1) as net:
        assert gone(names, sleeper)
        assert net.names[0] in namespaces() and not set(net.names) & set(names)
    assert not set(net.names) & namespaces()


def test_rates_are_checked_and_delay_names_what_it_needs():
    assert netlab.rate_bits("1gbit") == 1e9 and netlab.rate_bits("2.5Gbit") == 2.5e9
    with pytest.raises(netlab.NetlabError, match="link rate '1 gigabit'"):
        netlab.rate_bits("1 gigabit")
    with netlab.Network(1) as net:
        try:
            net.shape("1gbit", delay_ms=1)
        except netlab.NetlabError as exc:  # this project's VM: its kernel has tbf, not netem
            assert "netem" in str(exc) and "rate" in str(exc)
        else:
            tc = subprocess.run(["ip", "netns", "exec", net.names[0], "tc", "qdisc", "show", "dev", "ds0"],
                                capture_output=True, text=True, check=True).stdout
            assert "netem" in tc and "tbf" in tc
