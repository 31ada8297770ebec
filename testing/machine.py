"""This machine, as the harnesses and tests see it: the checkout, this interpreter's scripts
(torchrun, kubectl, ray), and a free TCP port on loopback."""
from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# Ports handed out lie below the kernel's ephemeral range: a port from that range, free when it
# is checked, can be taken before its use as the source port of any outgoing connection, and
# tests running side by side open many (gloo pairs, store clients).
PORTS_BELOW_EPHEMERAL = 10_000
_pick = random.Random(os.urandom(8))


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A TCP port on loopback that nothing is bound to, outside the ephemeral range."""
    high = _ephemeral_low()
    low = max(1024, high - PORTS_BELOW_EPHEMERAL)
    for _ in range(200):
        port = _pick.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # all taken: an ephemeral one after all
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
