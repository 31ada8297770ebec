"""Cluster networking on one machine: every pod is 127.0.0.1, every served port a free local one.

Only the names a controller (or a headless Service) really creates are registered, so a manifest
that names a host wrongly keeps the wrong name and its pods cannot connect.

Two cluster timings are kept rather than smoothed over:

- A served port belongs to the pod that serves it. Until that pod first starts, the port is held
  here by a socket that is bound but not listening: a connection is refused, as it is at a pod
  whose process has not started, and no other pod can bind it. That matters because torch picks
  the rendezvous store's host by hostname and address, and here every address is this machine:
  an agent that finds the port free may host the store itself. With the hold, a store host can
  be started last (testing.k8s.controller) and the other agents, finding the port taken, wait in
  their store clients (read_timeout), as on a cluster where the host's image is still being
  pulled.
- A name served by a Service that lists only Ready pods (the training operator's per-replica
  Services; a headless Service without publishNotReadyAddresses) does not resolve until that pod
  is Ready. `kubelet.Node` publishes it then and withdraws it when the pod stops; what looks names
  up (the PyTorchJob's init container, through `nslookup`) sees exactly that. In a process's own
  arguments and env a name maps to 127.0.0.1 from the start: for torch's store client a missing
  name and a closed port are the same, both retried until read_timeout.

NetworkPolicies (testing.k8s.netpol) are enforced where the emulation decides where a pod
connects: every pod is 127.0.0.1 and talks over real loopback sockets, which cannot be told
apart, so the check is on the names. A name that a pod's command, args or env hold (MASTER_ADDR,
the rendezvous endpoint, the Ray head's Service and its ports) becomes 127.0.0.1 for that pod
only if the rendered policies admit the pod to the name's pod (on the port written with the
name; on some port when none is); otherwise it becomes <name>.denied-by-networkpolicy.invalid,
which does not resolve, so the connection fails as a dropped one does on a cluster. Not
enforced: connections to addresses a process learns at run time (gloo's and NCCL's ephemeral
ports, Ray's raylet and object manager ports, exchanged through the store or the GCS) and
`nslookup` in other images (DNS answers every pod; policies do not filter DNS either).
"""
from __future__ import annotations

import re
import socket

from testing.k8s.netpol import Peer, admits
from testing.machine import free_port

LOOPBACK = "127.0.0.1"
DENIED = ".denied-by-networkpolicy.invalid"  # RFC 6761: .invalid never resolves


class Network:
    def __init__(self) -> None:
        self.names: dict[str, str | None] = {}  # name -> the pod that must be Ready for it to resolve
        self.ports: dict = {}
        self.held: dict[int, socket.socket] = {}
        self.targets: dict[str, str] = {}  # name -> the pod it reaches
        self.labels: dict[str, dict] = {}  # pod -> its labels, as its controller creates it
        self.policies: list[dict] = []     # the rendered NetworkPolicies (kubelet.Node sets them)

    def host(self, name: str, ready_pod: str | None = None, pod: str | None = None) -> str:
        """Register a DNS name of `pod` (or of `ready_pod`); with `ready_pod`, it resolves only
        while that pod is Ready (a name registered both ways keeps the condition: the Service
        that needs readiness decides)."""
        if ready_pod is not None or name not in self.names:
            self.names[name] = ready_pod
        if pod or ready_pod:
            self.targets[name] = pod or ready_pod
        return LOOPBACK

    def pod(self, name: str, template: dict) -> None:
        """A pod its controller creates, with the labels its template and the controller give it."""
        self.labels[name] = dict(template.get("metadata", {}).get("labels") or {})

    def admitted(self, source: str, name: str, port: int | None = None) -> bool:
        """Whether the policies let pod `source` connect to the pod behind `name` (on `port`)."""
        target = self.targets.get(name)
        if target is None or target == source:  # a Service of no one pod here; a pod to itself
            return True
        return admits(self.policies, Peer(self.labels.get(source, {})), Peer(self.labels.get(target, {})), port)

    def port(self, port: int, pod: str = "") -> int:
        """The local port standing in for a served port (of one pod when the pods all serve it)."""
        port = (pod, port) if pod else port
        if port not in self.ports:
            self.ports[port] = free_port()
        return self.ports[port]

    def endpoint(self, name: str, port: int) -> str:
        """name:port as the operator writes it; the kubelet maps it per pod (`rewrite`)."""
        self.host(name)
        self.port(port)
        return f"{name}:{port}"

    def hold(self, port: int) -> int:
        """Keep `port` (a local one) from every process until `release`: bound, not listening.

        No SO_REUSEADDR: on Linux a socket that lacks it keeps every other socket off the port,
        even one that sets it (as torch's store server does)."""
        if port not in self.held:
            holder = socket.socket()
            holder.bind((LOOPBACK, port))
            self.held[port] = holder
        return port

    def release(self, port: int | None) -> None:
        holder = self.held.pop(port, None)
        if holder is not None:
            holder.close()

    def close(self) -> None:
        for port in list(self.held):
            self.release(port)

    def published_by(self, pod: str) -> list[str]:
        """The names that resolve once `pod` is Ready."""
        return [name for name, owner in self.names.items() if owner == pod]

    def always_published(self) -> list[str]:
        return [name for name, owner in self.names.items() if owner is None]

    def rewrite(self, text: str, source: str | None = None) -> str:
        """Registered names in a manifest string (args, env values) -> 127.0.0.1[:local port];
        as seen from pod `source`: a name its NetworkPolicies deny it -> <name>.denied-...invalid."""
        def local(m: re.Match, name: str) -> str:
            port = int(m.group(1)) if m.group(1) else None
            host = LOOPBACK if source is None or self.admitted(source, name, port) else name + DENIED
            return host + (f":{self.port(port)}" if port else "")
        for name in sorted(self.names, key=len, reverse=True):
            pattern = r"(?<![\w.-])" + re.escape(name) + r"(?::(\d+))?(?![\w.-])"
            text = re.sub(pattern, lambda m, name=name: local(m, name), text)
        return text
