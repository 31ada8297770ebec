"""Is this job's launcher talking to another host? A positive sign, read from /proc in
milliseconds, that a loopback MASTER_ADDR cannot serve the whole group.

torchrun's agents join their rendezvous over TCP before they start a single rank, and keep
those connections open for the heartbeats. So when the ranks start, the agent (our parent)
holds an established connection to every host taking part: the agent hosting the rendezvous
has the others' connections, each other agent has its own to that host. Ranks that share one
machine (an emulation, or several agents per node) see only this host's addresses there. No
waiting is involved, so ranks that arrive minutes apart cannot be mistaken for a remote host.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct

ESTABLISHED = "01"  # the st column of /proc/net/tcp


def loopback_master_problem(env=os.environ) -> str | None:
    """Why this rank's MASTER_ADDR cannot serve its group, or None. A host name that resolves to
    127.0.x.x on every node makes torchrun hand out a master address that only the ranks on its
    own host can reach; the rest would wait out --timeout-s. Every rank can say so at once when
    its torchrun agent is connected to another host: a positive sign, where a timeout could not
    tell a remote rank from a late one. Reads no more than the environment and /proc."""
    addr = env.get("MASTER_ADDR", "")
    if "TORCHELASTIC_RUN_ID" not in env or not addr or env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE"):
        return None  # not under torchrun, or one agent holds every rank
    loopback = loopback_address(addr)
    elsewhere = launcher_peers_elsewhere() if loopback else []
    if not elsewhere:
        return None
    return (f"MASTER_ADDR={addr} is a loopback address here ({loopback}), but torchrun's agent is connected "
            f"to {', '.join(elsewhere[:3])} on another host, so the ranks there cannot reach it: torchrun hands "
            "out the rendezvous host's name, and it resolves to a loopback address; start torchrun on every "
            "node with --local-addr=<that node's address> (or map the host name to its network address in "
            "/etc/hosts)")


def loopback_address(addr: str) -> str | None:
    """The loopback address `addr` resolves to (127.0.0.1, or Debian's 127.0.1.1 for the host
    name), or None when it is not a loopback address."""
    try:
        resolved = socket.gethostbyname(addr)
        return resolved if ipaddress.ip_address(resolved).is_loopback else None
    except (OSError, ValueError):
        return None


def launcher_peers_elsewhere(pid: int | None = None) -> list[str]:
    """The addresses, on other hosts, that process `pid` (default: our parent, the torchrun
    agent) holds an established TCP connection with. Empty where /proc cannot tell (not Linux,
    another user's process): the caller then keeps its usual timeout."""
    pid = os.getppid() if pid is None else pid
    inodes = _socket_inodes(pid)
    if not inodes:
        return []
    remote = set()
    for table in ("tcp", "tcp6"):
        for addr, state, inode in _connections(f"/proc/{pid}/net/{table}"):
            if state == ESTABLISHED and inode in inodes and not on_this_host(addr):
                remote.add(addr)
    return sorted(remote)


def on_this_host(addr: str) -> bool:
    """Whether `addr` is one of this host's addresses: loopback, or one a socket can bind here
    (the kernel refuses to bind another host's address with EADDRNOTAVAIL)."""
    ip = ipaddress.ip_address(addr)
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((addr, 0))
        return True
    except OSError:
        return False


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def _connections(path: str):
    """(remote address, state, inode) of each row of a /proc/net/tcp{,6} table."""
    try:
        with open(path) as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return
    for row in rows:
        fields = row.split()
        if len(fields) > 9:
            yield decode_address(fields[2].split(":")[0]), fields[3], fields[9]


def decode_address(hex_addr: str) -> str:
    """An address as /proc/net/tcp{,6} prints it (32-bit words in the host's byte order), in
    text; an IPv4-mapped IPv6 address comes back as the IPv4 one."""
    words = [int(hex_addr[i:i + 8], 16) for i in range(0, len(hex_addr), 8)]
    ip = ipaddress.ip_address(struct.pack(f"={len(words)}I", *words))
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped or ip)
