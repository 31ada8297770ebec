"""NetworkPolicy ingress as Kubernetes defines it (networking.k8s.io/v1), for the emulation and
the house rules.

A pod that no policy of its namespace selects (with Ingress among its policyTypes) admits every
connection. Once one does, a connection is admitted only where some ingress rule of some
selecting policy admits it: policies are additive, never subtractive. A rule admits a peer when
its `from` is empty or one of its peers matches, and the port when its `ports` is empty or one
matches. A peer with a podSelector alone means pods of the policy's own namespace; with a
namespaceSelector, pods of the namespaces whose labels match (every namespace carries
kubernetes.io/metadata.name: <its name>). Not emulated: ipBlock peers (never match here: every
pod is 127.0.0.1) and named ports (they match only a connection whose port is not known).
"""
from __future__ import annotations

from dataclasses import dataclass, field

NAMESPACE = "default"  # where the emulation runs every pod (kubectl apply -k without -n)


@dataclass
class Peer:
    """One end of a connection: a pod's labels and namespace."""
    labels: dict = field(default_factory=dict)
    namespace: str = NAMESPACE


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector: matchLabels and matchExpressions, all of them; {} selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _ingress(policy: dict) -> bool:
    types = policy["spec"].get("policyTypes")
    return "Ingress" in types if types else True  # unset: Ingress (and Egress only with egress rules)


def selecting(policies: list[dict], target: Peer) -> list[dict]:
    """The ingress policies that select `target`."""
    return [p for p in policies if _ingress(p) and p["metadata"].get("namespace", NAMESPACE) == target.namespace
            and selects(p["spec"].get("podSelector"), target.labels)]


def _peer_matches(peer: dict, source: Peer, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        ns_ok = selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source.namespace})
    else:
        ns_ok = source.namespace == policy_ns
    return ns_ok and selects(peer.get("podSelector"), source.labels)


def _port_matches(rule_port: dict, port: int | None) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    wanted = rule_port.get("port")
    if port is None or wanted is None:  # a port not known here, or every port
        return True
    if isinstance(wanted, str):  # a named port: not resolved here (see the module's docstring)
        return False
    return wanted <= port <= rule_port.get("endPort", wanted)


def admits(policies: list[dict], source: Peer, target: Peer, port: int | None = None) -> bool:
    """Whether a TCP connection from `source` to `target` (on `port`; None: some port) is allowed."""
    chosen = selecting(policies, target)
    if not chosen:
        return True
    for policy in chosen:
        policy_ns = policy["metadata"].get("namespace", NAMESPACE)
        for rule in policy["spec"].get("ingress") or []:
            peers, ports = rule.get("from") or [], rule.get("ports") or []
            if ((not peers or any(_peer_matches(p, source, policy_ns) for p in peers))
                    and (not ports or any(_port_matches(p, port) for p in ports))):
                return True
    return False


def policies_of(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o.get("kind") == "NetworkPolicy"]


# --- the house rule -------------------------------------------------------------------------------
OPERATOR_NAMESPACE = "ray-system"  # KubeRay's, as k8s/rayjob/workload/networkpolicy.yaml assumes
RAY_DASHBOARD = 8265


def policy_errors(objects: list[dict], pods: list[tuple[str, dict]], kind: str) -> list[str]:
    """Every pod of the variant (where, labels) is selected by one NetworkPolicy that admits the
    others on every port; a RayJob's head also admits the operator's namespace on 8265."""
    policies = policies_of(objects)
    if not policies:
        return ["no NetworkPolicy: every pod would admit connections from anywhere in the cluster"]
    peers = [(where, Peer(labels)) for where, labels in pods]
    shared = [p for p in policies if all(selects(p["spec"].get("podSelector"), peer.labels) for _, peer in peers)]
    if not shared:
        return ["no NetworkPolicy's podSelector selects every pod of the job (" + ", ".join(w for w, _ in peers) + ")"]
    errors = [f"{w}: the NetworkPolicy does not admit {v} (the job's own traffic, every port)"
              for w, target in peers for v, source in peers if not admits(shared, source, target)]
    if kind == "RayJob":
        head = next(peer for where, peer in peers if "headGroupSpec" in where)
        if not admits(policies, Peer({}, OPERATOR_NAMESPACE), head, RAY_DASHBOARD):
            errors.append(f"the head does not admit the KubeRay operator's namespace {OPERATOR_NAMESPACE} "
                          f"on {RAY_DASHBOARD} (the operator reads the job's status there)")
    return errors
