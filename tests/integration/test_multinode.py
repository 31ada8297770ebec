"""Several hosts (network namespaces on one switch: testing/netlab.py), each running
torchrun, rendezvous over c10d. The network in between must change the time, never the math:
two nodes of 2 ranks equal one node of 4 bit for bit (same ranks, same ring all-reduce), over
a link shaped to 1 Gbit/s as over an unshaped one."""
from __future__ import annotations

import json
import re
import statistics
import sys
import time

import pytest
import torch
import yaml

from tests.helpers import TINY, child_env, load_weights, metrics, network, run_ok, shape_or_skip, summary, torchrun_cmd

pytestmark = [pytest.mark.netns, pytest.mark.slow]

FLAGS = TINY + ["--steps", "4", "--checkpoint-every", "0"]
TRAIN = ["-m", "distributed_step", "train"]


def two_node_run(net, out, *extra: str) -> None:
    procs = net.torchrun(2, TRAIN + FLAGS + ["--out", str(out), *extra], run_id=out.name, env=child_env())
    outputs = net.wait(procs, timeout=240)
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    assert summary(out)["world_size"] == 4


def test_two_nodes_match_one_node_over_fast_and_slow_links(two_hosts, tmp_path):
    single = tmp_path / "one_node"
    run_ok(torchrun_cmd(4, FLAGS + ["--out", str(single)]))
    reference = load_weights(single / "model.pt")

    # --socket-ifname: gloo advertises the named interface's address, whatever the name resolves to
    two_node_run(two_hosts, tmp_path / "unshaped", "--socket-ifname", "ds0")
    weights = load_weights(tmp_path / "unshaped" / "model.pt")
    assert all(torch.equal(reference[k], weights[k]) for k in reference)

    shape_or_skip(two_hosts, "1gbit")
    sent_before = two_hosts.sent_bytes(1)
    two_node_run(two_hosts, tmp_path / "1gbit")  # the host name resolves to the host's address here
    weights = load_weights(tmp_path / "1gbit" / "model.pt")
    assert all(torch.equal(reference[k], weights[k]) for k in reference)
    # The gradients really crossed the shaped link: a ring all-reduce sends each node's share of
    # them through it at every step (and the first broadcast sends the weights).
    gradient_bytes = sum(v.numel() * v.element_size() for v in weights.values() if v.is_floating_point())
    assert two_hosts.sent_bytes(1) - sent_before > 4 * gradient_bytes / 2


def test_auto_takes_bf16_on_a_1gbit_link(two_hosts, tmp_path):
    """At 32 px the step is short and a 1 Gbit/s wire is long: exact would wait, auto compresses,
    and says why in metrics.jsonl and config.yaml."""
    shape_or_skip(two_hosts, "1gbit")
    two_node_run(two_hosts, tmp_path / "auto", "--comm-hook", "auto")
    chosen = [r for r in metrics(tmp_path / "auto") if "comm_hook" in r]
    assert len(chosen) == 1 and chosen[0]["comm_hook"] == "bf16", chosen
    assert chosen[0]["link_exposed_share"] > 0.05 and chosen[0]["link_bus_gbit_s"] < 2.0
    config = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert config["comm_hook"] == "auto" and config["comm_hook_chosen"] == "bf16"
    assert config["link"]["exposed_ms"] == chosen[0]["link_exposed_ms"]

    # doctor, one rank per host over the same link and for the same step (its default batch of 128
    # makes a step long enough to hide the wire on a fast day): the bandwidth, and the same advice
    procs = two_hosts.torchrun(1, ["-m", "distributed_step", "doctor", "--repeats", "2", "--image-size", "32",
                                   "--global-batch-size", "16"], run_id="doctor", env=child_env())
    report = two_hosts.wait(procs, timeout=240)
    assert all(p.returncode == 0 for p in procs), report
    between = re.search(r"OK\s+between hosts \(one rank each\): all-reduce bus bandwidth ([\d.]+) Gbit/s",
                        "".join(report))
    assert between and 0.3 < float(between.group(1)) < 1.05, report
    assert "recommended --comm-hook bf16" in "".join(report), report
    # the hosts' veth claims 10 Gbit/s whatever is behind it: no "under half the link speed" advice
    assert "ds0 is a virtual interface" in "".join(report) and "under half" not in "".join(report), report


