"""The promises of docs/kubernetes.md that no schema holds: the house rules.

`house_errors` checks every pod template as its operator creates the pods (testing.k8s.operators:
with the training operator's init container in a PyTorchJob's workers): a memory-backed
/dev/shm, requests = limits in every container, init containers included (Guaranteed QoS), the
PodSecurity "restricted" settings (non-root, no privilege escalation, no capabilities, a seccomp
profile) in every container, a grace period longer than torchrun's shutdown timeout, the run
directory on the shared volume, no Istio sidecar, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, c10d
rendezvous timeouts that outlast a cold image pull, the retry and deadline limits each kind
has, a NetworkPolicy that selects every pod and admits the job's own pods (testing.k8s.netpol),
a RayJob's token authentication, and what a PodMonitor refers to (testing.k8s.monitoring). It
returns a list of messages, empty when all holds. The operators' own admission rules are in
testing.k8s.admission.
"""
from __future__ import annotations

import shlex
from pathlib import Path

from testing.k8s.monitoring import monitor_errors
from testing.k8s.netpol import policy_errors
from testing.k8s.operators import INIT_TEMPLATE, pod_templates, rdzv_conf_text
from testing.k8s.render import config_maps, quantity, workload

LIMITS = {"Job": ("spec.backoffLimit", "spec.activeDeadlineSeconds"),
          "PyTorchJob": ("spec.runPolicy.backoffLimit", "spec.runPolicy.activeDeadlineSeconds"),
          "TrainJob": ("spec.activeDeadlineSeconds",),
          "RayJob": ("spec.backoffLimit", "spec.activeDeadlineSeconds")}
# A c10d agent whose pod starts before the store's host waits read_timeout for it (torch's
# default: 60 s), and the first agent in waits join_timeout for the others (600 s): both must
# outlast a cold pull of the CUDA image on a fresh node, minutes.
COLD_START_S = 300
SECCOMP = ("RuntimeDefault", "Localhost")


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


def _get(obj: dict, dotted: str):
    for key in dotted.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def house_errors(objects: list[dict], init_template: Path | None = INIT_TEMPLATE) -> list[str]:
    """`init_template`: the training operator's init container template (testing.k8s.operators)."""
    obj, maps = workload(objects), config_maps(objects)
    errors = [f"{path} unset" for path in LIMITS[obj["kind"]] if _get(obj, path) is None]
    shutdown = int(maps.get("distributed-step-env", {}).get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30))
    out_dirs = []
    for where, template, trains in pod_templates(obj, init_template, created=True):
        spec, problems = template["spec"], []
        if template.get("metadata", {}).get("annotations", {}).get("sidecar.istio.io/inject") != "false":
            problems.append('no annotation sidecar.istio.io/inject: "false"')
        if spec.get("terminationGracePeriodSeconds", 30) <= shutdown:
            problems.append(f"terminationGracePeriodSeconds not above the {shutdown} s torchrun waits after SIGTERM")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {v["name"] for v in volumes.values() if "persistentVolumeClaim" in v}
        problems += _restricted_problems(spec)
        for c in spec.get("initContainers", []):
            problems += _guaranteed_problems(c)
        for c in spec["containers"]:
            problems += _shm_problems(c, volumes) + _guaranteed_problems(c)
            if trains:
                if env_of(c, maps).get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
                    problems.append(f"{c['name']}: TORCH_DISABLE_SHARE_RDZV_TCP_STORE is not 1")
                out_dirs.append((where, [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] in claims]))
        errors += [f"{where}: {p}" for p in problems]
    labels = [(where, t.get("metadata", {}).get("labels", {})) for where, t, _ in pod_templates(obj, init_template)]
    errors += policy_errors(objects, labels, obj["kind"]) + _ray_auth_errors(obj)
    return errors + _run_dir_errors(obj, out_dirs) + _rendezvous_errors(obj) + monitor_errors(objects)


def _ray_auth_errors(obj: dict) -> list[str]:
    """A RayJob's cluster with Ray's token authentication: without it, whoever reaches the job
    server (:8265) or the GCS can run code there."""
    if obj["kind"] != "RayJob":
        return []
    if _get(obj, "spec.rayClusterSpec.authOptions.mode") != "token":
        return ["spec.rayClusterSpec.authOptions.mode is not token (Ray's token authentication, KubeRay >= 1.5.1)"]
    return []


def _shm_problems(c: dict, volumes: dict) -> list[str]:
    shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    if not shm or volumes.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
        return [f"{c['name']}: /dev/shm is not a memory-backed emptyDir"]
    return []


def _guaranteed_problems(c: dict) -> list[str]:
    """Guaranteed QoS needs requests = limits for CPU and memory in every container, init ones too."""
    res = c.get("resources", {})
    requests, limits = res.get("requests", {}), res.get("limits", {})
    if (not {"cpu", "memory"} <= set(limits) or set(requests) != set(limits)
            or any(quantity(requests[k]) != quantity(limits[k]) for k in limits)):
        return [f"{c['name']}: requests {requests} differ from limits {limits} (the pod would not be Guaranteed)"]
    return []


def _restricted_problems(spec: dict) -> list[str]:
    """PodSecurity "restricted" (kubernetes.io/docs/concepts/security/pod-security-standards), for
    every container of the pod, init containers included."""
    pod_context, problems = spec.get("securityContext", {}), []
    if pod_context.get("runAsNonRoot") is not True:
        problems.append("securityContext.runAsNonRoot is not true")
    for c in [*spec.get("initContainers", []), *spec["containers"]]:
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False or "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{c['name']}: needs allowPrivilegeEscalation: false and capabilities.drop: [ALL] "
                            "(PodSecurity restricted)")
        if (sc.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type") not in SECCOMP:
            problems.append(f"{c['name']}: no RuntimeDefault seccomp profile (PodSecurity restricted)")
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


def _rendezvous_errors(obj: dict) -> list[str]:
    """Every torchrun agent of a c10d rendezvous: read_timeout and join_timeout of COLD_START_S or more."""
    if obj["kind"] not in ("Job", "PyTorchJob"):
        return []  # TrainJob: torchrun's static rendezvous (its store client waits 600 s); RayJob: no torchrun
    elastic, errors = obj["spec"].get("elasticPolicy"), []
    for where, template, _ in pod_templates(obj):
        text = command_text(template["spec"]["containers"][0])
        backend = flag(text, "rdzv-backend") or (elastic or {}).get("rdzvBackend", "c10d" if elastic else None)
        if backend != "c10d":
            continue
        conf = flag(text, "rdzv-conf") or (rdzv_conf_text(elastic) if elastic else "")
        settings = dict(item.split("=", 1) for item in conf.split(",") if "=" in item)
        for key in ("read_timeout", "join_timeout"):
            value = settings.get(key, "")
            if not (value.isdigit() and int(value) >= COLD_START_S):
                errors.append(f"{where}: c10d rendezvous {key} is {value or 'unset'}: set it to {COLD_START_S} s or "
                              "more, so that a pod that waits for a cold image pull of another does not fail")
    return errors
