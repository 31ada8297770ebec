"""What no schema holds: the operators' admission rules, and the promises of docs/kubernetes.md.

`operator_errors` checks what the controllers' webhooks (or their assumptions) refuse: one
PyTorchJob Master, its container named `pytorch`, no user-set PET_* in a TrainJob, RayJob
worker groups with min <= replicas <= max, an Indexed Job whose pods can find each other.
`house_errors` checks what every pod template here promises: a memory-backed /dev/shm,
requests = limits, a grace period longer than torchrun's shutdown timeout, the run directory on
the shared volume, no Istio sidecar, non-root without privilege escalation or capabilities,
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, and the retry and deadline limits each kind has.
Both return a list of messages, empty when all holds.
"""
from __future__ import annotations

import re
import shlex

from tests.k8s.operators import RUNTIME_CONTAINER, RUNTIME_JOB, pod_templates
from tests.k8s.render import ROOT, VAR_REF, config_maps, quantity, workload

# Names a controller adds to the containers' environment (see tests.k8s.operators).
INJECTED = {
    "Job": {"JOB_COMPLETION_INDEX", "HOSTNAME"},
    "PyTorchJob": {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PYTHONUNBUFFERED", "HOSTNAME",
                   "PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE",
                   "PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND", "PET_MAX_RESTARTS", "PET_RDZV_ID", "PET_RDZV_CONF"},
    "TrainJob": {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT",
                 "JOB_COMPLETION_INDEX", "HOSTNAME"},
    "RayJob": {"HOSTNAME"},
}


