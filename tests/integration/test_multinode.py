"""Two "hosts" (network namespaces joined by a veth pair), each running torchrun with 2 ranks,
rendezvous over c10d. The result must equal a single-node 4-rank run bit for bit: same ranks,
same ring all-reduce, so the network in between must change nothing.
"""
from __future__ import annotations

import subprocess

import torch

from tests.helpers import ADDRS, ROOT, TINY, child_env, load_weights, run_ok, summary, torchrun_cmd

FLAGS = TINY + ["--steps", "4", "--checkpoint-every", "0"]


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
