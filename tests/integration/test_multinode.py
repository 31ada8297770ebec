"""Two "hosts" (network namespaces joined by a veth pair), each running torchrun with 2 ranks,
rendezvous over c10d. The result must equal a single-node 4-rank run bit for bit: same ranks,
same ring all-reduce, so the network in between must change nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest
import torch

from tests.helpers import ROOT, TINY, child_env, load_weights, run_ok, summary, torchrun_cmd

FLAGS = TINY + ["--steps", "4", "--checkpoint-every", "0"]
ADDRS = ("10.213.77.1", "10.213.77.2")  # only inside the namespaces this test creates


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip netns)")
    tag = uuid.uuid4().hex[:6]
    hosts = (f"ds-a-{tag}", f"ds-b-{tag}")
    try:
        for ns in hosts:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", f"dsa{tag}", "type", "veth", "peer", "name", f"dsb{tag}")
        for ns, dev, addr in zip(hosts, (f"dsa{tag}", f"dsb{tag}"), ADDRS):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "link", "set", dev, "name", "ds0")  # the same name on both hosts
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "ds0")
            _ip("-n", ns, "link", "set", "ds0", "up")
    except subprocess.CalledProcessError as exc:
        for ns in hosts:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
    yield hosts
    for ns in hosts:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def test_two_nodes_over_c10d_match_one_node(two_hosts, tmp_path):
    single = tmp_path / "one_node"
    run_ok(torchrun_cmd(4, FLAGS + ["--out", str(single)]))

    multi = tmp_path / "two_nodes"
    procs = []
    for node, (ns, addr) in enumerate(zip(two_hosts, ADDRS)):
        host_flags = ["--rdzv-conf=is_host=true"] if node == 0 else []
        # --socket-ifname: gloo must advertise the veth address, not what the hostname resolves to
        cmd = torchrun_cmd(2, FLAGS + ["--out", str(multi), "--socket-ifname", "ds0"], "--nnodes=2",
                           "--rdzv-backend=c10d", f"--rdzv-endpoint={ADDRS[0]}:29400", "--rdzv-id=netns-test",
                           f"--local-addr={addr}", *host_flags)
        cmd.remove("--standalone")
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=ROOT, env=child_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert summary(multi)["world_size"] == 4
    # the workers really talked across the veth pair: both hosts' addresses served ranks
    a, b = load_weights(single / "model.pt"), load_weights(multi / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
