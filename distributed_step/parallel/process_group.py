"""Who am I, and the process group: the only module that creates or destroys one.

Every launcher (torchrun, Ray Train, a Kubernetes pod running torchrun) hands us the same
contract: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Ray Train
creates the process group itself, so `setup()` adopts an existing group and `teardown()` only
destroys a group that `setup()` created.
"""
from __future__ import annotations

import hashlib
import os
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distributed_step.config import ConfigError
from distributed_step.parallel.peers import loopback_address, loopback_master_problem


class RendezvousError(RuntimeError):
    """The process group could not be formed in time: a peer, a port or a network problem (not
    bad input). The message names the address and the timeout."""


@dataclass(frozen=True)
class World:
    """Who this process is, from the launcher's environment (or the group Ray already made)."""
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device


@dataclass(frozen=True)
class DistEnv(World):
    """The world once joined: the backend in use, and whether setup() created the group."""
    backend: str
    owns_group: bool  # True when setup() created the group (so teardown() destroys it)
    store: dist.Store | None = None  # the store the group formed through, when setup() made it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def detect(device: torch.device | None = None) -> World:
    """This process's place in the job. Reads RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE;
    a group that already exists (Ray Train makes its own) has the last word on rank and size.
    `device` overrides the default: cuda:LOCAL_RANK when there are GPUs, else the CPU."""
    world_size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local_rank, local_world_size = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if device is None:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    return World(rank, local_rank, world_size, local_world_size, device)


def choose_backend(requested: str, cuda: bool) -> str:
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise ConfigError("--backend nccl needs CUDA GPUs; use --backend gloo (or auto) on CPU")
    return requested


def setup(world: World, backend: str = "auto", timeout_s: float = 300.0, socket_ifname: str = "") -> DistEnv:
    """Join the process group of `world`, or adopt the one that exists (Ray). Safe to call twice."""
    rank, world_size, device = world.rank, world.world_size, world.device
    if dist.is_available() and dist.is_initialized():
        return DistEnv(**vars(world), backend=dist.get_backend(), owns_group=False)
    backend = choose_backend(backend, device.type == "cuda")
    if socket_ifname:
        # Gloo advertises the address the hostname resolves to; on many hosts that is 127.0.0.1,
        # and the other nodes cannot reach it. Naming the interface fixes the advertised address.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", socket_ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", socket_ifname)
    if world_size == 1:
        return DistEnv(**vars(world), backend=backend, owns_group=False)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise ConfigError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set: "
                          "start the ranks with torchrun (or set both)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"MASTER_PORT={port} is not a port number")
    problem = loopback_master_problem()  # the launcher entry point asked already; library callers not
    if problem:
        raise ConfigError(problem)
    loopback = loopback_address(addr) if world.local_world_size == world_size else None
    if loopback and sys.platform.startswith("linux") and not socket_ifname:
        # Every rank is on this host: gloo's pairs too stay on loopback (it would otherwise bind
        # the address the host name resolves to, which may face the network).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = _store(addr, int(port), rank, world_size, loopback, timeout_s)
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s),
                                # NCCL binds its communicator to the device; gloo (also used
                                # for 2 ranks sharing one GPU, which NCCL refuses) takes none.
                                device_id=device if backend == "nccl" else None)
    except (RuntimeError, ValueError) as exc:
        raise RendezvousError(
            f"could not join the process group at MASTER_ADDR={addr} MASTER_PORT={port} within "
            f"--timeout-s {timeout_s:g} ({str(exc).splitlines()[0][:200]})") from None
    return DistEnv(**vars(world), backend=backend, owns_group=True, store=store)


