"""What Kueue does to a workload, as far as these manifests meet it.

Kueue's webhook creates a workload it manages suspended (Job: spec.suspend; PyTorchJob:
runPolicy.suspend; TrainJob, RayJob: spec.suspend) and lifts the suspension once the workload is
admitted into its LocalQueue's ClusterQueue. The queue comes from the workload's
kueue.x-k8s.io/queue-name label; a cluster configured with manageJobsWithoutQueueName also manages
workloads without one, and those are never admitted. At admission Kueue adds the ResourceFlavor's
node labels and tolerations to each pod set. For a Job, PyTorchJob and RayJob it merges them into
each pod template's own list (pkg/podset Merge: more entries). A TrainJob's pod templates are the
Trainer's: Kueue's webhook appends a runtime patch of its own (manager kueue.x-k8s.io/manager,
pkg/controller/jobs/trainjob) and fills it at admission with the flavor's tolerations only, and
Trainer v2.3 applies the runtime patches in order as strategic merge patches
(pkg/runtime/core/trainingruntime.go mergeRuntimePatches), where a pod's tolerations are replaced,
not merged. So a flavor with tolerations replaces the ones of our runtime patch: the GPU overlay's
toleration survives only if the flavor carries it too (docs/kubernetes.md).
"""
from __future__ import annotations

import copy

from testing.k8s.operators import pod_templates, suspend_holder

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


def queue_of(workload: dict) -> str | None:
    return workload["metadata"].get("labels", {}).get(QUEUE_LABEL)


def admission(workload: dict, local_queues: set[str], manage_without_queue: bool) -> str:
    """'admitted', 'suspended: ...' (managed, never admitted) or 'unmanaged' (Kueue leaves it be)."""
    queue = queue_of(workload)
    if queue is None:
        return "suspended: no kueue.x-k8s.io/queue-name label" if manage_without_queue else "unmanaged"
    if queue not in local_queues:
        return f"suspended: no LocalQueue {queue} in the namespace"
    return "admitted"


def admitted_pod_spec(pod_spec: dict, flavor_tolerations: list[dict]) -> dict:
    """The pod spec as an admitted pod set runs it: the flavor's tolerations after its own."""
    own = pod_spec.get("tolerations", [])
    return {**pod_spec, "tolerations": own + [t for t in flavor_tolerations if t not in own]}


KUEUE_PATCH_MANAGER = "kueue.x-k8s.io/manager"


def created(workload: dict, manage_without_queue: bool) -> dict:
    """The workload as Kueue's webhook lets it in: suspended when Kueue manages it, and a
    TrainJob with Kueue's (empty) runtime patch after its own."""
    workload = copy.deepcopy(workload)
    if admission(workload, set(), manage_without_queue) == "unmanaged":
        return workload
    suspend_holder(workload)["suspend"] = True
    if workload["kind"] == "TrainJob":
        workload["spec"].setdefault("runtimePatches", []).append(
            {"manager": KUEUE_PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {}}}})
    return workload


def admitted(workload: dict, flavor_tolerations: list[dict], replicated_job: str = "node") -> dict:
    """A created workload once Kueue admits it: unsuspended, the flavor's tolerations applied."""
    workload = copy.deepcopy(workload)
    suspend_holder(workload)["suspend"] = False
    if workload["kind"] == "TrainJob":
        patch = next(p for p in workload["spec"]["runtimePatches"] if p["manager"] == KUEUE_PATCH_MANAGER)
        if flavor_tolerations:  # Go's omitempty: no tolerations, no key, nothing replaced
            pod = {"spec": {"tolerations": copy.deepcopy(flavor_tolerations)}}
            patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"] = [
                {"name": replicated_job, "template": {"spec": {"template": pod}}}]
        return workload
    for _, template, _ in pod_templates(workload):
        template["spec"] = admitted_pod_spec(template["spec"], flavor_tolerations)
    return workload
