"""The opt-in components (k8s/components/kueue, priority, rayjob-head-pdb), added to every
variant they apply to: each renders, passes the same strict schemas, operator rules and house
rules as the variants themselves, and does what it is for. Kueue's part is emulated
(testing.k8s.kueue): a workload is admitted only once it names its queue on a cluster that
manages every job, and admission keeps the GPU overlay's toleration."""
from __future__ import annotations

import shutil

import pytest

from testing.k8s.admission import operator_errors
from testing.k8s.kueue import PRIORITY_LABEL, QUEUE_LABEL, admission, admitted_pod_spec
from testing.k8s.operators import pod_templates
from testing.k8s.render import K8S, VARIANTS, need_schemas, render, workload
from testing.k8s.rules import house_errors
from testing.k8s.validate import schema_errors

pytestmark = pytest.mark.k8s

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def with_components(tmp_path_factory):
    """A copy of k8s/ whose every variant also takes kueue and priority, and the RayJob's the
    head's PodDisruptionBudget: as a user adds them to the components list."""
    k8s = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, k8s)
    for variant in VARIANTS:
        kustomization = k8s / variant / "kustomization.yaml"
        up = "../" * variant.count("/") + "../components/"
        added = ["kueue", "priority"] + (["rayjob-head-pdb"] if variant.startswith("rayjob") else [])
        text = kustomization.read_text()
        assert text.rstrip().splitlines()[-1].startswith("- "), variant  # the components list ends it
        kustomization.write_text(text.rstrip() + "\n" + "".join(f"- {up}{name}\n" for name in added))
    return k8s


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_component_renders_and_passes_every_check(with_components, variant):
    need_schemas()
    objects = render(variant, with_components)
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


@pytest.mark.parametrize("variant", VARIANTS)
def test_kueue_admits_a_variant_only_once_it_names_its_queue(with_components, variant):
    plain, queued = workload(render(variant)), workload(render(variant, with_components))
    assert admission(plain, {"distributed-step"}, manage_without_queue=True).startswith("suspended")
    assert admission(plain, {"distributed-step"}, manage_without_queue=False) == "unmanaged"
    assert admission(queued, {"distributed-step"}, manage_without_queue=True) == "admitted"
    assert admission(queued, {"another-team"}, manage_without_queue=True).startswith("suspended: no LocalQueue")
    flavor = [{"key": "cloud.example.com/spot", "operator": "Exists", "effect": "NoSchedule"}]
    for where, template, trains in pod_templates(queued):
        tolerations = admitted_pod_spec(template["spec"], flavor)["tolerations"]
        assert flavor[0] in tolerations
        gpu_pod = variant.endswith("/gpu") and trains and "headGroupSpec" not in where  # Ray's head: no GPU
        assert (GPU_TOLERATION in tolerations) == gpu_pod, where
