"""What the operators' admission webhooks refuse, or their controllers assume, and no CRD schema
holds. Read from the operators' sources (not copied):

- PyTorchJob (kubeflow/trainer at v1.9.4, pkg/webhooks/pytorch/pytorchjob_webhook.go): only
  Master and Worker, each with a container named `pytorch`, one Master; an elastic job's Worker
  replicas within [minReplicas, maxReplicas].
- TrainJob (kubeflow/trainer at v2.3.0): the JobSet plugin's Validate
  (pkg/runtime/framework/plugins/jobset/jobset.go) refuses a runtimePatches[].manager that is
  not a domain-prefixed path (apimachinery's IsDomainPrefixedPath: an RFC 1123 subdomain, "/",
  an HTTP path; test/integration/webhooks/trainjob_test.go expects "kueue.k8s.io/" denied), a
  patched replicated job, container or init container the runtime does not have, and env on the
  `node` container through a patch; the torch plugin (plugins/torch/torch.go, with
  pkg/constants TorchRunReservedEnvNames) refuses the PET_* it injects in spec.trainer.env. The
  schema bounds the manager's length only, so strict validation passes what the webhook refuses.
- RayJob (KubeRay v1.7): worker groups with minReplicas <= replicas <= maxReplicas; the
  entrypoint runs in the job's working directory, the raylet's, so it runs the installed
  launcher (`python -m distributed_step ray`), never a script by a relative path.
- An Indexed Job with a headless Service whose pods find each other by name.

`operator_errors` returns a list of messages, empty when all holds.
"""
from __future__ import annotations

import re
import shlex

from testing.k8s.operators import RUNTIME_CONTAINER, RUNTIME_JOB, pod_templates
from testing.k8s.render import ROOT, VAR_REF, config_maps, workload
from testing.k8s.rules import command_text, env_of, flag

# Names a controller adds to the containers' environment (see testing.k8s.operators).
INJECTED = {
    "Job": {"JOB_COMPLETION_INDEX", "HOSTNAME"},
    "PyTorchJob": {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PYTHONUNBUFFERED", "HOSTNAME",
                   "PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE",
                   "PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND", "PET_MAX_RESTARTS", "PET_RDZV_ID", "PET_RDZV_CONF"},
    "TrainJob": {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
                 "JOB_COMPLETION_INDEX", "HOSTNAME"},
    "RayJob": {"HOSTNAME"},
}
TORCHRUN_RESERVED = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
# The containers a runtime patch may not give env (constants.DatasetInitializer, ModelInitializer, Node).
NO_PATCHED_ENV = {"dataset-initializer", "model-initializer", RUNTIME_CONTAINER}
# What the torch-distributed ClusterTrainingRuntime's replicated jobs hold (kubeflow/trainer v2.3.0,
# manifests/base/runtimes/torch_distributed.yaml): the job `node`, its one container `node`.
RUNTIME_CONTAINERS = {RUNTIME_JOB: {RUNTIME_CONTAINER}}
RAY_COMMAND = ["python", "-m", "distributed_step", "ray"]  # the installed package: any working directory


def operator_errors(objects: list[dict]) -> list[str]:
    obj = workload(objects)
    check = {"PyTorchJob": _pytorchjob, "TrainJob": _trainjob, "RayJob": _rayjob, "Job": _job}[obj["kind"]]
    errors = check(obj, objects)
    maps = config_maps(objects)
    for where, template, _ in pod_templates(obj):  # $(VAR): Kubernetes leaves an unknown name as it is
        for c in template["spec"]["containers"]:
            known = set(env_of(c, maps)) | INJECTED[obj["kind"]]
            for name in re.findall(r"(?<!\$)" + VAR_REF, command_text(c)):
                if name not in known:
                    errors.append(f"{where}: $({name}) is not defined in the container")
            if c.get("command", [])[:2] == ["/bin/sh", "-c"]:  # and $NAME in a shell script
                for name in re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", " ".join(c.get("args", []))):
                    if name not in known:
                        errors.append(f"{where}: the script uses ${name}, which is not set")
    return errors


def _pytorchjob(job: dict, objects: list[dict]) -> list[str]:
    spec, errors = job["spec"], []
    replicas = spec.get("pytorchReplicaSpecs", {})
    for rtype, rs in replicas.items():
        if rtype not in ("Master", "Worker"):
            errors.append(f"pytorchReplicaSpecs.{rtype}: only Master and Worker exist")
        names = [c["name"] for c in rs["template"]["spec"]["containers"]]
        if "pytorch" not in names:
            errors.append(f"pytorchReplicaSpecs.{rtype}: no container named pytorch (found {names})")
    if "Master" in replicas and replicas["Master"].get("replicas", 1) != 1:
        errors.append("pytorchReplicaSpecs.Master.replicas must be 1")
    elastic = spec.get("elasticPolicy")
    if elastic:
        workers = replicas.get("Worker", {}).get("replicas", 1) if "Worker" in replicas else 0
        if workers < 1:
            errors.append("an elastic PyTorchJob needs a Worker with at least 1 replica")
        if "nProcPerNode" in elastic and "nprocPerNode" in spec:
            errors.append("elasticPolicy.nProcPerNode must not be used with spec.nprocPerNode")
        low, high = elastic.get("minReplicas", workers), elastic.get("maxReplicas", workers)
        if not low <= workers <= high:
            errors.append(f"Worker replicas {workers} outside elasticPolicy [{low}, {high}]")
    elif "Master" not in replicas:
        errors.append("without a Master (or an elasticPolicy) no pod learns where to meet")
    return errors


