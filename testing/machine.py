"""This machine, as the harnesses and tests see it: the checkout, this interpreter's scripts
(torchrun, kubectl, ray), and a free TCP port on loopback."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
