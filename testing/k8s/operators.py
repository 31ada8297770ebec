"""What the training controllers do with our objects: the pods they create and what they inject.

Each function takes one rendered object and returns the pods a cluster would run for it, with
what the controller adds, in the controller's own terms (pod names, DNS names, ports), except
that every DNS name and served port goes through `network.Network`, which maps them onto this
machine. KubeRay's part is in testing.k8s.kuberay. Emulated, read from the projects' sources (not
copied):

- Kubeflow Training Operator v1.8/v1.9 PyTorchJob (kubeflow/trainer at v1.9.4),
  pkg/controller.v1/pytorch/envvar.go, master.go, elastic.go, initcontainer.go and
  pkg/apis/kubeflow.org/v1/pytorch_defaults.go: PYTHONUNBUFFERED=1, MASTER_ADDR /
  PET_MASTER_ADDR = <job>-master-0 (a Service per replica), MASTER_PORT / PET_MASTER_PORT = the
  master's port named pytorchjob-port (default 23456), WORLD_SIZE = replicas x nprocPerNode,
  RANK = PET_NODE_RANK = pod index (+1 for workers), PET_NPROC_PER_NODE = spec.nprocPerNode
  (for every pod since kubeflow/training-operator#1948), PET_NNODES = all replicas; with an
  elasticPolicy instead PET_RDZV_ENDPOINT = <job>-worker-0:<rdzvPort>, PET_RDZV_BACKEND,
  PET_NNODES = min:max (default: the worker replicas), PET_MAX_RESTARTS, PET_RDZV_ID,
  PET_RDZV_CONF = "k=v,...". Appended after the user's env, so they win. With a Master, every
  Worker pod gets the init container `init-pytorch`, which waits until the master's name
  resolves. The per-replica Services are headless without publishNotReadyAddresses
  (pkg/controller.v1/common/service.go): a pod's name resolves once it is Ready.
- Kubeflow Trainer v2 (kubeflow/trainer at v2.3.0), pkg/runtime/framework/plugins/torch/torch.go,
  and the torch-distributed ClusterTrainingRuntime (manifests/base/runtimes/torch_distributed.yaml,
  replicated job and container both named `node`, no backoffLimit): PET_NNODES = numNodes,
  PET_NPROC_PER_NODE (numProcPerNode, else on a node without GPUs its CPU request, else its CPU
  limit, rounded up, at least 1; with GPUs "auto"), PET_NODE_RANK = the completion index (a
  fieldRef), PET_MASTER_ADDR = <job>-node-0-0.<job>, PET_MASTER_PORT = 29500. The JobSet
  (kubernetes-sigs/jobset at v0.12.0, pkg/webhooks/jobset_webhook.go, pkg/controllers/
  jobset_controller.go) makes one Indexed Job <job>-node-0 whose pods restart in place
  (restartPolicy defaults to OnFailure) and a headless Service <job> that publishes pods before
  they are Ready.
- The Job controller (Indexed): JOB_COMPLETION_INDEX and the annotation it comes from, the
  hostname <job>-<index>, DNS <hostname>.<subdomain> when a headless Service of that name
  selects the pod; backoffLimit 6 when unset.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from testing.k8s.network import Network
from testing.k8s.render import K8S, quantity

COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
RUNTIME_JOB = RUNTIME_CONTAINER = "node"  # torch-distributed's replicated job and container
TRAINER_PORT = 29500                      # Trainer v2 ContainerTrainerPort
PYTORCHJOB_PORT = ("pytorchjob-port", 23456)
JOB_BACKOFF_LIMIT = 6                     # a Job's default; the TrainJob's runtime Job keeps it


@dataclass
class Pod:
    """One pod as its controller creates it; `template` holds the injected env already.

    `serves`: the local port of the rendezvous store it hosts (held by the Network until the pod
    starts). A pod whose restartPolicy is OnFailure restarts in place: same pod, its init
    containers not run again, and its restarts count against the backoff limit with `>=` (the
    Job controller's and the training operator's rule); a Never pod is replaced and its failures
    count with `>`."""
    name: str
    hostname: str
    template: dict
    serves: int | None = None

    @property
    def in_place(self) -> bool:
        return self.template["spec"].get("restartPolicy") == "OnFailure"


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
# The operator's flags for the worker's init container (cmd/training-operator.v1/main.go) and
# their defaults (pkg/config/config.go): --pytorch-init-container-image alpine:3.10,
# --pytorch-init-container-max-tries 100, --pytorch-init-container-template-file
# /etc/config/initContainer.yaml, read if it exists, else the built-in container below.
INIT_IMAGE, INIT_MAX_TRIES = "alpine:3.10", 100
# The template this project gives the operator (docs/kubernetes.md): the operator as installed
# there. None stands for an operator left with its built-in template.
INIT_TEMPLATE = K8S / "pytorchjob" / "operator" / "initContainer.yaml"


def init_containers(master: str, template: Path | None = INIT_TEMPLATE) -> list[dict]:
    """What the operator adds to every Worker pod of a PyTorchJob with a Master."""
    if template is None:  # pkg/controller.v1/pytorch/initcontainer.go: requests below limits, no securityContext
        loop = (f"err=1;for i in $(seq {INIT_MAX_TRIES}); do if nslookup {master}; then err=0 && break; fi;"
                "echo waiting for master; sleep 2; done; exit $err")
        resources = {"limits": {"cpu": "100m", "memory": "20Mi"}, "requests": {"cpu": "50m", "memory": "10Mi"}}
        return [{"name": "init-pytorch", "image": INIT_IMAGE, "imagePullPolicy": "IfNotPresent",
                 "resources": resources, "command": ["sh", "-c", loop]}]
    # The operator fills in a Go text/template; these three fields are all it passes.
    text = template.read_text()
    for field, value in (("InitContainerImage", INIT_IMAGE), ("MaxTries", INIT_MAX_TRIES), ("MasterAddr", master)):
        text = text.replace("{{." + field + "}}", str(value))
    return yaml.safe_load(text)


def pytorchjob_templates(job: dict, init_template: Path | None = INIT_TEMPLATE) -> dict[str, dict]:
    """Replica type -> the pod template the operator creates its pods from (before the env)."""
    specs, found = job["spec"]["pytorchReplicaSpecs"], {}
    for rtype, rs in specs.items():
        template = copy.deepcopy(rs["template"])
        # setRestartPolicy: ExitCode means Never for the pod; the operator restarts by exit code.
        policy = rs.get("restartPolicy", "Never")
        template["spec"]["restartPolicy"] = "Never" if policy == "ExitCode" else policy
        if rtype == "Worker" and "Master" in specs:
            master = f"{job['metadata']['name']}-master-0"
            template["spec"]["initContainers"] = (template["spec"].get("initContainers", [])
                                                  + init_containers(master, init_template))
        found[rtype] = template
    return found


def pytorchjob_pods(job: dict, net: Network, init_template: Path | None = INIT_TEMPLATE) -> list[Pod]:
    if "kind" in job and suspended(job):
        return []  # suspended: no pods until it is resumed (Kueue: admitted)
    name, spec = job["metadata"]["name"], job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    templates = pytorchjob_templates(job, init_template)
    counts = {rtype: rs.get("replicas", 1) for rtype, rs in specs.items()}
    nproc, elastic = spec.get("nprocPerNode"), spec.get("elasticPolicy")
    procs = int(nproc) if str(nproc).isdigit() else 1
    pods = []
    for rtype in ("Master", "Worker"):
        for index in range(counts.get(rtype, 0)):
            pod_name = f"{name}-{rtype.lower()}-{index}"
            net.host(pod_name, ready_pod=pod_name)  # the operator's Service per replica: Ready pods only
            env = [_env("PYTHONUNBUFFERED", "1")]
            serves = None
            if "Master" in specs:
                port = _named_port(specs["Master"]["template"], "pytorch", *PYTORCHJOB_PORT)
                rank = index + (rtype == "Worker")
                master = f"{name}-master-0"
                # The name, as the operator writes it: the kubelet (testing.k8s.kubelet) maps it per pod.
                net.host(master, ready_pod=master)
                addr, local_port = master, net.port(port)
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
            template = copy.deepcopy(templates[rtype])
            _inject(template, env)
            # The operator's labels (its JobNameLabel, ReplicaTypeLabel, ReplicaIndexLabel) beside the
            # template's own: what a NetworkPolicy sees of the pod.
            template.setdefault("metadata", {})["labels"] = {
                **template["metadata"].get("labels", {}), "training.kubeflow.org/job-name": name,
                "training.kubeflow.org/replica-type": rtype.lower(), "training.kubeflow.org/replica-index": str(index)}
            net.pod(pod_name, template)
            pods.append(Pod(pod_name, pod_name, template, net.hold(serves) if serves else None))
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
        env.append(_env("PET_RDZV_CONF", rdzv_conf_text(elastic)))
    if elastic.get("standalone"):
        env.append(_env("PET_STANDALONE", ""))
    return env


def rdzv_conf_text(elastic: dict) -> str:
    """elasticPolicy.rdzvConf as the operator passes it: PET_RDZV_CONF = "k=v,k=v"."""
    return ",".join(f"{c['key']}={c['value']}" for c in elastic.get("rdzvConf", []))


# --- Suspension: every controller here creates no pods for a suspended workload -----------------
SUSPEND = {"Job": ("spec",), "PyTorchJob": ("spec", "runPolicy"), "TrainJob": ("spec",), "RayJob": ("spec",)}


def suspend_holder(workload: dict) -> dict:
    """The object whose `suspend` field the workload's controller reads."""
    holder = workload
    for key in SUSPEND[workload["kind"]]:
        holder = holder.setdefault(key, {})
    return holder


