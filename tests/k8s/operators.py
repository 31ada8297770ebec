"""What the controllers do with our objects: the pods they create and what they inject.

Each function takes one rendered object and returns the pods a cluster would run for it, with
the environment the controller adds, in the controller's own terms (pod names, DNS names,
ports), except that every DNS name and served port goes through `Network`, which maps them
onto this machine. Emulated, read from the projects' sources (not copied):

- Kubeflow Training Operator v1.8/v1.9 PyTorchJob, pkg/controller.v1/pytorch/envvar.go,
  master.go, elastic.go and pkg/apis/kubeflow.org/v1/pytorch_defaults.go: MASTER_ADDR /
  PET_MASTER_ADDR = <job>-master-0 (a Service per replica), MASTER_PORT / PET_MASTER_PORT = the
  master's port named pytorchjob-port (default 23456), WORLD_SIZE = replicas x nprocPerNode,
  RANK = PET_NODE_RANK = pod index (+1 for workers), PET_NPROC_PER_NODE = spec.nprocPerNode
  (for every pod since kubeflow/training-operator#1948), PET_NNODES = all replicas; with an
  elasticPolicy instead PET_RDZV_ENDPOINT = <job>-worker-0:<rdzvPort>, PET_RDZV_BACKEND,
  PET_NNODES = min:max (default: the worker replicas), PET_MAX_RESTARTS, PET_RDZV_ID,
  PET_RDZV_CONF = "k=v,...". Appended after the user's env, so they win.
- Kubeflow Trainer v2 torch plugin, pkg/runtime/framework/plugins/torch/torch.go, and the
  torch-distributed ClusterTrainingRuntime (manifests/base/runtimes/torch_distributed.yaml,
  replicated job and container both named `node`): PET_NNODES = trainer.numNodes,
  PET_NPROC_PER_NODE (auto on a CPU-only node becomes its CPU limit), PET_NODE_RANK = the
  completion index (a fieldRef), PET_MASTER_ADDR = <job>-node-0-0.<job>, PET_MASTER_PORT = 29500.
  The JobSet makes one Indexed Job <job>-node-0 with a headless Service named <job>.
- The Job controller (Indexed): JOB_COMPLETION_INDEX and the annotation it comes from, the
  hostname <job>-<index>, DNS <hostname>.<subdomain> when a headless Service of that name
  selects the pod.
- KubeRay v1.7 RayJob (ray-operator/controllers/ray/common/pod.go, job.go): a head pod running
  `ray start --head --block` with rayStartParams (num-cpus defaulting to the CPU limit), worker
  pods running `ray start --address=<head>:6379 --block`, then a submitter pod whose script
  (common/job.go GetK8sJobCommand) follows the job if it exists, else runs `ray job submit
  --address http://<head>:8265 --submission-id <id> -- <entrypoint>`; the RayJob's outcome is
  the job's status, which the operator reads from the head.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

from tests.helpers import free_port
from tests.k8s.render import quantity

LOOPBACK = "127.0.0.1"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
RUNTIME_JOB = RUNTIME_CONTAINER = "node"  # torch-distributed's replicated job and container
TRAINER_PORT = 29500                      # Trainer v2 ContainerTrainerPort
PYTORCHJOB_PORT = ("pytorchjob-port", 23456)


class Network:
    """Cluster DNS on one machine: every pod is 127.0.0.1, every served port a free local one.

    Only the names a controller (or a headless Service) really creates are registered, so a
    manifest that names a host wrongly keeps the wrong name and its pods cannot connect.
    """

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.ports: dict = {}

    def host(self, name: str) -> str:
        self.names.add(name)
        return LOOPBACK

    def port(self, port: int, pod: str = "") -> int:
        """The local port standing in for a served port (of one pod when the pods all serve it)."""
        port = (pod, port) if pod else port
        if port not in self.ports:
            self.ports[port] = free_port()
        return self.ports[port]

    def endpoint(self, name: str, port: int) -> str:
        return f"{self.host(name)}:{self.port(port)}"

    def rewrite(self, text: str) -> str:
        """Registered names in a manifest string (args, env values) -> 127.0.0.1[:local port]."""
        for name in sorted(self.names, key=len, reverse=True):
            pattern = r"(?<![\w.-])" + re.escape(name) + r"(?::(\d+))?(?![\w.-])"
            text = re.sub(pattern, lambda m: LOOPBACK + (f":{self.port(int(m.group(1)))}" if m.group(1) else ""), text)
        return text


@dataclass
class Pod:
    """One pod as its controller creates it; `template` holds the injected env already. Whether
    a failed pod restarts in place (OnFailure) or is replaced (Never), its command runs afresh:
    for these pods, whose only emptyDir is /dev/shm, the two look the same from inside."""
    name: str
    hostname: str
    template: dict
    serves: int | None = None       # local port to wait for before the other pods start


def _env(name: str, value) -> dict:
    return {"name": name, "value": str(value)}


def _inject(template: dict, env: list[dict], upsert: bool = False) -> None:
    """Add env to every container: appended (training operator) or replacing same names (Trainer)."""
    for container in template["spec"]["containers"]:
        current = container.setdefault("env", [])
        if upsert:
            names = {e["name"] for e in env}
            current[:] = [e for e in current if e["name"] not in names]
        current.extend(copy.deepcopy(env))


def _named_port(template: dict, container: str, port_name: str, default: int) -> int:
    for c in template["spec"]["containers"]:
        if c["name"] == container:
            for p in c.get("ports", []):
                if p.get("name") == port_name:
                    return p["containerPort"]
    return default


# --- Kubeflow Training Operator: PyTorchJob ---------------------------------------------------
def pytorchjob_pods(job: dict, net: Network) -> list[Pod]:
    name, spec = job["metadata"]["name"], job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    counts = {rtype: rs.get("replicas", 1) for rtype, rs in specs.items()}
    nproc, elastic = spec.get("nprocPerNode"), spec.get("elasticPolicy")
    procs = int(nproc) if str(nproc).isdigit() else 1
    pods = []
    for rtype in ("Master", "Worker"):
        for index in range(counts.get(rtype, 0)):
            env = [_env("PYTHONUNBUFFERED", "0")]
            serves = None
            if "Master" in specs:
                port = _named_port(specs["Master"]["template"], "pytorch", *PYTORCHJOB_PORT)
                rank = index + (rtype == "Worker")
                addr, local_port = net.host(f"{name}-master-0"), net.port(port)
                env += [_env("MASTER_PORT", local_port), _env("PET_MASTER_PORT", local_port),
                        _env("MASTER_ADDR", addr), _env("PET_MASTER_ADDR", addr),
                        _env("WORLD_SIZE", sum(counts.values()) * procs), _env("RANK", rank),
                        _env("PET_NODE_RANK", rank)]
                serves = local_port if rtype == "Master" else None
            if nproc is not None:
                env.append(_env("PET_NPROC_PER_NODE", nproc))
            if elastic:
                env += _elastic_env(name, elastic, specs, counts, net)
                serves = net.port(_rdzv_port(elastic, specs)) if (rtype, index) == ("Worker", 0) else serves
            else:
                env.append(_env("PET_NNODES", sum(counts.values())))
            pod_name = f"{name}-{rtype.lower()}-{index}"
            net.host(pod_name)  # the operator's Service per replica, named as the pod
            template = copy.deepcopy(specs[rtype]["template"])
            _inject(template, env)
            # torch hosts the c10d store in the agent whose hostname is the endpoint's host; on one
            # machine every name is this host, so that pod must simply bind first: it starts first.
            pods.append(Pod(pod_name, pod_name, template, serves))
    return pods


def _rdzv_port(elastic: dict, specs: dict) -> int:
    return elastic.get("rdzvPort") or _named_port(specs["Worker"]["template"], "pytorch", *PYTORCHJOB_PORT)


def _elastic_env(name: str, elastic: dict, specs: dict, counts: dict, net: Network) -> list[dict]:
    host = elastic.get("rdzvHost", f"{name}-worker-0")
    low = elastic.get("minReplicas", elastic.get("maxReplicas", counts.get("Worker")))
    high = elastic.get("maxReplicas", low)
    env = [_env("PET_RDZV_ENDPOINT", net.endpoint(host, _rdzv_port(elastic, specs))),
           _env("PET_RDZV_BACKEND", elastic.get("rdzvBackend", "c10d")), _env("PET_NNODES", f"{low}:{high}")]
    for key, var in (("maxRestarts", "PET_MAX_RESTARTS"), ("nProcPerNode", "PET_NPROC_PER_NODE"),
                     ("rdzvId", "PET_RDZV_ID")):
        if key in elastic:
            env.append(_env(var, elastic[key]))
    if elastic.get("rdzvConf"):
        env.append(_env("PET_RDZV_CONF", ",".join(f"{c['key']}={c['value']}" for c in elastic["rdzvConf"])))
    if elastic.get("standalone"):
        env.append(_env("PET_STANDALONE", ""))
    return env


# --- The Job controller: Indexed Job ------------------------------------------------------------
def indexed_job_pods(job: dict, objects: list[dict], net: Network) -> list[Pod]:
    name, spec = job["metadata"]["name"], job["spec"]
    subdomain = spec["template"]["spec"].get("subdomain")
    services = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == subdomain
                and o["spec"].get("clusterIP") == "None"]
    pods = []
    for index in range(spec.get("completions", 1)):
        template = copy.deepcopy(spec["template"])
        meta = template.setdefault("metadata", {})
        labels = {**meta.get("labels", {}), "batch.kubernetes.io/job-name": name, "job-name": name,
                  "batch.kubernetes.io/job-completion-index": str(index)}
        meta["labels"] = labels
        meta.setdefault("annotations", {})["batch.kubernetes.io/job-completion-index"] = str(index)
        index = {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}
        _inject(template, [index])
        hostname = f"{name}-{index}"
        for svc in services:  # DNS <hostname>.<subdomain>[.<namespace>.svc.cluster.local]
            if all(labels.get(k) == v for k, v in svc["spec"].get("selector", {}).items()):
                net.host(f"{hostname}.{subdomain}")
                net.host(f"{hostname}.{subdomain}.default.svc.cluster.local")
        pods.append(Pod(f"{name}-{index}", hostname, template))
    return pods


# --- Kubeflow Trainer v2: TrainJob -> JobSet -> Indexed Job -------------------------------------
def trainjob_template(train_job: dict) -> dict:
    """The `node` pod template once the Trainer has merged the TrainJob into the runtime."""
    trainer = train_job["spec"].get("trainer", {})
    template = {"metadata": {}, "spec": {"containers": [{"name": RUNTIME_CONTAINER}]}}
    for patch in train_job["spec"].get("runtimePatches", []):
        jobs = patch.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
        for job in jobs:
            if job["name"] != RUNTIME_JOB:
                continue
            pod = job.get("template", {}).get("spec", {}).get("template", {})
            for key, value in pod.get("metadata", {}).items():
                template["metadata"].setdefault(key, {}).update(value)
            for key, value in pod.get("spec", {}).items():
                if key == "containers":
                    for c in value:
                        _container(template, c["name"]).update(copy.deepcopy(c))
                else:
                    template["spec"][key] = copy.deepcopy(value)
    node = _container(template, RUNTIME_CONTAINER)
    for key in ("image", "command", "args"):
        if key in trainer:
            node[key] = trainer[key]
    node["env"] = node.get("env", []) + copy.deepcopy(trainer.get("env", []))
    if "resourcesPerNode" in trainer:
        node["resources"] = copy.deepcopy(trainer["resourcesPerNode"])
    node.setdefault("ports", []).append({"containerPort": TRAINER_PORT})
    return template


def _container(template: dict, name: str) -> dict:
    containers = template["spec"]["containers"]
    found = next((c for c in containers if c["name"] == name), None)
    if found is None:
        found = {"name": name}
        containers.append(found)
    return found


def trainjob_nproc(trainer: dict) -> str:
    """PET_NPROC_PER_NODE as the torch plugin computes it from numProcPerNode and the resources."""
    nproc = str(trainer.get("numProcPerNode", "auto"))
    resources = trainer.get("resourcesPerNode")
    if not resources or nproc not in ("auto", "cpu"):
        return nproc
    for section in ("limits", "requests"):
        found = resources.get(section) or {}
        uses_cpu = ("cpu" in found) if nproc == "cpu" else not any("gpu" in r.lower() for r in found)
        if uses_cpu and found:
            return str(max(1, int(quantity(found.get("cpu", 1)))))
    return "1" if nproc == "cpu" else nproc


def trainjob_pods(train_job: dict, net: Network) -> list[Pod]:
    name, trainer = train_job["metadata"]["name"], train_job["spec"].get("trainer", {})
    nodes = trainer.get("numNodes", 1)
    template = trainjob_template(train_job)
    template["spec"]["subdomain"] = name
    template["spec"].setdefault("restartPolicy", "OnFailure")
    job = {"metadata": {"name": f"{name}-{RUNTIME_JOB}-0"},
           "spec": {"completions": nodes, "parallelism": nodes, "template": template}}
    service = {"kind": "Service", "metadata": {"name": name}, "spec": {"clusterIP": "None", "selector": {}}}
    master = f"{name}-{RUNTIME_JOB}-0-0.{name}"
    env = [_env("PET_NNODES", nodes), _env("PET_NPROC_PER_NODE", trainjob_nproc(trainer)),
           {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
           _env("PET_MASTER_ADDR", net.host(master)), _env("PET_MASTER_PORT", net.port(TRAINER_PORT))]
    _inject(template, env, upsert=True)
    return indexed_job_pods(job, [service], net)


# --- KubeRay: RayJob ------------------------------------------------------------------------------
def ray_start_params(group: dict) -> dict[str, str]:
    """rayStartParams, with num-cpus / num-gpus from the Ray container's limits when absent."""
    params = dict(group.get("rayStartParams") or {})
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(math.ceil(quantity(limits["cpu"])))
    if "num-gpus" not in params and "nvidia.com/gpu" in limits:
        params["num-gpus"] = str(int(quantity(limits["nvidia.com/gpu"])))
    return params


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
    if not box.get("command"):  # KubeRay fills in its submit script when the template has none
        address, job_id = f"http://{LOOPBACK}:{dashboard}", f"{name}-local"
        box["command"] = ["/bin/sh", "-c"]
        box["args"] = [(f"if ray job status --address {address} {job_id} >/dev/null 2>&1 ; "
                        f"then ray job logs --address {address} --follow {job_id} ; "
                        f"else ray job submit --address {address} --submission-id {job_id} -- "
                        f"{spec['entrypoint'].strip()} ; fi")]
    return head, workers, Pod(f"{name}-submitter", f"{name}-submitter", submitter)


