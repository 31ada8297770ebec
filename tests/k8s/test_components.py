"""The opt-in components (k8s/components/kueue, priority, prometheus, and for the RayJob
rayjob-head-pdb and rayjob-prometheus), added to every variant they apply to: each renders,
passes the same strict schemas, operator rules and house rules as the variants themselves, and
does what it is for. Kueue's part is emulated (testing.k8s.kueue): a workload is created
suspended and gets pods only once admitted, which needs its queue named on a cluster that
manages every job; admission keeps the GPU overlay's toleration except where Trainer v2.3
replaces it. The monitoring rules are testing.k8s.monitoring's."""
from __future__ import annotations

import pytest

from testing.k8s.admission import operator_errors
from testing.k8s.kueue import PRIORITY_LABEL, QUEUE_LABEL, admission, admitted, created
from testing.k8s.monitoring import MONITORING_NAMESPACE, created_pods, monitor_errors
from testing.k8s.netpol import Peer, admits, policies_of
from testing.k8s.network import Network
from testing.k8s.operators import indexed_job_pods, pod_templates, pytorchjob_pods, trainjob_pods
from testing.k8s.render import VARIANTS, config_maps, need_schemas, render, with_components, workload
from testing.k8s.rules import house_errors
from testing.k8s.validate import schema_errors

pytestmark = pytest.mark.k8s

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SPOT = {"key": "cloud.example.com/spot", "operator": "Exists", "effect": "NoSchedule"}


def added(variant: str) -> list[str]:
    ray = ["rayjob-head-pdb", "rayjob-prometheus"] if variant.startswith("rayjob") else []
    return ["kueue", "priority", "prometheus"] + ray


@pytest.fixture(scope="module")
def k8s(tmp_path_factory):
    return with_components(tmp_path_factory.mktemp("k8s"), {v: added(v) for v in VARIANTS})


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_component_renders_and_passes_every_check(k8s, variant):
    need_schemas()
    objects = render(variant, k8s)
    assert [e for o in objects for e in schema_errors(o)] == []
    assert operator_errors(objects) == [] and house_errors(objects) == []
    job = workload(objects)
    assert job["metadata"]["labels"][QUEUE_LABEL] == "distributed-step"
    assert PRIORITY_LABEL not in job["metadata"]["labels"]  # commented out until a class is named
    # Only the workload is Kueue's: config, volume, policy and service carry no queue.
    assert [o["kind"] for o in objects if QUEUE_LABEL in o["metadata"].get("labels", {})] == [job["kind"]]
    training = [(where, t) for where, t, trains in pod_templates(job) if trains]
    expected = None if job["kind"] == "TrainJob" else "distributed-step-training"  # the runtime's to set
    assert training and all(t["spec"].get("priorityClassName") == expected
                            for _, t in training), [where for where, _ in training]
    budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    if variant.startswith("rayjob"):
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"]
        (budget,) = budgets
        assert budget["spec"]["maxUnavailable"] == 0
        selector = budget["spec"]["selector"]["matchLabels"]
        assert all(head.get(k) == v for k, v in selector.items() if k != "ray.io/node-type")
        assert selector["ray.io/node-type"] == "head"
    else:
        assert budgets == []  # a budget over every training pod would block node drains


def pods_of(obj: dict, objects: list[dict]) -> list:
    if obj["kind"] == "Job":
        return indexed_job_pods(obj, objects, Network())
    if obj["kind"] == "PyTorchJob":
        return pytorchjob_pods(obj, Network())
    return trainjob_pods(obj, Network())


@pytest.mark.parametrize("variant", VARIANTS)
def test_kueue_admits_a_variant_only_once_it_names_its_queue(k8s, variant):
    plain, queued = workload(render(variant)), workload(render(variant, k8s))
    assert admission(plain, {"distributed-step"}, manage_without_queue=True).startswith("suspended")
    assert admission(plain, {"distributed-step"}, manage_without_queue=False) == "unmanaged"
    assert admission(queued, {"distributed-step"}, manage_without_queue=True) == "admitted"
    assert admission(queued, {"another-team"}, manage_without_queue=True).startswith("suspended: no LocalQueue")
    # What the controllers make of it (the pods that tests/k8s/test_pods.py runs, admitted the same way).
    if not variant.startswith("rayjob"):
        objects = render(variant, k8s)
        waiting = created(workload(objects), manage_without_queue=True)
        assert pods_of(waiting, objects) == []
        assert len(pods_of(admitted(waiting, [SPOT]), objects)) >= 2
    assert created(plain, manage_without_queue=False) == plain  # unmanaged: untouched
    gpu_node = variant.endswith("/gpu")
    for flavor in ([SPOT], [SPOT, GPU_TOLERATION], []):
        run = admitted(created(queued, manage_without_queue=True), flavor)
        for where, template, trains in pod_templates(run):
            tolerations = template["spec"].get("tolerations", [])
            assert all(t in tolerations for t in flavor), where
            gpu_pod = gpu_node and trains and "headGroupSpec" not in where  # Ray's head: no GPU
            # Trainer v2.3 replaces the TrainJob's own tolerations with a flavor's non-empty list.
            kept = gpu_pod and (not flavor or run["kind"] != "TrainJob")
            assert (GPU_TOLERATION in tolerations) == (kept or GPU_TOLERATION in flavor), (where, flavor)


@pytest.mark.parametrize("variant", ["job", "pytorchjob", "pytorchjob/elastic", "trainjob", "rayjob"])
def test_the_monitoring_namespace_reaches_the_metrics_ports_only(k8s, variant):
    objects = render(variant, k8s)
    assert config_maps(objects)["distributed-step-env"]["DS_METRICS_PORT"] == "9500"
    policies, monitoring = policies_of(objects), Peer({}, MONITORING_NAMESPACE)
    stranger = Peer({}, "another-team")
    for where, template in created_pods(workload(objects)):
        pod = Peer(template["metadata"]["labels"])
        ray_node = variant == "rayjob" and "submitter" not in where
        assert admits(policies, monitoring, pod, 9500), where
        assert admits(policies, monitoring, pod, 8080) == ray_node, where
        for port in (29400, 6379, 8265, 45000):  # rendezvous, Ray's GCS, job server, a gloo port
            assert not admits(policies, monitoring, pod, port), (where, port)
        assert not admits(policies, stranger, pod, 9500), where
    # Without the components, nothing of the monitoring namespace gets in.
    for where, template in created_pods(workload(render(variant))):
        assert not admits(policies_of(render(variant)), monitoring, Peer(template["metadata"]["labels"]), 9500)


def test_a_podmonitor_whose_port_no_pod_declares_is_refused(k8s):
    objects = render("job", k8s)
    monitor = next(o for o in objects if o["kind"] == "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["port"] = "metrics"
    assert monitor_errors(objects) == ["PodMonitor/distributed-step: no pod it selects declares a port named 'metrics'"]
    next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "distributed-step-env")[
        "data"]["DS_METRICS_PORT"] = "9600"
    assert any("declares ds-metrics [9500], but DS_METRICS_PORT is 9600" in e for e in monitor_errors(objects))