def suspended(workload: dict) -> bool:
    return bool(suspend_holder(workload).get("suspend"))


# --- The Job controller: Indexed Job ------------------------------------------------------------
def indexed_job_pods(job: dict, objects: list[dict], net: Network) -> list[Pod]:
    """Pod 0 hosts the rendezvous store, on its container's first declared port."""
    if "kind" in job and suspended(job):
        return []  # suspended: no pods until it is resumed (Kueue: admitted)
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
        _inject(template, [{"name": "JOB_COMPLETION_INDEX",
                            "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}])
        pod_name = hostname = f"{name}-{index}"
        for svc in services:  # DNS <hostname>.<subdomain>[.<namespace>.svc.cluster.local]
            if all(labels.get(k) == v for k, v in svc["spec"].get("selector", {}).items()):
                gate = None if svc["spec"].get("publishNotReadyAddresses") else pod_name
                net.host(f"{hostname}.{subdomain}", ready_pod=gate, pod=pod_name)
                net.host(f"{hostname}.{subdomain}.default.svc.cluster.local", ready_pod=gate, pod=pod_name)
        ports = template["spec"]["containers"][0].get("ports", [])
        serves = net.hold(net.port(ports[0]["containerPort"])) if index == 0 and ports else None
        net.pod(pod_name, template)
        pods.append(Pod(pod_name, hostname, template, serves))
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
    template["spec"].setdefault("restartPolicy", "OnFailure")  # the JobSet webhook's default
    return template


def _container(template: dict, name: str) -> dict:
    containers = template["spec"]["containers"]
    found = next((c for c in containers if c["name"] == name), None)
    if found is None:
        found = {"name": name}
        containers.append(found)
    return found


def trainjob_nproc(trainer: dict) -> str:
    """PET_NPROC_PER_NODE as the torch plugin computes it (EnforceMLPolicy, getNumCPUPerNode):
    numProcPerNode if set; else "auto" when the node asks for a GPU (any resource whose name holds
    "gpu", requests before limits), else the CPU request, or the limit without one, rounded up
    (Quantity.Value()), at least 1."""
    if "numProcPerNode" in trainer:
        return str(trainer["numProcPerNode"])
    resources = trainer.get("resourcesPerNode") or {}
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    if any("gpu" in name.lower() and quantity(v) > 0 for section in (requests, limits) for name, v in section.items()):
        return "auto"
    cpu = requests.get("cpu") if quantity(requests.get("cpu", 0)) > 0 else limits.get("cpu", 0)
    return str(max(1, math.ceil(quantity(cpu))))


def trainjob_pods(train_job: dict, net: Network) -> list[Pod]:
    if "kind" in train_job and suspended(train_job):
        return []  # suspended: no pods until it is resumed (Kueue: admitted)
    name, trainer = train_job["metadata"]["name"], train_job["spec"].get("trainer", {})
    nodes = trainer.get("numNodes", 1)
    template = trainjob_template(train_job)
    template["spec"]["subdomain"] = name
    job = {"metadata": {"name": f"{name}-{RUNTIME_JOB}-0"},
           "spec": {"completions": nodes, "parallelism": nodes, "template": template}}
    # The JobSet's headless Service publishes pods before they are Ready (its default).
    service = {"kind": "Service", "metadata": {"name": name},
               "spec": {"clusterIP": "None", "selector": {}, "publishNotReadyAddresses": True}}
    master = f"{name}-{RUNTIME_JOB}-0-0.{name}"  # registered with its pod by indexed_job_pods
    env = [_env("PET_NNODES", nodes), _env("PET_NPROC_PER_NODE", trainjob_nproc(trainer)),
           {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
           _env("PET_MASTER_ADDR", master), _env("PET_MASTER_PORT", net.port(TRAINER_PORT))]
    _inject(template, env, upsert=True)
    return indexed_job_pods(job, [service], net)


def backoff_limit(obj: dict) -> int | None:
    """The failures (Never) or restarts (OnFailure) the workload's controller allows; None: no limit."""
    spec = obj["spec"]
    if obj["kind"] == "Job":
        return spec.get("backoffLimit", JOB_BACKOFF_LIMIT)
    if obj["kind"] == "PyTorchJob":
        return spec.get("runPolicy", {}).get("backoffLimit")
    if obj["kind"] == "TrainJob":  # the runtime's Job: torch-distributed sets none, runtimePatches cannot
        return JOB_BACKOFF_LIMIT
    return spec.get("submitterConfig", {}).get("backoffLimit", 2)  # RayJob: the submitter Job's


# --- every pod template an object holds, for the rules ------------------------------------------
def pod_templates(obj: dict, init_template: Path | None = INIT_TEMPLATE,
                  created: bool = False) -> list[tuple[str, dict, bool]]:
    """(where, pod template, runs training?) for each pod template of a workload object: as
    written, or (`created`) as the operator creates its pods, with what it adds to them."""
    kind, spec = obj["kind"], obj.get("spec", {})
    if kind == "Job":
        return [("spec.template", spec["template"], True)]
    if kind == "PyTorchJob":
        templates = pytorchjob_templates(obj, init_template) if created else {
            r: rs["template"] for r, rs in spec["pytorchReplicaSpecs"].items()}
        return [(f"spec.pytorchReplicaSpecs.{r}.template", t, True) for r, t in templates.items()]
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