def env_of(container: dict, maps: dict[str, dict]) -> dict[str, str]:
    """The container's own variables (envFrom ConfigMaps, then env); references stay symbolic."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(maps.get(source.get("configMapRef", {}).get("name"), {}))
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = maps.get(ref["name"], {}).get(ref["key"], "")
        else:  # fieldRef, resourceFieldRef, ...: known at run time only
            env[var["name"]] = f"<{', '.join(source)}>"
    return env


def command_text(container: dict) -> str:
    return " ".join([*container.get("command", []), *container.get("args", [])])


def flag(text: str, name: str) -> str | None:
    """The value of --name in a command line (--name=V or --name V), quotes removed."""
    words = shlex.split(text)
    for i, word in enumerate(words):
        if word.startswith(f"--{name}="):
            return word.split("=", 1)[1]
        if word == f"--{name}" and i + 1 < len(words):
            return words[i + 1]
    return None


# --- operators ------------------------------------------------------------------------------
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


def _trainjob(job: dict, objects: list[dict]) -> list[str]:
    spec, errors, name = job["spec"], [], job["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not an RFC 1035 label of at most 63 characters")
    reserved = [e["name"] for e in spec.get("trainer", {}).get("env", []) if e["name"].startswith("PET_")]
    if reserved:
        errors.append(f"spec.trainer.env sets {reserved}: the Trainer injects PET_* itself")
    if spec.get("runtimeRef", {}).get("name") != "torch-distributed":
        errors.append("spec.runtimeRef.name: the torch-distributed runtime is the one these patches fit")
    for patch in spec.get("runtimePatches", []):
        for rjob in patch["trainingRuntimeSpec"]["template"]["spec"].get("replicatedJobs", []):
            if rjob["name"] != RUNTIME_JOB:
                errors.append(f"runtimePatches: the runtime has no replicated job {rjob['name']!r}")
            pod = rjob.get("template", {}).get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []):
                if c["name"] != RUNTIME_CONTAINER:
                    errors.append(f"runtimePatches: the runtime's job has no container {c['name']!r}")
    return errors


def _rayjob(job: dict, objects: list[dict]) -> list[str]:
    spec, errors = job["spec"], []  # its backoffLimit and activeDeadlineSeconds: LIMITS below
    if "backoffLimit" not in spec.get("submitterConfig", {}):
        errors.append("spec.submitterConfig.backoffLimit unset")
    for i, group in enumerate(spec["rayClusterSpec"].get("workerGroupSpecs", [])):
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if low is None or high is None or not low <= group.get("replicas", low) <= high:
            errors.append(f"workerGroupSpecs[{i}]: needs minReplicas <= replicas <= maxReplicas")
    words = shlex.split(spec.get("entrypoint", ""))
    if words[:2] != ["python", "launch/ray_job.py"] or not (ROOT / words[1]).is_file():
        errors.append("spec.entrypoint must run python launch/ray_job.py (from the image's WORKDIR)")
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
    script = command_text(pod["containers"][0])
    if flag(script, "nnodes") != str(spec.get("completions")):
        errors.append("torchrun --nnodes must equal completions")
    endpoint = flag(script, "rdzv-endpoint") or ""
    if endpoint.split(":")[0] != f"{name}-0.{subdomain}":
        errors.append(f"--rdzv-endpoint {endpoint!r} is not pod 0 ({name}-0.{subdomain})")
    return errors


# --- the house rules --------------------------------------------------------------------------
LIMITS = {"Job": ("spec.backoffLimit", "spec.activeDeadlineSeconds"),
          "PyTorchJob": ("spec.runPolicy.backoffLimit", "spec.runPolicy.activeDeadlineSeconds"),
          "TrainJob": ("spec.activeDeadlineSeconds",),
          "RayJob": ("spec.backoffLimit", "spec.activeDeadlineSeconds")}


def _get(obj: dict, dotted: str):
    for key in dotted.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def house_errors(objects: list[dict]) -> list[str]:
    obj, maps = workload(objects), config_maps(objects)
    errors = [f"{path} unset" for path in LIMITS[obj["kind"]] if _get(obj, path) is None]
    shutdown = int(maps.get("distributed-step-env", {}).get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30))
    out_dirs = []
    for where, template, trains in pod_templates(obj):
        spec, problems = template["spec"], []
        if template.get("metadata", {}).get("annotations", {}).get("sidecar.istio.io/inject") != "false":
            problems.append('no annotation sidecar.istio.io/inject: "false"')
        if spec.get("terminationGracePeriodSeconds", 30) <= shutdown:
            problems.append(f"terminationGracePeriodSeconds not above the {shutdown} s torchrun waits after SIGTERM")
        if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append("securityContext.runAsNonRoot is not true")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {v["name"] for v in volumes.values() if "persistentVolumeClaim" in v}
        for c in spec["containers"]:
            problems += _container_problems(c, volumes)
            if trains:
                env = env_of(c, maps)
                if env.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
                    problems.append(f"{c['name']}: TORCH_DISABLE_SHARE_RDZV_TCP_STORE is not 1")
                shared = [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in claims]
                out_dirs.append((where, shared))
        errors += [f"{where}: {p}" for p in problems]
    errors += _run_dir_errors(obj, out_dirs)
    return errors


def _container_problems(c: dict, volumes: dict) -> list[str]:
    problems = []
    shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    if not shm or volumes.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
        problems.append(f"{c['name']}: /dev/shm is not a memory-backed emptyDir")
    res = c.get("resources", {})
    requests, limits = res.get("requests", {}), res.get("limits", {})
    if not limits or set(requests) != set(limits) or any(quantity(requests[k]) != quantity(limits[k]) for k in limits):
        problems.append(f"{c['name']}: requests {requests} differ from limits {limits}")
    sc = c.get("securityContext", {})
    if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in sc.get("capabilities", {}).get("drop", []):
        problems.append(f"{c['name']}: needs allowPrivilegeEscalation: false and capabilities.drop: [ALL]")
    return problems


def _run_dir_errors(obj: dict, out_dirs: list[tuple[str, list[str]]]) -> list[str]:
    """--out (and Ray's --storage-path) under the shared volume, mounted alike in every pod."""
    if obj["kind"] == "RayJob":
        text, paths = obj["spec"]["entrypoint"], ("out", "storage-path")
    else:
        text, paths = command_text(next(c for _, t, _ in pod_templates(obj) for c in t["spec"]["containers"])), ("out",)
    errors = []
    for name in paths:
        value = flag(text, name) or ""
        for where, shared in out_dirs:
            if not any(value.startswith(m.rstrip("/") + "/") for m in shared):
                errors.append(f"{where}: --{name} {value!r} is not on the shared volume {shared}")
    return errors