def _ray_template(group: dict, first: list[str], params: dict, pod: str, net: Network) -> dict:
    template = copy.deepcopy(group["template"])
    # A port every Ray node serves (KubeRay passes 52365 to each pod): one per pod here.
    params = {**params, "dashboard-agent-listen-port": str(net.port(52365, pod))}
    flags = [f"--{k}" if v is None else f"--{k}={v}" for k, v in params.items()]
    template["spec"]["containers"][0]["command"] = ["ray", "start", *first, *flags, "--block"]
    return template


# --- every pod template an object holds, for the rules ------------------------------------------
def pod_templates(obj: dict) -> list[tuple[str, dict, bool]]:
    """(where, pod template, runs training?) for each pod template of a workload object."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Job":
        return [("spec.template", spec["template"], True)]
    if kind == "PyTorchJob":
        return [(f"spec.pytorchReplicaSpecs.{r}.template", rs["template"], True)
                for r, rs in spec["pytorchReplicaSpecs"].items()]
    if kind == "TrainJob":
        return [("spec.trainer + spec.runtimePatches", trainjob_template(obj), True)]
    if kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        found = [("spec.rayClusterSpec.headGroupSpec.template", cluster["headGroupSpec"]["template"], True)]
        found += [(f"spec.rayClusterSpec.workerGroupSpecs[{i}].template", g["template"], True)
                  for i, g in enumerate(cluster.get("workerGroupSpecs", []))]
        if "submitterPodTemplate" in spec:
            found.append(("spec.submitterPodTemplate", spec["submitterPodTemplate"], False))
        return found
    return []