def test_a_loopback_master_across_hosts_is_named_at_once_and_one_host_is_not(tmp_path):
    """Each host's name resolves to 127.0.0.1 and torchrun gets no --local-addr, so it hands the
    ranks MASTER_ADDR=localhost, which only the first host's ranks could reach. Every rank says
    so, naming --local-addr, in seconds (not after --timeout-s), because its torchrun agent is
    connected to the other host. Two agents on one host, with the same loopback name and the
    rendezvous on the host's own network address, are not refused: they train."""
    net = network(2, name_resolves_to="loopback")
    try:
        began = time.monotonic()
        args = TRAIN + FLAGS + ["--timeout-s", "120"]
        procs = net.torchrun(1, args + ["--out", str(tmp_path / "hosts")], run_id="hosts", local_addr=False,
                             env=child_env())
        outputs = net.wait(procs, timeout=150)
        took = time.monotonic() - began
        same = net.torchrun(1, args + ["--out", str(tmp_path / "one")], run_id="one", local_addr=False,
                            on=[0, 0], env=child_env())
        same_outputs = net.wait(same, timeout=240)
    finally:
        net.close()
    for proc, output in zip(procs, outputs):
        assert proc.returncode != 0, output[-3000:]
        assert "MASTER_ADDR=localhost is a loopback address here" in output, output[-3000:]
        assert "connected to 10.213.77." in output and "--local-addr=<that node's address>" in output
    assert took < 60, took  # two hosts' imports, never the 120 s of --timeout-s
    for proc, output in zip(same, same_outputs):
        assert proc.returncode == 0, output[-3000:]
    assert summary(tmp_path / "one")["world_size"] == 2


def test_a_host_lost_with_every_process_costs_at_most_the_step_it_interrupted(two_hosts, tmp_path):
    """Every process of host 1 SIGKILLed mid-run (its torchrun agent and its rank): host 0's rank
    saves the last finished step (recovery.py), its agent restarts and waits in the rendezvous, a
    replacement agent on host 1 rejoins, and both resume from that step to the weights of an
    uninterrupted run (same ranks on one host)."""
    flags = TINY + ["--steps", "8", "--checkpoint-every", "0"]
    reference = tmp_path / "one_host"
    run_ok(torchrun_cmd(2, flags + ["--out", str(reference)]))
    out, env = tmp_path / "two_hosts", child_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # as docs/launching.md
    argv = TRAIN + flags + ["--out", str(out)]
    first = two_hosts.torchrun(1, argv, run_id="lost", torchrun_flags=("--max-restarts=1",), env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not [m for m in metrics_or_none(out) if m.get("step", 0) >= 3]:
        time.sleep(0.1)
    assert two_hosts.kill_host(1) >= 2  # the agent and its rank
    killed_at = time.time()
    second = two_hosts.torchrun(1, argv, run_id="lost", on=[1], nnodes=2, rendezvous_host=0, env=env)
    outputs = two_hosts.wait([first[0], *second], timeout=240)
    assert first[0].returncode == 0 and second[0].returncode == 0, outputs[0][-3000:] + outputs[1][-3000:]
    said = re.search(r"a peer failed; (?:saved )?the last finished step, (\d+)", outputs[0])
    assert said, outputs[0][-3000:]
    result = summary(out)
    assert result["steps"] == 8 and result["resumed_from"].endswith(f"step_{int(said[1]):08d}.pt")
    assert int(said[1]) >= 3  # nothing finished before the kill was lost
    a, b = load_weights(reference / "model.pt"), load_weights(out / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    first_new = next(m["time"] for m in metrics(out) if m.get("step") == int(said[1]) + 1 and "loss" in m)
    print(f"host 1 lost at step {said[1]}: first new step {first_new - killed_at:.1f} s later")


def metrics_or_none(out) -> list[dict]:
    try:
        return metrics(out)
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
        return []


def test_the_plan_from_a_two_host_calibration_predicts_the_two_host_step(two_hosts, tmp_path):
    """`calibrate` over a 1 Gbit/s link (the link fitted from real all-reduces), then `plan` for
    the same two hosts against a real training run's step there (docs/planning.md has the wider
    validation). On this machine the step is CPU compute plus a wire that backward cannot hide."""
    shape_or_skip(two_hosts, "1gbit")
    size = ["--global-batch-size", "32", "--image-size", "32"]
    cal = tmp_path / "cal.json"
    procs = two_hosts.torchrun(1, ["-m", "distributed_step", "calibrate", "--out", str(cal), *size],
                               run_id="calibrate", env=child_env())
    outputs = two_hosts.wait(procs, timeout=300)
    assert all(p.returncode == 0 for p in procs), outputs
    link = json.loads(cal.read_text())["link"]
    assert link["ranks"] == 2 and link["per_host"] == 1 and 0.08 < link["bus_gbyte_s"] < 0.13, link  # 1 Gbit/s
    out = tmp_path / "run"
    procs = two_hosts.torchrun(1, TRAIN + ["--data", "synthetic", "--synthetic-samples", "640", *size, "--steps", "14",
                                           "--log-every", "1", "--warmup-steps", "0", "--checkpoint-every", "0",
                                           "--out", str(out)], run_id="run", env=child_env())
    outputs = two_hosts.wait(procs, timeout=300)
    assert all(p.returncode == 0 for p in procs), outputs
    measured = statistics.median(m["step_ms"] for m in metrics(out) if "step_ms" in m and m["step"] > 2)
    plan_json = tmp_path / "plan.json"
    run_ok([sys.executable, "-m", "distributed_step", "plan", "--calibration", str(cal), "--gpus", "2",
            "--interconnect", "measured", "--json", str(plan_json)])
    (row,) = json.loads(plan_json.read_text())["rows"]
    assert row["exposed_s"] > 0.05  # the wire is longer than backward here: the model must see it
    assert abs(1e3 * row["step_s"] / measured - 1) < 0.2, (row, measured)
