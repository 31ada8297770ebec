"""Reading the launcher's connections from /proc (distributed_step/parallel/peers.py): loopback ones are
this host's, and the loopback-master verdict needs torchrun, several agents, a loopback
MASTER_ADDR and a connection elsewhere. The positive case across hosts runs in
tests/integration/test_multinode.py, over network namespaces."""
from __future__ import annotations

import os
import socket
import sys

import pytest

from distributed_step.parallel import peers

TORCHRUN = {"TORCHELASTIC_RUN_ID": "job", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}


def _connected_pair(family: int, host: str):
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen()
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    return server, client, accepted


@pytest.mark.skipif(not os.path.exists("/proc/self/net/tcp"), reason="needs Linux /proc")
@pytest.mark.parametrize("family,host,table", [(socket.AF_INET, "127.0.0.1", "tcp"),
                                                (socket.AF_INET6, "::1", "tcp6")])
def test_this_process_connections_are_found_decoded_and_local(family, host, table):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sockets = _connected_pair(family, host)
    except OSError as exc:
        pytest.skip(f"cannot connect over {host}: {exc}")
    try:
        inodes = peers._socket_inodes(os.getpid())
        pair = {str(os.fstat(sock.fileno()).st_ino) for sock in sockets[1:]}  # this test's two ends
        assert pair <= inodes  # found among the process's sockets (the session may hold others)
        mine = [(addr, state) for addr, state, inode in peers._connections(f"/proc/self/net/{table}")
                if inode in pair]
        assert mine == [(host, peers.ESTABLISHED)] * 2, mine  # both ends, decoded
        assert peers.launcher_peers_elsewhere(os.getpid()) == []
    finally:
        for sock in sockets:
            sock.close()


def _as_proc_prints(packed: bytes) -> str:
    """What the kernel prints for an address: each 32-bit word as a number in host byte order."""
    return "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4))


def test_addresses_decode_from_the_host_byte_order_words_of_proc():
    if sys.byteorder == "little":
        assert peers.decode_address("0100007F") == "127.0.0.1"  # as /proc/net/tcp shows it on x86
    assert peers.decode_address(_as_proc_prints(socket.inet_aton("10.213.77.2"))) == "10.213.77.2"
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.213.77.2")
    assert peers.decode_address(_as_proc_prints(mapped)) == "10.213.77.2"  # a dual-stack socket's peer
    assert peers.decode_address(_as_proc_prints(socket.inet_pton(socket.AF_INET6, "fd00::2"))) == "fd00::2"


def test_only_addresses_this_host_can_bind_are_its_own():
    assert peers.on_this_host("127.0.1.1") and peers.on_this_host("::1") and peers.on_this_host("0.0.0.0")
    assert not peers.on_this_host("203.0.113.9")  # TEST-NET-3: nobody's address


def test_a_loopback_master_is_refused_only_when_the_launcher_talks_to_another_host(monkeypatch):
    monkeypatch.setattr(peers, "launcher_peers_elsewhere", lambda: ["10.0.0.2"])
    problem = peers.loopback_master_problem(TORCHRUN)
    assert "MASTER_ADDR=localhost is a loopback address here (127.0.0.1)" in problem
    assert "connected to 10.0.0.2 on another host" in problem and "--local-addr=<that node's address>" in problem

    assert peers.loopback_master_problem({**TORCHRUN, "LOCAL_WORLD_SIZE": "2"}) is None  # one agent
    assert peers.loopback_master_problem({k: v for k, v in TORCHRUN.items() if k != "TORCHELASTIC_RUN_ID"}) is None
    assert peers.loopback_master_problem({**TORCHRUN, "MASTER_ADDR": "203.0.113.9"}) is None  # routable
    monkeypatch.setattr(peers, "launcher_peers_elsewhere", list)  # agents on one machine
    assert peers.loopback_master_problem(TORCHRUN) is None
