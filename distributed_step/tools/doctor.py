"""`python -m distributed_step doctor`: a preflight for a new machine or cluster.

    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
             -m distributed_step doctor
    python -m distributed_step doctor          # one process: device, threads, /dev/shm, one step

Every rank joins the group, then rank 0 prints one line per check: OK, or WARN with what to do.
Checks: backend and device per rank, hosts, time to rendezvous, all-reduce bandwidth at the size
of the model's gradients against what the link should give, /dev/shm, threads against cores,
whether the ranks of a host are pinned to disjoint cores; per rank, against the others (the
straggler rule of `train`: 1.15x off the lower median), its own training step, matmul and memory
copy speed; the all-reduce within each host against the best host's; and whether every rank
holds identical parameters after one real training step. Across hosts: the all-reduce bandwidth
between them (one rank per host), and the --comm-hook that `auto` would choose for the step of
--image-size and --global-batch-size (parallel/hook_policy.py: exact unless over 5% of the step would
wait). The exit code is 1 when a check fails outright (replicas differ), else 0.
"""
from __future__ import annotations

import argparse
import os
import socket
import time

import torch
from torch import nn

from distributed_step.config import OneLineErrorParser, TrainConfig, add_config_flags
from distributed_step.data.datasets import synthetic_batch
from distributed_step.model import build_model
from distributed_step.observe.clock import PhaseClock
from distributed_step.observe.stragglers import THRESHOLD, lower_median
from distributed_step.optim import sgd
from distributed_step.parallel import ddp, hook_policy, placement
from distributed_step.parallel.process_group import (
    all_gather_object,
    detect,
    setup,
    state_digest,
    teardown,
    time_all_reduce,
)
from distributed_step.step import train_step

SHM_MIN_BYTES = 1 << 30  # DataLoader workers pass batches through /dev/shm; pods default to 64 MB
# Lowest bus bandwidth we accept where no link speed can be read (same host, shared memory or
# loopback TCP): a healthy machine gives several GB/s; below this something is misconfigured.
SAME_HOST_MIN_GBPS = 0.5


def _is_virtual(ifname: str) -> bool:
    """A veth, bridge, tunnel or loopback: no device behind it in sysfs. Its nominal speed (10
    Gbit/s for a veth, as in every Kubernetes pod) says nothing about the wire it leads to."""
    return bool(ifname) and not os.path.exists(f"/sys/class/net/{ifname}/device")


def _link_gbps(ifname: str) -> float | None:
    """Rated speed of a network interface in GB/s (sysfs reports Mbit/s), if the kernel knows."""
    try:
        with open(f"/sys/class/net/{ifname}/speed") as fh:
            mbit = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    return mbit / 8 / 1000 if mbit > 0 else None


