"""What Kueue does to a workload, as far as these manifests meet it.

Kueue's webhook creates a workload it manages suspended (Job: spec.suspend; PyTorchJob:
runPolicy.suspend; TrainJob, RayJob: spec.suspend) and lifts the suspension once the workload is
admitted into its LocalQueue's ClusterQueue. The queue comes from the workload's
kueue.x-k8s.io/queue-name label; a cluster configured with manageJobsWithoutQueueName also manages
workloads without one, and those are never admitted. At admission Kueue adds the ResourceFlavor's
node labels and tolerations to each pod set: to the pods' own tolerations, as more entries.
"""
from __future__ import annotations

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
