"""The house rules of k8s/components/prometheus and rayjob-prometheus: what a PodMonitor refers
to exists, and the monitoring namespace reaches exactly that.

A PodMonitor (Prometheus Operator, monitoring.coreos.com/v1) selects pods of its own namespace by
label and scrapes each `podMetricsEndpoints` port by its name; Prometheus drops a target whose
port no container of the pod declares. KubeRay labels the Ray pods ray.io/node-type (head,
worker) and declares Ray's metrics export port on their Ray container as `metrics` (8080), so the
Ray pods are taken as KubeRay creates them. Checked: each endpoint's port is declared on some
pod the monitor selects, the pod that declares ds-metrics declares $DS_METRICS_PORT, and the
monitoring namespace is admitted to each scraped port and not to the rendezvous port. A TrainJob
cannot declare a port (the runtime's container does), so its PodMonitor may find no target: the
component says so, and the rule does not hold it against the variant.
"""
from __future__ import annotations

import copy

from testing.k8s.netpol import Peer, admits, policies_of, selects
from testing.k8s.operators import pod_templates
from testing.k8s.render import config_maps, workload

MONITORING_NAMESPACE = "monitoring"  # where the components assume Prometheus runs
RAY_METRICS_PORT = 8080  # KubeRay's default metrics export port, declared as `metrics`
METRICS_PORT_NAME = "ds-metrics"


def created_pods(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) as the workload's controller creates the pods, with KubeRay's
    node-type label and metrics port on the Ray pods."""
    pods = []
    for where, template, _ in pod_templates(obj, created=True):
        template = copy.deepcopy(template)
        if obj["kind"] == "RayJob" and "submitter" not in where:
            node_type = "head" if "headGroupSpec" in where else "worker"
            template.setdefault("metadata", {}).setdefault("labels", {})["ray.io/node-type"] = node_type
            ports = template["spec"]["containers"][0].setdefault("ports", [])
            ports.append({"name": "metrics", "containerPort": RAY_METRICS_PORT})
        pods.append((where, template))
    return pods


def declared(template: dict, name: str) -> list[int]:
    return [p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
            if p.get("name") == name]


def monitor_errors(objects: list[dict]) -> list[str]:
    monitors = [o for o in objects if o.get("kind") == "PodMonitor"]
    if not monitors:
        return []
    obj, policies = workload(objects), policies_of(objects)
    pods = created_pods(obj)
    wanted = config_maps(objects).get("distributed-step-env", {}).get("DS_METRICS_PORT")
    errors = []
    for where, template in pods:
        ours = declared(template, METRICS_PORT_NAME)
        if ours and wanted is not None and ours != [int(wanted)]:
            errors.append(f"{where}: declares {METRICS_PORT_NAME} {ours}, but DS_METRICS_PORT is {wanted}")
    for monitor in monitors:
        name = monitor["metadata"]["name"]
        if monitor["spec"].get("namespaceSelector"):
            errors.append(f"PodMonitor/{name}: namespaceSelector set; the job's pods are in its own namespace")
        chosen = [(w, t) for w, t in pods if selects(monitor["spec"]["selector"], t["metadata"].get("labels", {}))]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            port = endpoint.get("port")
            targets = [(w, p) for w, t in chosen for p in declared(t, port)]
            if not targets and obj["kind"] != "TrainJob":
                errors.append(f"PodMonitor/{name}: no pod it selects declares a port named {port!r}")
            for w, number in targets:
                target = Peer(next(t for x, t in pods if x == w)["metadata"].get("labels", {}))
                if not admits(policies, Peer({}, MONITORING_NAMESPACE), target, number):
                    errors.append(f"PodMonitor/{name}: {w} does not admit namespace {MONITORING_NAMESPACE} "
                                  f"on {port} ({number})")
        for w, t in chosen:
            if admits(policies, Peer({}, MONITORING_NAMESPACE), Peer(t["metadata"].get("labels", {})), 29400):
                errors.append(f"{w}: admits namespace {MONITORING_NAMESPACE} on the rendezvous port 29400")
    return errors
