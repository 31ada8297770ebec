"""The Kubernetes manifests, offline and without a cluster: every `kubectl apply -k k8s/<variant>`
renders, every object passes strict validation (Kubernetes' own schemas for built-in kinds, the
operators' CRDs from `make k8s-schemas` for the custom ones), and the rules no schema holds are
kept. A typo or a broken rule must be reported, so each check is also shown failing.

No training process is started here: tests/k8s/test_pods.py runs the pods.
"""
from __future__ import annotations

import re

import pytest
import yaml

from testing.k8s.admission import domain_prefixed_path_error, operator_errors
from testing.k8s.operators import INIT_TEMPLATE, init_containers, pod_templates
from testing.k8s.render import CPU_VARIANTS, K8S, VARIANTS, config_maps, find, need_schemas, render, workload
from testing.k8s.rules import house_errors
from testing.k8s.validate import schema_errors

pytestmark = pytest.mark.k8s

# Every test that renders needs kubectl: render() skips it without one (fails it under CI).
CUSTOM = {"PyTorchJob", "TrainJob", "RayJob"}


def needs_crds(objects: list[dict]) -> None:
    if workload(objects)["kind"] in CUSTOM:
        need_schemas()


def test_every_kustomization_is_a_tested_variant_or_a_component():
    found = {}
    for path in K8S.rglob("kustomization.yaml"):
        found[str(path.parent.relative_to(K8S))] = yaml.safe_load(path.read_text())["kind"]
    variants = {folder for folder, kind in found.items() if kind == "Kustomization"}
    assert variants == set(VARIANTS)
    assert all(kind == "Component" for folder, kind in found.items() if folder not in variants)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_renders_and_every_object_passes_strict_validation(variant):
    objects = render(variant)
    needs_crds(objects)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds.count("ConfigMap") == 2 and "PersistentVolumeClaim" in kinds, kinds
    errors = [e for o in objects for e in schema_errors(o)]
    assert errors == []
    for obj in objects:  # the base's labels reach every object, the workload included
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "distributed-step"


@pytest.mark.parametrize("variant", VARIANTS)
def test_operator_and_house_rules_hold(variant):
    objects = render(variant)
    assert operator_errors(objects) == []
    assert house_errors(objects) == []


def _pytorchjob(objects):
    return find(objects, "PyTorchJob")


def _rename(parent: dict, old: str, new: str) -> None:
    parent[new] = parent.pop(old)