def _store(addr: str, port: int, rank: int, world_size: int, loopback: str | None, timeout_s: float) -> dist.Store:
    """The key-value store the process group forms through, built here rather than by env://:

    - torchrun's own store (TORCHELASTIC_USE_AGENT_STORE) outlives a restart, and torch reads it
      without a per-attempt prefix, so restarted ranks could read the dead attempt's addresses
      and wait for peers that are gone (pytorch/pytorch#135712). Each attempt gets its own
      prefix, which torchrun's restart count names. That count
      is each node's own: on several nodes it can differ (a replaced node starts at 0), so
      multi-node jobs give each round a fresh store instead (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
      docs/launching.md).
    - TCPStore's client waits forever for an answer from a port that accepts connections but is
      not a store; a deadline of --timeout-s ends that wait with the endpoint named.
    - TCPStore's server listens on every interface, whatever address it is given, and anyone who
      reaches it can write the group's keys. When every rank is on this host and MASTER_ADDR is
      a loopback address, it gets a socket bound to that address instead (master_listen_fd).
    """
    deadline = time.monotonic() + timeout_s  # one budget for the port and the store's answer
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    hosts = rank == 0 and not agent_store
    if not hosts:
        _wait_for_port(addr, port, timeout_s)
    listen = {}
    if hosts and loopback:
        try:
            listener = socket.create_server((loopback, port), backlog=1024)
        except OSError as exc:
            raise RendezvousError(f"MASTER_PORT={port}: cannot listen on {loopback} ({exc.strerror})") from None
        listen["master_listen_fd"] = listener.detach()  # the store owns the socket from here on
    made: list = []

    def connect() -> None:
        try:
            made.append(dist.TCPStore(addr, port, world_size, is_master=hosts,
                                      timeout=timedelta(seconds=timeout_s), multi_tenant=hosts, **listen))
        except Exception as exc:  # noqa: BLE001 - reported below, in this thread
            made.append(exc)

    worker = threading.Thread(target=connect, name="store-connect", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()) + 5)
    if not made:
        raise RendezvousError(f"MASTER_ADDR={addr} MASTER_PORT={port} accepts connections but did not answer "
                              f"as a c10d store within --timeout-s {timeout_s:g}: is that the rendezvous port?")
    if isinstance(made[0], Exception):
        raise RendezvousError(f"no store at MASTER_ADDR={addr} MASTER_PORT={port} within --timeout-s "
                              f"{timeout_s:g} ({str(made[0]).splitlines()[0][:200]})")
    if agent_store:
        return dist.PrefixStore(f"distributed_step/attempt_{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}", made[0])
    return made[0]


def _wait_for_port(addr: str, port: int, timeout_s: float) -> None:
    """Wait for the rendezvous store to accept connections (pods start in any order), and fail
    with one line, not a C++ stack trace per retry, when it never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(2.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise RendezvousError(f"no rendezvous at MASTER_ADDR={addr} MASTER_PORT={port} within --timeout-s "
                                  f"{timeout_s:g} ({exc}); check the address, the port and the firewall") from None
            time.sleep(0.2)


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# --- small collectives the trainer needs; each is a no-op on one process ------------------------

def all_reduce_(tensor: torch.Tensor, env: DistEnv, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=op)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


PEER_FAILURES = ("DistBackendError", "DistNetworkError", "DistStoreError")


def is_peer_failure(exc: BaseException) -> bool:
    """Did a collective fail because another rank died, stopped answering or lost the network
    (rather than because of something on this rank)?"""
    return type(exc).__name__ in PEER_FAILURES or "/gloo/" in str(exc)


def time_all_reduce(numel: int, device: torch.device, group=None, repeats: int = 3) -> float:
    """Median seconds of one all-reduce of `numel` float32 values within `group` (None: every
    rank), each timed alone. One all-reduce first warms the connections up, then a barrier, so
    that no rank's clock starts while another still lags. doctor's bandwidth line and the
    --comm-hook auto policy both time the link with this."""
    tensor = torch.ones(numel, device=device)
    dist.all_reduce(tensor, group=group)
    dist.barrier(group=group)
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        dist.all_reduce(tensor, group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def broadcast_buffers_(module: torch.nn.Module, env: DistEnv) -> None:
    """Make every rank's BatchNorm statistics rank 0's.

    DDP runs without its per-forward buffer broadcast (parallel/ddp.py), so each rank's running
    statistics come from its own batches. Before every evaluation and checkpoint every rank
    takes rank 0's; a resumed run loads those same buffers on every rank, so resume stays
    bit-exact.
    """
    if env.distributed:
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def broadcast_params_(module: torch.nn.Module, env: DistEnv) -> None:
    """Make every rank's parameters rank 0's (the bench resets diverged replicas with this)."""
    if env.distributed:
        with torch.no_grad():
            for param in module.parameters():
                dist.broadcast(param, src=0)


def state_digest(state: dict) -> str:
    """sha256 of every tensor of a state dict, in order: equal digests mean identical replicas."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
