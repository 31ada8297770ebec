"""Several "hosts" on one machine, for multi-node tests and benchmarks: each host is a network
namespace with its own address and host name, plugged into one switch (a bridge in a namespace of its own),
and every link can be slowed to a rate (tc tbf) like a real 1 or 10 Gbit/s Ethernet. Needs root
and iproute2; nothing here imports torch.

    with Network(hosts=2, rate="1gbit") as net:      # rate=None: as fast as the kernel goes
        procs = net.torchrun(nproc=1, args=["-m", "distributed_step", "train", "--out", "/tmp/r"])
        outputs = net.wait(procs, timeout=300)

Cleanup happens on every exit path a process can see: the `with` block, an exception, SIGTERM,
SIGHUP, interpreter exit. Names carry the owner's pid, so a run killed with SIGKILL (which no
process can see) is swept by the next Network made on this machine, and two runs never collide.
Delay and loss need tc's netem qdisc; a kernel without it (this project's VM) gets a clear error.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

PREFIX = "dsl"  # namespaces are named dsl-<owner pid>-<run tag>-<role>
SUBNET = "10.213.77"  # every run has its own switch, so the addresses never meet across runs
RENDEZVOUS_PORT = 29400
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


class NetlabError(RuntimeError):
    """The emulated network cannot be built here (no root, no iproute2, a qdisc the kernel lacks)."""


def rate_bits(rate: str) -> float:
    """'1gbit' -> 1e9 (tc's units, decimal)."""
    match = _RATE.match(rate.strip().lower())
    if not match:
        raise NetlabError(f"link rate {rate!r}: expected a number and tc's unit, like 100mbit, 1gbit or 10gbit")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise NetlabError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def available() -> str | None:
    """None when namespaces can be made here, else why not (for a skip or an error message)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "network namespaces need iproute2 (ip, tc)"
    return None


def _kill_namespace(name: str) -> None:
    """Stop every process inside the namespace, then delete it (its veth ends go with it)."""
    pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _run("ip", "netns", "del", name, check=False)
    shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


def sweep_stale() -> list[str]:
    """Delete the namespaces of runs whose owner process is gone (killed with SIGKILL)."""
    swept = []
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(rf"^{PREFIX}-(\d+)-[0-9a-f]+-", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _kill_namespace(name)
            swept.append(name)
    return swept


class Network:
    """`hosts` namespaces on one switch. `rate` shapes every link in both directions (tc units:
    "1gbit"); `delay_ms`/`loss_pct` need netem. `name_resolves_to` is what this machine's host
    name resolves to inside each host: "self" (its own address, as a cluster's DNS would have
    it) or "loopback" (127.0.0.1, as in many container images; torchrun then hands the ranks a
    loopback MASTER_ADDR)."""

    def __init__(self, hosts: int = 2, rate: str | None = None, delay_ms: float = 0.0, loss_pct: float = 0.0,
                 name_resolves_to: str = "self"):
        why = available()
        if why:
            raise NetlabError(why)
        if not 1 <= hosts <= 200:
            raise NetlabError(f"hosts={hosts}: expected 1 to 200")
        if name_resolves_to not in ("self", "loopback"):
            raise NetlabError(f"name_resolves_to={name_resolves_to!r}: expected 'self' or 'loopback'")
        self.tag = f"{PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.names = [f"{self.tag}-h{i}" for i in range(hosts)]
        self.switch = f"{self.tag}-sw"
        self.addrs = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self.hostnames = [f"host{i}" for i in range(hosts)]  # each host's own (UTS namespace)
        self.name_resolves_to = name_resolves_to
        self.rate, self.delay_ms, self.loss_pct = rate, delay_ms, loss_pct
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        self._signals: dict = {}

    # --- life -----------------------------------------------------------------------------
    def __enter__(self) -> Network:  # noqa: PYI034 - Self needs Python 3.11
        sweep_stale()
        self._catch_signals()
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop what runs on the hosts and delete every namespace; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            _stop(proc)
        for name in [*self.names, self.switch]:
            _kill_namespace(name)
        for sig, previous in self._signals.items():
            signal.signal(sig, previous)
        atexit.unregister(self.close)

    def _catch_signals(self) -> None:
        """SIGTERM and SIGHUP end the process without running `finally` or atexit: turn them
        into SystemExit so the namespaces go too (only where nobody else handles them)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                self._signals[sig] = signal.signal(sig, _exit_on_signal)

    def _build(self) -> None:
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for i, (name, addr) in enumerate(zip(self.names, self.addrs)):
            _run("ip", "netns", "add", name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
            # Both ends are made inside their namespaces: no name is ever taken in the root one.
            _run("ip", "link", "add", "ds0", "netns", name, "type", "veth", "peer", "name", f"p{i}",
                 "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _run("ip", "-n", name, "addr", "add", f"{addr}/24", "dev", "ds0")
            _run("ip", "-n", name, "link", "set", "ds0", "up")
            # Every host knows the others by name, as a cluster's DNS would have it; its own name
            # resolves to its address, or to 127.0.0.1 as in many container images.
            os.makedirs(f"/etc/netns/{name}", exist_ok=True)  # `ip netns exec` mounts it over /etc/hosts
            table = {self.hostnames[j]: a for j, a in enumerate(self.addrs)}
            if self.name_resolves_to == "loopback":
                table[self.hostnames[i]] = "127.0.0.1"
            with open(f"/etc/netns/{name}/hosts", "w") as fh:
                fh.write("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in table.items()))
        self.shape(self.rate, self.delay_ms, self.loss_pct)

    # --- links ------------------------------------------------------------------------------
    def shape(self, rate: str | None, delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Set every link's rate (both directions: the host's egress and the switch port's)."""
        if delay_ms or loss_pct:
            self._need_netem()
        burst = "512kb" if rate is None else f"{max(256 * 1024, int(rate_bits(rate) / 8 / 1000))}"
        for i, name in enumerate(self.names):
            for ns, dev in ((name, "ds0"), (self.switch, f"p{i}")):
                _run("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                parent = ["root"]
                if delay_ms or loss_pct:
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:",
                         "netem", "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%")
                    parent = ["parent", "1:"]
                if rate is not None:
                    # burst: 1 ms of the rate (at least 256 KiB: a GSO packet is up to 64 KiB)
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, *parent, "tbf",
                         "rate", rate, "burst", burst, "latency", "50ms")
        self.rate, self.delay_ms, self.loss_pct = rate, delay_ms, loss_pct

    def _need_netem(self) -> None:
        probe = _run("ip", "netns", "exec", self.switch, "tc", "qdisc", "add", "dev", "br0", "root", "netem",
                     "delay", "1ms", check=False)
        if probe.returncode != 0:
            raise NetlabError("link delay and loss need tc's netem qdisc, which this kernel does not offer "
                              f"({probe.stderr.strip()}); only the rate (tbf) can be emulated here")
        _run("ip", "netns", "exec", self.switch, "tc", "qdisc", "del", "dev", "br0", "root", check=False)

    def kill_host(self, host: int) -> int:
        """SIGKILL every process inside host `host`, as a node lost with all it runs; how many."""
        pids = _run("ip", "netns", "pids", self.names[host], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        return len(pids)

    def sent_bytes(self, host: int) -> int:
        """Bytes host `host` has sent into its link (the kernel's counter of its interface)."""
        out = _run("ip", "-n", self.names[host], "-s", "-j", "link", "show", "ds0").stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    # --- processes --------------------------------------------------------------------------
    def popen(self, host: int, argv: list[str], **kw) -> subprocess.Popen:
        """Start `argv` on host `host`, under its own host name (its own session, so close()
        stops its whole tree)."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.STDOUT)
        kw.setdefault("text", True)
        named = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.hostnames[host], *argv]
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[host], *named], start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def torchrun(self, nproc: int, args: list[str], run_id: str = "netlab", local_addr: bool = True,
                 torchrun_flags: tuple[str, ...] = (), on: list[int] | None = None, nnodes: int | None = None,
                 rendezvous_host: int | None = None, **kw) -> list[subprocess.Popen]:
        """torchrun on every host (or one agent per entry of `on`, a list of host indices), the
        rendezvous (c10d) hosted by the first agent, or by `rendezvous_host`'s agent started
        earlier (a replaced node rejoining: `on=[1], nnodes=2, rendezvous_host=0`). `args` follow
        torchrun's flags (["-m", "distributed_step", "train", ...]). local_addr=False leaves
        --local-addr out, as a user who does not know about it would."""
        on = list(range(len(self.addrs))) if on is None else on
        host_of_rendezvous = on[0] if rendezvous_host is None else rendezvous_host
        procs = []
        for i, host in enumerate(on):
            is_host = host == host_of_rendezvous and i == on.index(host)
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes or len(on)}",
                   f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint={self.addrs[host_of_rendezvous]}:{RENDEZVOUS_PORT}", f"--rdzv-id={run_id}",
                   *([f"--local-addr={self.addrs[host]}"] if local_addr else []),
                   *(["--rdzv-conf=is_host=true"] if is_host else []), *torchrun_flags, *args]
            procs.append(self.popen(host, cmd, **kw))
        return procs

    def wait(self, procs: list[subprocess.Popen], timeout: float) -> list[str]:
        """Every process's output once all have ended; on timeout every one is stopped first."""
        deadline = time.monotonic() + timeout
        outputs = []
        for proc in procs:
            try:
                outputs.append(proc.communicate(timeout=max(0.1, deadline - time.monotonic()))[0] or "")
            except subprocess.TimeoutExpired:
                for other in procs:
                    _stop(other)
                raise
        return outputs


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)
