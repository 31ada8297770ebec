"""The emulation itself is no kinder than the operators: what each controller injects and how it
counts failures, the Ready-only DNS of the training operator's Services, the init container it
adds, a store port that only its pod can serve, KubeRay's submitter script, the image's paths.
Quick: no training runs here (tests/k8s/test_pods.py runs the pods).
"""
from __future__ import annotations

import socket

import pytest

from testing.k8s.controller import PodsFailed, run_until_done
from testing.k8s.kubelet import Node, replace_paths
from testing.k8s.kuberay import auth_secrets, rayjob_pods
from testing.k8s.netpol import OPERATOR_NAMESPACE, Peer, admits, policies_of
from testing.k8s.network import DENIED, LOOPBACK, Network
from testing.k8s.operators import Pod, backoff_limit, indexed_job_pods, pytorchjob_pods, trainjob_nproc, trainjob_pods
from testing.k8s.render import find, render, workload

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def env_list(pod: Pod) -> list[tuple[str, str]]:
    return [(e["name"], e.get("value")) for e in pod.template["spec"]["containers"][0]["env"]]


def test_the_training_operator_appends_pythonunbuffered_1():
    pods = pytorchjob_pods(workload(render("pytorchjob")), Network())
    for pod in pods:
        env = env_list(pod)
        # appended after the user's env (the last of a name wins), with the operator's value
        assert env.index(("PYTHONUNBUFFERED", "1")) > env.index(("OMP_NUM_THREADS", None))


@pytest.mark.parametrize("trainer, expected", [
    ({"numProcPerNode": 3, "resourcesPerNode": {"limits": {"cpu": "8"}}}, "3"),
    ({"resourcesPerNode": {"requests": {"cpu": "2"}, "limits": {"cpu": "4"}}}, "2"),   # the request first
    ({"resourcesPerNode": {"requests": {"cpu": "1500m"}, "limits": {"cpu": "4"}}}, "2"),  # rounded up
    ({"resourcesPerNode": {"limits": {"cpu": "4"}}}, "4"),                             # no request: the limit
    ({"resourcesPerNode": {"requests": {"cpu": "100m"}}}, "1"),                        # at least one
    ({"resourcesPerNode": {"limits": {"cpu": "8", "nvidia.com/gpu": "2"}}}, "auto"),   # GPUs: torchrun decides
    ({}, "1"),
])
def test_the_trainer_counts_processes_per_node_as_its_torch_plugin(trainer, expected):
    assert trainjob_nproc(trainer) == expected


def failing_pod(name: str, policy: str) -> Pod:
    container = {"name": "c", "image": "distributed-step", "command": ["sh", "-c", "exit 3"]}
    return Pod(name, name, {"metadata": {}, "spec": {"restartPolicy": policy, "containers": [container]}})


@pytest.mark.parametrize("policy, limit, runs", [
    ("OnFailure", 2, 2),  # restarts in place: the job fails once they reach the limit (>=)
    ("OnFailure", 0, 1),
    ("Never", 2, 3),      # replaced pods: once the failures exceed it (>)
    ("Never", 0, 1),
])
def test_backoff_limits_count_as_the_controllers_do(tmp_path, policy, limit, runs):
    node = Node(tmp_path, [], Network())
    with pytest.raises(PodsFailed) as failed:
        run_until_done(node, [failing_pod("p", policy)], limit, timeout_s=60)
    assert f"backoff limit {limit} reached" in str(failed.value)
    assert len(list((tmp_path / "logs").glob("p.*.log"))) == runs


def test_a_trainjob_node_restarts_in_place_within_the_runtime_jobs_default_limit():
    job = workload(render("trainjob"))
    assert backoff_limit(job) == 6
    assert all(pod.in_place for pod in trainjob_pods(job, Network()))


def test_a_store_port_refuses_connections_and_binds_until_its_pod_serves():
    net = Network()
    port = net.hold(net.port(29400))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store server does
    with pytest.raises(OSError):
        other.bind((LOOPBACK, port))
    net.release(port)
    other.bind((LOOPBACK, port))
    other.close()


def test_indexed_job_names_wait_for_readiness_only_without_publish_not_ready_addresses():
    objects = render("job")
    assert all(owner is None for owner in _names(objects).values())
    find(objects, "Service")["spec"]["publishNotReadyAddresses"] = False
    assert _names(objects) == {"ds-job-0.ds-job": "ds-job-0", "ds-job-1.ds-job": "ds-job-1"}


def _names(objects: list[dict]) -> dict:
    net = Network()
    indexed_job_pods(workload(objects), objects, net)
    net.close()
    return {name: owner for name, owner in net.names.items() if not name.endswith(".svc.cluster.local")}


def test_a_pytorchjob_worker_waits_in_its_init_container_until_the_master_is_ready(tmp_path):
    """The operator's init container, run as it is (nslookup answered as the cluster's DNS would:
    the master's per-replica Service lists it once it is Ready). The master starts 3 s after the
    worker; the worker's main container only after that."""
    objects = render("pytorchjob")
    net, seen = Network(), tmp_path / "master-started"
    pods = pytorchjob_pods(workload(objects), net)
    master, worker = pods
    master.template["spec"]["containers"][0]["command"] = ["sh", "-c", f"touch {seen}; sleep 2"]
    worker.template["spec"]["containers"][0]["command"] = ["sh", "-c", f"test -e {seen} && echo saw the master"]
    for pod in pods:
        pod.template["spec"]["containers"][0]["args"] = []
    outcome = run_until_done(Node(tmp_path, objects, net), pods, 0, timeout_s=60, host_last_s=3)
    log = outcome.runs["ds-pytorchjob-worker-0"][0].output()
    assert "waiting for ds-pytorchjob-master-0" in log and "Name: ds-pytorchjob-master-0" in log, log
    assert log.rstrip().endswith("saw the master"), log
    assert sorted(outcome.exits) == [("ds-pytorchjob-master-0", 0, 0), ("ds-pytorchjob-worker-0", 0, 0)]