def _route_ifname(addr: str) -> str:
    """The interface traffic to `addr` leaves by (the first hop's interface in /proc/net/route)."""
    explicit = os.environ.get("NCCL_SOCKET_IFNAME") or os.environ.get("GLOO_SOCKET_IFNAME")
    if explicit:
        return explicit.split(",")[0]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr, 9))
            local = s.getsockname()[0]
        import fcntl
        import struct

        for ifname in os.listdir("/sys/class/net"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                try:
                    packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", ifname[:15].encode()))
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == local:
                    return ifname
    except (OSError, ImportError):
        pass
    return ""


class Report:
    def __init__(self):
        self.lines: list[str] = []
        self.failed = False

    def ok(self, text: str) -> None:
        self.lines.append(f"OK    {text}")

    def warn(self, text: str, todo: str) -> None:
        self.lines.append(f"WARN  {text} -> {todo}")

    def fail(self, text: str, todo: str) -> None:
        self.failed = True
        self.lines.append(f"FAIL  {text} -> {todo}")


def _facts(env, rendezvous_s: float) -> dict:
    pinned = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {"rank": env.rank, "host": socket.gethostname(), "device": str(env.device), "backend": env.backend,
            "pinned": pinned,
            "threads": torch.get_num_threads(), "cores": placement.usable_cores(), "local_world": env.local_world_size,
            "rendezvous_s": rendezvous_s, "shm_bytes": _shm_bytes(),
            "gpu": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else ""}


def _shm_bytes() -> int:
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return st.f_frsize * st.f_blocks


def _bandwidth(env, numel: int, repeats: int) -> tuple[float, float]:
    """(seconds per all-reduce, bus GB/s) for a float32 tensor of `numel` elements, all ranks."""
    seconds = time_all_reduce(numel, env.device, None, repeats)
    return seconds, _bus_gbps(numel, env.world_size, seconds)


def _bus_gbps(numel: int, n: int, seconds: float) -> float:
    """Ring all-reduce moves 2(n-1)/n of the float32 buffer through each link: the "bus
    bandwidth", in GB/s, comparable across group sizes and with a link's rated speed."""
    return 4 * numel * 2 * (n - 1) / n / seconds / 1e9


def _device_speed(env) -> dict:
    """This rank's device: matmul GFLOP/s and copy GB/s (the same code on CPU tensors and GPUs)."""
    cuda = env.device.type == "cuda"
    n, dtype, size = (4096, torch.bfloat16, 1 << 28) if cuda else (384, torch.float32, 1 << 24)
    a = torch.randn(n, n, device=env.device, dtype=dtype)
    src, dst = torch.empty(size, dtype=torch.uint8, device=env.device), torch.empty(size, dtype=torch.uint8,
                                                                                     device=env.device)

    def timed(fn, repeats: int) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize(env.device)
        began = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize(env.device)
        return (time.perf_counter() - began) / repeats

    matmul_s = timed(lambda: a @ a, 10)
    copy_s = timed(lambda: dst.copy_(src), 10)
    return {"gflops": 2 * n ** 3 / matmul_s / 1e9, "copy_gbps": 2 * size / copy_s / 1e9}


def _own_step_ms(env, cfg: TrainConfig, net: nn.Module) -> float:
    """This rank's own training step (no gradient all-reduce), ms: the compute a straggler lacks."""
    optimizer = sgd(net.parameters(), 0.0, 0.0, fused=cfg.fused_sgd)  # lr 0: the weights stay as they are
    images, labels = synthetic_batch(8, cfg.image_size, 10, env.device, seed=0)
    clock, loss = PhaseClock(env.device), nn.CrossEntropyLoss()
    times = []
    for _ in range(4):
        began = time.perf_counter()
        clock.start()
        train_step(net, optimizer, images, labels, loss, clock)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        times.append(time.perf_counter() - began)
    return 1e3 * sorted(times[1:])[1]  # the median of three, after a warm-up step


def _per_host_bandwidth(env, facts: list[dict], numel: int, repeats: int) -> float | None:
    """Bus GB/s of an all-reduce among this host's ranks (None alone on the host). Every rank
    creates every host's group, in the same order, as new_group requires."""
    hosts = sorted({f["host"] for f in facts})
    mine = None
    for host in hosts:
        ranks = [f["rank"] for f in facts if f["host"] == host]
        group = torch.distributed.new_group(ranks)
        if env.rank in ranks and len(ranks) > 1:
            mine = (group, len(ranks))
    if mine is None:
        return None
    group, n = mine
    return _bus_gbps(numel, n, time_all_reduce(numel, env.device, group, repeats))


def _between_hosts_gbit(env, facts: list[dict], repeats: int) -> float | None:
    """Bus Gbit/s of a 25 MB all-reduce among the first rank of every host: the links between
    hosts alone, without the ranks that share a host. Every rank creates the group."""
    firsts = sorted({f["host"]: f["rank"] for f in reversed(facts)}.values())
    group = torch.distributed.new_group(firsts)
    if env.rank not in firsts:
        return None
    numel = 25 * 2**20 // 4
    return 8 * _bus_gbps(numel, len(firsts), time_all_reduce(numel, env.device, group, repeats))


def _compare_ranks(report: Report, facts: list[dict], key: str, what: str, unit: str, higher_is_better: bool,
                   todo: str) -> None:
    """One line: the ranks' figure against the lower median, with the straggler rule of `train`."""
    values = [f[key] for f in facts]
    median = lower_median(values)
    off = [f for f in facts if (median / f[key] if higher_is_better else f[key] / median) >= THRESHOLD]
    line = f"{what} per rank: {min(values):.1f}-{max(values):.1f} {unit} (median {median:.1f})"
    if off:
        names = ", ".join(f"rank {f['rank']} on {f['host']} ({f[key]:.1f})" for f in off)
        report.warn(f"{line}; off the median by {THRESHOLD:.2f}x or more: {names}", todo)
    else:
        report.ok(line)


def _one_step_digest(env, cfg: TrainConfig, net: nn.Module) -> str:
    model = ddp.wrap(net, env, cfg)
    optimizer = sgd(net.parameters(), 0.1, 0.9, fused=cfg.fused_sgd)
    images, labels = synthetic_batch(4, cfg.image_size, 10, env.device, seed=1000 + env.rank)  # each rank its own
    clock = PhaseClock(env.device)
    clock.start()
    train_step(model, optimizer, images, labels, nn.CrossEntropyLoss(), clock)
    return state_digest(dict(net.named_parameters()))


def run_checks(cfg: TrainConfig, repeats: int) -> Report | None:
    world = detect()
    began = time.perf_counter()
    env = setup(world, cfg.backend, cfg.timeout_s, cfg.socket_ifname)
    rendezvous_s = time.perf_counter() - began
    try:
        placement.place(cfg, env)  # as `train` would: threads and pinned cores
        facts = all_gather_object(_facts(env, rendezvous_s), env)
        torch.manual_seed(cfg.seed)
        net = build_model(10).to(env.device)
        numel = sum(p.numel() for p in net.parameters())
        timing = _bandwidth(env, numel, repeats) if env.distributed else None
        local_gbps = _per_host_bandwidth(env, facts, numel, repeats) if env.distributed else None
        mine = {"rank": env.rank, "host": socket.gethostname(), "local_gbps": local_gbps,
                "step_ms": _own_step_ms(env, cfg, net), **_device_speed(env)}
        speeds = all_gather_object(mine, env)
        between = _between_hosts_gbit(env, facts, repeats) if len({f["host"] for f in facts}) > 1 else None
        advice = hook_policy.measure(net, env.world_size, env.device, cfg) if env.distributed else None
        digests = all_gather_object(_one_step_digest(env, cfg, net), env)
    finally:
        teardown(env)
    if env.rank != 0:
        return None
    report = Report()
    hosts = sorted({f["host"] for f in facts})
    report.ok(f"{env.world_size} rank(s) on {len(hosts)} host(s): {', '.join(hosts)}; backend {env.backend}")
    for f in facts:
        where = f"rank {f['rank']} on {f['host']}: {f['device']}{' (' + f['gpu'] + ')' if f['gpu'] else ''}"
        if env.backend == "nccl" and f["device"] == "cpu":
            report.fail(where, "nccl needs a GPU on every rank; use --backend gloo on CPU hosts")
        elif f["device"] == "cpu" and torch.cuda.is_available():
            report.warn(where, "a GPU is visible but unused; check CUDA_VISIBLE_DEVICES and LOCAL_RANK")
    cuda_devices = [(f["host"], f["device"]) for f in facts if f["device"] != "cpu"]
    if len(set(cuda_devices)) != len(cuda_devices):
        report.fail("two ranks share one GPU", "start one rank per GPU (torchrun --nproc_per_node=GPUS)")
    slowest = max(f["rendezvous_s"] for f in facts)
    line = f"rendezvous took {slowest:.2f} s (slowest rank)"
    (report.ok(line) if slowest < 60 else
     report.warn(line, "slow: check that every node reaches MASTER_ADDR and the rendezvous port"))
    if timing is not None:
        seconds, bus_gbps = timing
        line = (f"all-reduce of {4 * numel / 1e6:.1f} MB (the model's gradients): {seconds * 1e3:.1f} ms, "
                f"bus bandwidth {bus_gbps:.2f} GB/s")
        ifname = _route_ifname(os.environ.get("MASTER_ADDR", "127.0.0.1")) if len(hosts) > 1 else ""
        link = _link_gbps(ifname)
        if _is_virtual(ifname):
            report.ok(line + f" ({ifname} is a virtual interface: no rated speed to hold it to; "
                             "the between-hosts line measures the wire)")
        elif link is not None:
            line += f" (link {link:.2f} GB/s)"
            (report.ok(line) if bus_gbps >= 0.5 * link else
             report.warn(line, "under half the link speed: set --socket-ifname to the fast interface, "
                               "check NCCL_DEBUG=INFO for the transport in use"))
        elif len(hosts) > 1:
            report.warn(line + " (link speed unknown)", "compare with the network's rated speed")
        elif env.backend == "gloo" and bus_gbps < SAME_HOST_MIN_GBPS:
            report.warn(line, f"under {SAME_HOST_MIN_GBPS} GB/s on one host: too many ranks for the cores, "
                              "or traffic leaves by a slow interface")
        else:
            report.ok(line + " (one host)")
    for host in hosts:
        on_host = [f for f in facts if f["host"] == host]
        shm = on_host[0]["shm_bytes"]
        line = f"{host}: /dev/shm {shm / 2**30:.1f} GiB"
        (report.ok(line) if shm >= SHM_MIN_BYTES else
         report.warn(line, "DataLoader workers and NCCL need more: mount an emptyDir with medium: Memory at "
                           "/dev/shm (Kubernetes) or run docker with --shm-size=8g"))
        used = sum(f["threads"] for f in on_host) if on_host[0]["device"] == "cpu" else 0
        cores = on_host[0]["cores"]
        line = f"{host}: {len(on_host)} rank(s) x {on_host[0]['threads']} thread(s) on {cores} core(s)"
        (report.ok(line) if used <= cores else
         report.warn(line, "oversubscribed: lower --threads or the ranks per node, or the all-reduce waits for a core"))
        if len(on_host) > 1 and on_host[0]["pinned"]:
            masks = [set(f["pinned"]) for f in on_host]
            line = f"{host}: cores per rank {', '.join(str(sorted(m)) for m in masks)}"
            shared = any(a & b for i, a in enumerate(masks) for b in masks[i + 1:])
            (report.ok(line + " (disjoint)") if not shared or len(on_host) > cores else
             report.warn(line + " (shared)", "keep --pin-cores on, unless other jobs use this node's cores too"))
    _compare_ranks(report, speeds, "step_ms", "own training step (no all-reduce, 8 images)", "ms", False,
                   "a slow rank sets every step's pace: check that host's load, clocks, thermal state")
    _compare_ranks(report, speeds, "gflops", "matmul", "GFLOP/s", True,
                   "a slow device: check its clocks and temperature (nvidia-smi -q -d CLOCK,TEMPERATURE)")
    _compare_ranks(report, speeds, "copy_gbps", "memory copy", "GB/s", True,
                   "slow memory on that device or host: check its NUMA placement and other jobs")
    by_host = {f["host"]: f["local_gbps"] for f in speeds if f["local_gbps"] is not None}
    if by_host:
        best = max(by_host.values())
        line = "all-reduce within each host: " + ", ".join(f"{h} {v:.2f} GB/s" for h, v in sorted(by_host.items()))
        slow = [h for h, v in by_host.items() if v < 0.5 * best]
        (report.ok(line) if not slow else
         report.warn(line + f"; under half the best host's: {', '.join(sorted(slow))}",
                     "check that host's GPU interconnect (nvidia-smi topo -m) or its cores"))
    if between is not None:
        report.ok(f"between hosts (one rank each): all-reduce bus bandwidth {between:.2f} Gbit/s")
    if advice is not None:
        report.ok(f"at --image-size {cfg.image_size}, --global-batch-size {cfg.global_batch_size}: "
                  f"{advice.describe().replace('comm hook auto: ', 'recommended --comm-hook ')}")
    if len(set(digests)) == 1:
        report.ok(f"identical parameters on all {env.world_size} rank(s) after one training step")
    else:
        report.fail(f"parameters differ between ranks after one step ({len(set(digests))} versions)",
                    "ranks are not training the same model: check that every rank runs the same code and flags")
    return report


def main(argv: list[str]) -> int:
    parser = OneLineErrorParser(prog="distributed-step doctor", argument_default=argparse.SUPPRESS,
                                description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="all-reduces timed for the bandwidth (default: 5)")
    add_config_flags(parser, ("backend", "timeout_s", "socket_ifname", "threads", "pin_cores", "bucket_cap_mb",
                              "static_graph", "bucket_view", "comm_hook", "powersgd_rank", "fused_sgd", "seed",
                              "image_size", "global_batch_size", "precision", "channels_last"))
    args = vars(parser.parse_args(argv))
    repeats = args.pop("repeats")
    cfg = TrainConfig(**args).validate()
    report = run_checks(cfg, max(1, repeats))
    if report is None:
        return 0
    print("\n".join(report.lines), flush=True)
    return 1 if report.failed else 0