_DNS1123_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_HTTP_PATH = r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+"


def domain_prefixed_path_error(value: str) -> str | None:
    """apimachinery's validation.IsDomainPrefixedPath, as a message or None."""
    host, slash, path = value.partition("/")
    if not (host and slash and path):
        return f"{value!r} must be a domain-prefixed path (such as \"acme.io/foo\")"
    if len(host) > 253 or not re.fullmatch(_DNS1123_SUBDOMAIN, host):
        return f"{host!r} is not a lowercase RFC 1123 subdomain"
    if not re.fullmatch(_HTTP_PATH, path):
        return f"{path!r} is not a valid HTTP path"
    return None


def _trainjob(job: dict, objects: list[dict]) -> list[str]:
    spec, errors, name = job["spec"], [], job["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not an RFC 1035 label of at most 63 characters")
    reserved = sorted(e["name"] for e in spec.get("trainer", {}).get("env", []) if e["name"] in TORCHRUN_RESERVED)
    if reserved:
        errors.append(f"spec.trainer.env sets {reserved}: the Trainer injects PET_* itself (reserved envs)")
    if spec.get("runtimeRef", {}).get("name") != "torch-distributed":
        errors.append("spec.runtimeRef.name: the torch-distributed runtime is the one these patches fit")
    for i, patch in enumerate(spec.get("runtimePatches", [])):
        where = f"spec.runtimePatches[{i}]"
        problem = domain_prefixed_path_error(patch.get("manager", ""))
        if problem:
            errors.append(f"{where}.manager: {problem} (the Trainer's webhook refuses the TrainJob)")
        errors += [f"{where}: {e}" for e in _patched_jobs(patch)]
    return errors


def _patched_jobs(patch: dict) -> list[str]:
    errors = []
    for rjob in patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", []):
        if rjob["name"] not in RUNTIME_CONTAINERS:
            errors.append(f"the runtime has no replicated job {rjob['name']!r}")
            continue
        have = RUNTIME_CONTAINERS[rjob["name"]]
        pod = rjob.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("initContainers", []):
            if c["name"] not in have:
                errors.append(f"the runtime's job {rjob['name']!r} has no initContainer {c['name']!r} to patch")
        for c in pod.get("containers", []):
            if c["name"] not in have:
                errors.append(f"the runtime's job {rjob['name']!r} has no container {c['name']!r}")
            elif c.get("env") and c["name"] in NO_PATCHED_ENV:
                errors.append(f"container {c['name']!r}: no env through runtimePatches (use spec.trainer.env)")
    return errors


def _rayjob(job: dict, objects: list[dict]) -> list[str]:
    spec, errors = job["spec"], []  # its backoffLimit and activeDeadlineSeconds: rules.LIMITS
    if "backoffLimit" not in spec.get("submitterConfig", {}):
        errors.append("spec.submitterConfig.backoffLimit unset")
    for i, group in enumerate(spec["rayClusterSpec"].get("workerGroupSpecs", [])):
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if low is None or high is None or not low <= group.get("replicas", low) <= high:
            errors.append(f"workerGroupSpecs[{i}]: needs minReplicas <= replicas <= maxReplicas")
    words = shlex.split(spec.get("entrypoint", ""))
    if words[:4] != RAY_COMMAND:
        errors.append(f"spec.entrypoint must run {' '.join(RAY_COMMAND)}: the installed launcher (the job runs in "
                      "the raylet's working directory, not the image's WORKDIR)")
    pin = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    if pin and spec["rayClusterSpec"].get("rayVersion") != pin.group(1):
        errors.append(f"rayClusterSpec.rayVersion must be the image's Ray, {pin.group(1)}")
    return errors


def _job(job: dict, objects: list[dict]) -> list[str]:
    spec, errors, name = job["spec"], [], job["metadata"]["name"]
    pod = spec["template"]["spec"]
    if spec.get("completionMode") != "Indexed" or spec.get("completions") != spec.get("parallelism"):
        errors.append("an Indexed Job with completions = parallelism: every node at once")
    if "podFailurePolicy" in spec and pod.get("restartPolicy") != "Never":
        errors.append("podFailurePolicy needs restartPolicy: Never")
    subdomain = pod.get("subdomain")
    labels = {**spec["template"].get("metadata", {}).get("labels", {}), "batch.kubernetes.io/job-name": name}
    services = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == subdomain]
    if not services or services[0]["spec"].get("clusterIP") != "None" or any(
            labels.get(k) != v for k, v in services[0]["spec"].get("selector", {}).items()):
        errors.append(f"subdomain {subdomain!r}: no headless Service of that name selects the pods")
    elif not services[0]["spec"].get("publishNotReadyAddresses"):
        errors.append(f"Service {subdomain}: publishNotReadyAddresses is not true: a pod's name would resolve "
                      "only once it is Ready")
    script = command_text(pod["containers"][0])
    if flag(script, "nnodes") != str(spec.get("completions")):
        errors.append("torchrun --nnodes must equal completions")
    endpoint = flag(script, "rdzv-endpoint") or ""
    if endpoint.split(":")[0] != f"{name}-0.{subdomain}":
        errors.append(f"--rdzv-endpoint {endpoint!r} is not pod 0 ({name}-0.{subdomain})")
    return errors