@pytest.mark.parametrize("variant, typo, expected", [
    ("pytorchjob", lambda o: _rename(_pytorchjob(o)["spec"]["runPolicy"], "backoffLimit", "backofLimit"), "backofLimit"),
    ("pytorchjob/elastic", lambda o: _rename(_pytorchjob(o)["spec"]["elasticPolicy"], "maxRestarts", "maxRestart"),
     "maxRestart"),
    ("rayjob", lambda o: _rename(find(o, "RayJob")["spec"], "shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
     "shutdownAfterJobFinish"),
    # deep inside a pod template embedded in a custom resource
    ("rayjob", lambda o: _rename(find(o, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"],
                                 "terminationGracePeriodSeconds", "terminationGracePeriodSecond"),
     "terminationGracePeriodSecond"),
    ("trainjob", lambda o: _rename(find(o, "TrainJob")["spec"]["trainer"], "resourcesPerNode", "resourcePerNode"),
     "resourcePerNode"),
])
def test_a_typo_in_a_custom_resource_is_refused(variant, typo, expected):
    objects = render(variant)
    needs_crds(objects)
    typo(objects)
    errors = [e for o in objects for e in schema_errors(o)]
    assert errors and all(expected in e for e in errors), errors


@pytest.mark.parametrize("variant, typo, expected", [
    ("job", lambda o: _rename(find(o, "Job")["spec"], "activeDeadlineSeconds", "activeDeadlineSecond"),
     "activeDeadlineSecond"),
    ("job", lambda o: _rename(find(o, "Job")["spec"]["template"]["spec"]["containers"][0], "volumeMounts", "volumeMount"),
     "volumeMount"),
    ("job", lambda o: _rename(find(o, "Service")["spec"], "publishNotReadyAddresses", "publishNotReadyAddress"),
     "publishNotReadyAddress"),
    ("trainjob", lambda o: _rename(find(o, "PersistentVolumeClaim")["spec"], "accessModes", "accessMode"), "accessMode"),
])
def test_a_typo_in_a_builtin_object_is_refused(variant, typo, expected):
    objects = render(variant)
    typo(objects)
    errors = [e for o in objects for e in schema_errors(o) if o["kind"] not in CUSTOM]
    assert len(errors) == 1 and expected in errors[0], errors


def _container(objects, index=0):
    return pod_templates(workload(objects))[index][1]["spec"]["containers"][0]


def _set(owner: dict, key: str, value) -> None:
    owner[key] = value


def _runtime_patch(objects) -> dict:
    return find(objects, "TrainJob")["spec"]["runtimePatches"][0]


def _patched_pod(objects) -> dict:
    """The pod spec that the TrainJob's runtime patch gives the runtime's `node` job."""
    return _runtime_patch(objects)["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"]["spec"]


BROKEN = [
    # the operators' rules
    ("pytorchjob", lambda o: _set(_pytorchjob(o)["spec"]["pytorchReplicaSpecs"]["Master"], "replicas", 2),
     "Master.replicas must be 1"),
    ("pytorchjob", lambda o: _set(_container(o), "name", "trainer"), "no container named pytorch"),
    ("pytorchjob/elastic", lambda o: _set(_pytorchjob(o)["spec"]["elasticPolicy"], "maxReplicas", 1), "outside elasticPolicy"),
    ("trainjob", lambda o: find(o, "TrainJob")["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "2"}),
     "injects PET_* itself"),
    ("rayjob", lambda o: find(o, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("minReplicas"),
     "minReplicas <= replicas"),
    ("rayjob", lambda o: find(o, "RayJob")["spec"].pop("activeDeadlineSeconds"), "spec.activeDeadlineSeconds unset"),
    ("job", lambda o: _set(find(o, "Job")["spec"], "completions", 3), "--nnodes must equal completions"),
    ("job", lambda o: _set(find(o, "Service")["spec"], "selector", {"app": "other"}), "no headless Service"),
    ("pytorchjob", lambda o: _container(o)["args"].append("--lr=$(LEARNING_RATE)"), "$(LEARNING_RATE) is not defined"),
    # the house rules
    ("job", lambda o: _container(o)["volumeMounts"].pop(), "/dev/shm is not a memory-backed emptyDir"),
    ("pytorchjob", lambda o: _set(_container(o)["resources"]["limits"], "cpu", "8"), "differ from limits"),
    ("pytorchjob/elastic", lambda o: pod_templates(workload(o))[0][1]["metadata"].pop("annotations"),
     "sidecar.istio.io/inject"),
    ("trainjob", lambda o: _patched_pod(o)["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
    ("rayjob", lambda o: _set(find(o, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"],
                              "terminationGracePeriodSeconds", 60), "terminationGracePeriodSeconds not above"),
    ("rayjob", lambda o: _set(find(o, "RayJob")["spec"], "entrypoint",
                              find(o, "RayJob")["spec"]["entrypoint"].replace("--out /runs/", "--out /tmp/")),
     "--out '/tmp/ds-rayjob' is not on the shared volume"),
    ("job", lambda o: _set(_container(o)["securityContext"], "allowPrivilegeEscalation", True), "allowPrivilegeEscalation"),
    ("pytorchjob", lambda o: _set(find(o, "ConfigMap", "distributed-step-env")["data"],
                                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0"), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE is not 1"),
    ("pytorchjob", lambda o: _pytorchjob(o)["spec"]["runPolicy"].pop("backoffLimit"), "spec.runPolicy.backoffLimit unset"),
    # the Trainer's webhook (runtimePatches)
    ("trainjob", lambda o: _set(_runtime_patch(o), "manager", "distributed-step"), "must be a domain-prefixed path"),
    ("trainjob", lambda o: _set(_runtime_patch(o), "manager", "kueue.k8s.io/"), "must be a domain-prefixed path"),
    ("trainjob", lambda o: _set(_runtime_patch(o), "manager", "Distributed-Step.io/k8s"), "not a lowercase RFC 1123 subdomain"),
    ("trainjob", lambda o: _set(_patched_pod(o)["containers"][0], "env", [{"name": "A", "value": "1"}]), "no env through runtimePatches"),
    ("trainjob", lambda o: _set(_patched_pod(o), "initContainers", [{"name": "chown", "image": "busybox"}]), "has no initContainer 'chown'"),
    # KubeRay: the entrypoint by the image's absolute path
    ("rayjob", lambda o: _set(find(o, "RayJob")["spec"], "entrypoint",
                              find(o, "RayJob")["spec"]["entrypoint"].replace("-m distributed_step ray", "launch/ray_job.py")), "must run python -m distributed_step ray"),
    # the c10d rendezvous outlasts a cold image pull
    ("job", lambda o: _set(_container(o), "args", [_container(o)["args"][0].replace(",read_timeout=600", "")]), "read_timeout is unset"),
    ("pytorchjob", lambda o: _set(_container(o), "args", [a.replace("read_timeout=600", "read_timeout=60") for a in _container(o)["args"]]),
     "read_timeout is 60"),
    ("pytorchjob/elastic", lambda o: _pytorchjob(o)["spec"]["elasticPolicy"]["rdzvConf"].pop(0), "join_timeout is unset"),
    # DNS: pod 0's name must resolve before it is Ready
    ("job", lambda o: _set(find(o, "Service")["spec"], "publishNotReadyAddresses", False), "publishNotReadyAddresses is not true"),
    # NetworkPolicy: one in every variant, selecting every pod, admitting the job's own pods
    ("job", lambda o: o.remove(find(o, "NetworkPolicy")), "no NetworkPolicy"),
    ("pytorchjob", lambda o: _set(find(o, "NetworkPolicy")["spec"]["podSelector"], "matchLabels", {"app": "x"}),
     "no NetworkPolicy's podSelector selects every pod"),
    ("trainjob", lambda o: _set(find(o, "NetworkPolicy")["spec"]["ingress"][0]["from"][0], "podSelector",
                                {"matchLabels": {"app.kubernetes.io/instance": "another-job"}}), "does not admit"),
    ("rayjob/gpu", lambda o: find(o, "NetworkPolicy")["spec"]["ingress"].pop(1), "namespace ray-system on 8265"),
    # Ray's token authentication
    ("rayjob", lambda o: find(o, "RayJob")["spec"]["rayClusterSpec"].pop("authOptions"), "authOptions.mode is not token"),
    ("rayjob/gpu", lambda o: _set(find(o, "RayJob")["spec"]["rayClusterSpec"]["authOptions"], "mode", "disabled"),
     "authOptions.mode is not token"),
    # PodSecurity restricted, every container
    ("trainjob", lambda o: _patched_pod(o)["securityContext"].pop("seccompProfile"), "no RuntimeDefault seccomp profile"),
]


@pytest.mark.parametrize("variant, breakage, expected", BROKEN, ids=[e for _, _, e in BROKEN])
def test_a_broken_rule_is_reported(variant, breakage, expected):
    objects = render(variant)
    breakage(objects)
    errors = operator_errors(objects) + house_errors(objects)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("variant", CPU_VARIANTS)
def test_cpu_and_gpu_variants_differ_only_as_documented(variant):
    for name, backend, tag in ((variant, "gloo", "cpu"), (f"{variant}/gpu", "nccl", "cuda")):
        objects = render(name)
        env = config_maps(objects)["distributed-step-env"]
        assert env["DS_BACKEND"] == backend
        assert ("NCCL_SOCKET_IFNAME" in env and "NCCL_DEBUG" in env) == (backend == "nccl")
        obj = workload(objects)
        images = re.findall(r"'image': '([^']+)'", str(obj))
        assert images and all(image == f"distributed-step:{tag}" for image in images), images
        for where, template, trains in pod_templates(obj):
            gpus = template["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            on_gpu = backend == "nccl" and trains and "headGroupSpec" not in where  # Ray's head drives only
            assert (gpus == "1") == on_gpu, where
            tolerated = any(t.get("key") == "nvidia.com/gpu" for t in template["spec"].get("tolerations", []))
            assert tolerated == on_gpu, where


def test_the_images_match_what_the_pods_expect():
    cpu, cuda = (K8S / "Dockerfile").read_text(), (K8S / "Dockerfile.cuda").read_text()
    for dockerfile in (cpu, cuda):
        assert re.search(r"^USER 1000:1000$", dockerfile, re.MULTILINE)  # runAsUser/runAsGroup in every pod
        assert re.search(r"^WORKDIR /app$", dockerfile, re.MULTILINE)
        assert '".[ray]"' in dockerfile  # the RayJob runs the installed launcher: python -m distributed_step ray
    assert "download.pytorch.org/whl/cpu" in cpu and "whl/cpu" not in cuda
    # The CUDA image keeps a base image's own torch; only a bare base gets the pinned pair.
    assert 'if python -c "import torch"' in cuda and "ARG BASE_IMAGE=" in cuda
    for variant in VARIANTS:
        for _, template, _ in pod_templates(workload(render(variant))):
            context = template["spec"]["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"]) == (1000, 1000)


def test_closed_schemas_still_accept_the_open_parts():
    """Labels, annotations and ConfigMap data stay free-form once the schemas are closed."""
    objects = render("pytorchjob")
    needs_crds(objects)
    job = _pytorchjob(objects)
    job["metadata"]["annotations"] = {"example.com/anything": "goes"}
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"] = {"team": "vision"}
    assert schema_errors(job) == []


@pytest.mark.parametrize("manager, refused", [
    ("acme.io/foo", False), ("kueue.x-k8s.io/manager", False), ("distributed-step.example.com/manifests", False),
    ("distributed-step", True), ("kueue.k8s.io/", True), ("/foo", True), ("Acme.io/foo", True), ("acme.io/fo o", True),
    ("-acme.io/foo", True), ("a" * 254 + "/foo", True),
])
def test_runtime_patch_managers_are_judged_as_the_trainer_webhook_does(manager, refused):
    """apimachinery's IsDomainPrefixedPath, which the Trainer's JobSet plugin applies to every manager."""
    assert (domain_prefixed_path_error(manager) is not None) == refused


def test_the_training_operators_own_init_container_breaks_guaranteed_qos_and_restricted():
    """Without k8s/pytorchjob/operator/initContainer.yaml the operator's built-in init container
    lands in every Worker pod: requests below limits, no securityContext."""
    objects = render("pytorchjob")
    assert house_errors(objects) == []
    errors = house_errors(objects, init_template=None)
    assert len(errors) == 2 and all(e.startswith("spec.pytorchReplicaSpecs.Worker.template: init-pytorch: ")
                                    for e in errors), errors
    assert any("would not be Guaranteed" in e for e in errors) and any("PodSecurity restricted" in e for e in errors)
    # The elastic job has no Master, so no init container.
    assert house_errors(render("pytorchjob/elastic"), init_template=None) == []


def test_the_init_container_template_for_the_operator_is_a_valid_container():
    master = "ds-pytorchjob-master-0"
    (ours,), (builtin,) = init_containers(master, INIT_TEMPLATE), init_containers(master, None)
    assert ours["name"] == builtin["name"] == "init-pytorch" and ours["image"] == builtin["image"]
    assert f"nslookup {master}" in ours["command"][-1] and "{{" not in str(ours)
    template = {"metadata": {}, "spec": {"initContainers": [ours], "containers": [{"name": "c", "image": "i"}]}}
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    assert schema_errors(wrapped) == []
