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

Token authentication (rayClusterSpec.authOptions.mode: token, KubeRay >= 1.5.1): the operator
keeps a Secret named after the RayCluster (or authOptions.secretName, the user's) whose key
auth_token holds a random token, and adds RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (a secretKeyRef
to it) to the Ray container of every head and worker pod and to the submitter (the constants
RAY_AUTH_TOKEN_SECRET_KEY, RAY_AUTH_MODE_ENV_VAR, RAY_AUTH_TOKEN_ENV_VAR of ray-operator/
controllers/ray/utils; the submitter's env as KubeRay's own tests expect it). Read from excerpts
of those files found by search, not the whole of the v1.7.0 sources.
"""
from __future__ import annotations

import copy
import math
import secrets
import shlex

from testing.k8s.network import LOOPBACK, Network
from testing.k8s.operators import Pod, suspended
from testing.k8s.render import quantity

GCS_HEALTH = "api/gcs_healthz"  # utils.RayDashboardGCSHealthPath, probed with a 10 s timeout
AUTH_TOKEN_KEY = "auth_token"   # utils.RAY_AUTH_TOKEN_SECRET_KEY


def cluster_name(ray_job: dict) -> str:
    """The RayCluster a RayJob makes (KubeRay: <rayjob>-<5 random characters>; fixed here)."""
    return f"{ray_job['metadata']['name']}-raycluster"


def token_auth(ray_job: dict) -> bool:
    return (ray_job["spec"]["rayClusterSpec"].get("authOptions") or {}).get("mode") == "token"


def auth_secrets(ray_job: dict) -> list[dict]:
    """The Secret the operator creates for token authentication (none when the user names one)."""
    options = ray_job["spec"]["rayClusterSpec"].get("authOptions") or {}
    if not token_auth(ray_job) or options.get("secretName"):
        return []
    return [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": cluster_name(ray_job)},
             "stringData": {AUTH_TOKEN_KEY: secrets.token_hex(32)}}]


def auth_env(ray_job: dict) -> list[dict]:
    """What the operator adds to every Ray container and the submitter's with token authentication."""
    if not token_auth(ray_job):
        return []
    secret = ray_job["spec"]["rayClusterSpec"]["authOptions"].get("secretName") or cluster_name(ray_job)
    return [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": AUTH_TOKEN_KEY}}}]


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
    """(head, workers, submitter): the Ray container of each runs what KubeRay puts there; a
    suspended RayJob gets no cluster and no submitter (None, [], None)."""
    if suspended(ray_job):
        return None, [], None
    name, spec = ray_job["metadata"]["name"], ray_job["spec"]
    cluster = spec["rayClusterSpec"]
    head_group = cluster["headGroupSpec"]
    head_name = f"{name}-head"
    gcs, dashboard = net.port(6379), net.port(8265)
    service = f"{name}-head-svc"
    net.host(service, pod=head_name)  # KubeRay's head Service: the workers and the submitter reach the head by it
    # Here: the job server and GCS on loopback, and a short temp dir (Ray's socket paths).
    local = {"dashboard-host": LOOPBACK, "port": str(gcs), "dashboard-port": str(dashboard),
             "include-dashboard": "true", "temp-dir": temp_dir, "disable-usage-stats": None}
    head_params = {**ray_start_params(head_group), **local}
    head = Pod(head_name, head_name, _ray_template(ray_job, head_group, ["--head"], head_params, head_name, net),
               serves=dashboard)
    workers = []
    for group in cluster.get("workerGroupSpecs", []):
        params = {**ray_start_params(group), "address": f"{service}:6379"}
        for index in range(group.get("replicas", group.get("minReplicas", 0))):
            pod_name = f"{name}-{group['groupName']}-worker-{index}"
            workers.append(Pod(pod_name, pod_name, _ray_template(ray_job, group, [], params, pod_name, net)))
    submitter = copy.deepcopy(spec["submitterPodTemplate"])
    box = submitter["spec"]["containers"][0]
    if not box.get("command"):  # KubeRay fills in its script when the template has none
        box["command"] = ["/bin/bash", "-ce", "--"]  # utils.GetContainerCommand(["e"])
        box["args"] = [submit_script(f"http://{service}:8265", f"{name}-local", spec["entrypoint"])]
        box.setdefault("env", []).append({"name": "PYTHONUNBUFFERED", "value": "1"})
    box.setdefault("env", []).extend(auth_env(ray_job))
    submitter = Pod(f"{name}-submitter", f"{name}-submitter", submitter)
    for pod in (head, *workers, submitter):
        net.pod(pod.name, pod.template)
    return head, workers, submitter


def submission_id(submitter: Pod) -> str:
    words = shlex.split(submitter.template["spec"]["containers"][0]["args"][0])
    return words[words.index("--submission-id") + 1]


def _ray_template(ray_job: dict, group: dict, first: list[str], params: dict, pod: str, net: Network) -> dict:
    template = copy.deepcopy(group["template"])
    template["spec"]["containers"][0].setdefault("env", []).extend(auth_env(ray_job))
    # A port every Ray node serves (KubeRay passes 52365 to each pod): one per pod here.
    params = {**params, "dashboard-agent-listen-port": str(net.port(52365, pod))}
    flags = [f"--{k}" if v is None else f"--{k}={v}" for k, v in params.items()]
    template["spec"]["containers"][0]["command"] = ["ray", "start", *first, *flags, "--block"]
    return template