def test_kuberays_submitter_waits_for_the_gcs_submits_without_waiting_then_follows():
    ray_job = workload(render("rayjob"))
    _, _, submitter = rayjob_pods(ray_job, Network(), "/tmp/ray")
    box = submitter.template["spec"]["containers"][0]
    script = box["args"][0]
    assert box["command"] == ["/bin/bash", "-ce", "--"]
    assert script.startswith("until python -c ") and "/api/gcs_healthz" in script
    submit = script.index("ray job submit ")
    assert "--no-wait" in script[submit:script.index(" -- ", submit)]
    assert script.rstrip().endswith("--follow ds-rayjob-local") and "ray job logs" in script


def test_the_image_paths_map_to_the_checkout(tmp_path):
    objects = render("rayjob")
    head, _, _ = rayjob_pods(workload(objects), Network(), "/tmp/ray")
    paths = Node(tmp_path, objects, Network()).paths(head, head.template["spec"]["containers"][0])
    entrypoint = replace_paths(workload(objects)["spec"]["entrypoint"], paths)
    assert entrypoint.startswith("python -m distributed_step ray ")
    assert f"--out {tmp_path}/claims/distributed-step-runs/ds-rayjob " in entrypoint


# --- NetworkPolicies (testing.k8s.netpol): what a pod's names reach ------------------------------
def _seen(node: Node, pod: Pod) -> str:
    """Everything a pod's main container is handed: its command line and env, names rewritten."""
    argv, env = node.process(pod, pod.template["spec"]["containers"][0])
    return " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in env.items())


@pytest.mark.parametrize("variant", ["job", "pytorchjob", "pytorchjob/elastic", "trainjob", "rayjob"])
def test_the_rendered_policy_lets_every_pod_reach_the_job_it_belongs_to(variant, tmp_path):
    objects, net = render(variant), Network()
    obj = workload(objects)
    pods = {"Job": lambda: indexed_job_pods(obj, objects, net), "PyTorchJob": lambda: pytorchjob_pods(obj, net),
            "TrainJob": lambda: trainjob_pods(obj, net), "RayJob": lambda: list(_ray_pods(obj, net))}[obj["kind"]]()
    node = Node(tmp_path, objects + (auth_secrets(obj) if obj["kind"] == "RayJob" else []), net)
    assert net.policies, "no NetworkPolicy rendered"
    for pod in pods:
        assert DENIED not in _seen(node, pod), pod.name
    net.close()


def _ray_pods(obj: dict, net: Network):
    head, workers, submitter = rayjob_pods(obj, net, "/tmp/ray")
    return head, *workers, submitter


def test_a_policy_that_blocks_the_jobs_own_traffic_leaves_its_names_unresolvable(tmp_path):
    objects, net = render("pytorchjob"), Network()
    find(objects, "NetworkPolicy")["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] = {
        "app.kubernetes.io/instance": "another-job"}
    _, worker = pytorchjob_pods(workload(objects), net)
    seen = _seen(Node(tmp_path, objects, net), worker)
    assert f"MASTER_ADDR=ds-pytorchjob-master-0{DENIED}" in seen and f"MASTER_ADDR={LOOPBACK}" not in seen
    net.close()


def test_a_pod_of_another_job_is_refused_and_without_policies_all_is_allowed(tmp_path):
    objects, net = render("job"), Network()
    pods = indexed_job_pods(workload(objects), objects, net)
    Node(tmp_path, objects, net)
    intruder = Pod("other-0", "other-0", {"metadata": {"labels": {"app.kubernetes.io/instance": "other"}},
                                          "spec": {"containers": [{"name": "x", "image": "distributed-step"}]}})
    net.pod(intruder.name, intruder.template)
    assert net.admitted(pods[1].name, "ds-job-0.ds-job", 29500)
    assert not net.admitted(intruder.name, "ds-job-0.ds-job", 29500)
    assert net.rewrite("ds-job-0.ds-job:29500", source=intruder.name).startswith(f"ds-job-0.ds-job{DENIED}:")
    net.policies = []  # no policy selects the pod: every connection is allowed
    assert net.admitted(intruder.name, "ds-job-0.ds-job", 29500)
    net.close()


def test_the_rayjob_policy_admits_the_operators_namespace_on_the_job_port_only():
    policies = policies_of(render("rayjob"))
    head = Peer({"app.kubernetes.io/instance": "ds-rayjob"})
    operator = Peer({"app.kubernetes.io/name": "kuberay-operator"}, namespace=OPERATOR_NAMESPACE)
    assert admits(policies, operator, head, 8265)
    assert not admits(policies, operator, head, 6379)
    assert not admits(policies, Peer({"app": "elsewhere"}, namespace="other"), head, 8265)
    assert not admits(policies, Peer({"app.kubernetes.io/instance": "ds-job"}), head, 8265)


def test_kuberay_token_auth_reaches_every_ray_pod_and_the_submitter_from_its_secret(tmp_path):
    objects, net = render("rayjob"), Network()
    obj = workload(objects)
    (secret,) = auth_secrets(obj)
    node = Node(tmp_path, objects + [secret], net)
    for pod in _ray_pods(obj, net):
        env = node.environment(pod, pod.template["spec"]["containers"][0], {})
        assert env["RAY_AUTH_MODE"] == "token", pod.name
        assert env["RAY_AUTH_TOKEN"] == secret["stringData"]["auth_token"] and len(env["RAY_AUTH_TOKEN"]) == 64
    net.close()
