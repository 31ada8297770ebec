"""What KubeRay v1.7 (ray-project/kuberay at v1.7.0) does with a RayJob: the pods it creates and
the commands it puts in them, read from ray-operator/controllers/ray/common/pod.go, job.go and
rayjob_controller.go (not copied).

A head pod runs `ray start --head --block` with rayStartParams (num-cpus / num-gpus default to
the Ray container's limits), worker pods `ray start --address=<head>:6379 --block`. Once the
cluster is up, a submitter Job runs KubeRay's script in bash -ce (BuildJobSubmitCommand in
K8sJobMode): wait until the dashboard's /api/gcs_healthz answers, then, unless `ray job status`
knows the submission id already, `ray job submit --no-wait ... -- <entrypoint>`, then
`ray job logs --follow <id>`. The RayJob's outcome is the Ray job's status, which the operator
reads from the head, not the submitter's exit code.
"""
from __future__ import annotations

import copy
import math
import shlex

from tests.k8s.network import LOOPBACK, Network
from tests.k8s.operators import Pod
from tests.k8s.render import quantity

GCS_HEALTH = "api/gcs_healthz"  # utils.RayDashboardGCSHealthPath, probed with a 10 s timeout


def ray_start_params(group: dict) -> dict[str, str]:
    """rayStartParams, with num-cpus / num-gpus from the Ray container's limits when absent."""
    params = dict(group.get("rayStartParams") or {})
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(math.ceil(quantity(limits["cpu"])))
    if "num-gpus" not in params and "nvidia.com/gpu" in limits:
        params["num-gpus"] = str(int(quantity(limits["nvidia.com/gpu"])))
    return params


def submit_script(address: str, job_id: str, entrypoint: str) -> str:
    """The submitter's bash script (common/job.go BuildJobSubmitCommand, K8sJobMode)."""
    health = (f"python -c \"import urllib.request; r=urllib.request.urlopen('{address}/{GCS_HEALTH}', timeout=10); "
              "exit(0 if b'success' in r.read() else 1)\"")
    return (f"until {health} >/dev/null 2>&1 ; do echo \"Waiting for Ray Dashboard GCS to become healthy at "
            f"{address} ...\" ; sleep 2 ; done ; "
            f"if ! ray job status --address {address} {job_id} >/dev/null 2>&1 ; "
            f"then ray job submit --address {address} --no-wait --submission-id {job_id} -- {entrypoint.strip()} ; "
            f"fi ; ray job logs --address {address} --follow {job_id}")


def rayjob_pods(ray_job: dict, net: Network, temp_dir: str) -> tuple[Pod, list[Pod], Pod]:
    """(head, workers, submitter): the Ray container of each runs what KubeRay puts there."""
    name, spec = ray_job["metadata"]["name"], ray_job["spec"]
    cluster = spec["rayClusterSpec"]
    head_group = cluster["headGroupSpec"]
    head_name = f"{name}-head"
    gcs, dashboard = net.port(6379), net.port(8265)
    net.host(f"{name}-head-svc")
    # Here: the job server and GCS on loopback, and a short temp dir (Ray's socket paths).
    local = {"dashboard-host": LOOPBACK, "port": str(gcs), "dashboard-port": str(dashboard),
             "include-dashboard": "true", "temp-dir": temp_dir, "disable-usage-stats": None}
    head = Pod(head_name, head_name, _ray_template(head_group, ["--head"], {**ray_start_params(head_group), **local},
                                                   head_name, net), serves=dashboard)
    workers = []
    for group in cluster.get("workerGroupSpecs", []):
        params = {**ray_start_params(group), "address": f"{LOOPBACK}:{gcs}"}
        for index in range(group.get("replicas", group.get("minReplicas", 0))):
            pod_name = f"{name}-{group['groupName']}-worker-{index}"
            workers.append(Pod(pod_name, pod_name, _ray_template(group, [], params, pod_name, net)))
    submitter = copy.deepcopy(spec["submitterPodTemplate"])
    box = submitter["spec"]["containers"][0]
    if not box.get("command"):  # KubeRay fills in its script when the template has none
        box["command"] = ["/bin/bash", "-ce", "--"]  # utils.GetContainerCommand(["e"])
        box["args"] = [submit_script(f"http://{LOOPBACK}:{dashboard}", f"{name}-local", spec["entrypoint"])]
        box.setdefault("env", []).append({"name": "PYTHONUNBUFFERED", "value": "1"})
    return head, workers, Pod(f"{name}-submitter", f"{name}-submitter", submitter)


def submission_id(submitter: Pod) -> str:
    words = shlex.split(submitter.template["spec"]["containers"][0]["args"][0])
    return words[words.index("--submission-id") + 1]


def _ray_template(group: dict, first: list[str], params: dict, pod: str, net: Network) -> dict:
    template = copy.deepcopy(group["template"])
    # A port every Ray node serves (KubeRay passes 52365 to each pod): one per pod here.
    params = {**params, "dashboard-agent-listen-port": str(net.port(52365, pod))}
    flags = [f"--{k}" if v is None else f"--{k}={v}" for k, v in params.items()]
    template["spec"]["containers"][0]["command"] = ["ray", "start", *first, *flags, "--block"]
    return template
