"""The pods' commands really run: each CPU variant, rendered as `kubectl apply -k` would create
it, becomes local processes with what the operator injects (testing.k8s.operators and
testing.k8s.kuberay: the training operator's, the Trainer's, the Job controller's and KubeRay's
behaviour, read from their sources) and what the kubelet resolves (testing.k8s.kubelet: volumes and
the image's paths as directories, env, $(VAR), init containers). Each pod is a process tree;
DNS names map to 127.0.0.1 where the NetworkPolicies admit the pod (testing.k8s.network; the RayJob
runs with KubeRay's token auth). The only edits are ones a user could make: the
ConfigMap's train.yaml becomes a tiny run, CPU limits drop to 1 (OMP_NUM_THREADS follows), and
the elastic PyTorchJob's minReplicas and maxReplicas become the 2 pods it runs. Every variant
takes k8s/components/kueue and goes through the emulated Kueue first (testing.k8s.kueue): created
suspended, admitted into its queue, and only then given pods.

Start order: the elastic PyTorchJob's rendezvous host (worker 0) starts last, longer after the
other pod than torch's default read_timeout (60 s), as when its node pulls a cold image: the
other agent must wait that long for the store, which only the manifests' read_timeout allows.

Failure path: a pod of the Indexed Job, the PyTorchJob's master and a TrainJob node are killed
mid-run (SIGKILL of every process in the pod); the controller emulation restarts them as
Kubernetes would (a replacement pod, a restart in place), within the workload's backoff limit,
and the run resumes from the checkpoint on the shared volume, to the same weights as the runs
that were never interrupted.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testing.k8s.controller import Outcome, run_rayjob, run_until_done
from testing.k8s.kubelet import Node
from testing.k8s.kuberay import auth_secrets, rayjob_pods
from testing.k8s.kueue import admission, admitted, created
from testing.k8s.network import Network
from testing.k8s.operators import backoff_limit, indexed_job_pods, pytorchjob_pods, suspended, trainjob_pods
from testing.k8s.render import find, need_kubectl, render, with_components, workload
from tests.helpers import TINY, metrics, summary

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

STEPS = 6
FLAVOR_TOLERATION = {"key": "cloud.example.com/spot", "operator": "Exists", "effect": "NoSchedule"}
HOST_LAST_S = 65  # longer than torch's default read_timeout, 60 s
# tests.helpers.TINY's flags as the ConfigMap's YAML (same keys, underscores), plus a checkpoint every
# 2 steps: a pod killed after the first one has 4 steps left to lose.
TINY_CONFIG = {**{k.lstrip("-").replace("-", "_"): v for k, v in zip(TINY[::2], TINY[1::2])},
               "steps": STEPS, "checkpoint_every": 2, "timeout_s": 120}


@dataclass
class Run:
    out: Path               # the run directory, on the emulated PersistentVolumeClaim
    outcome: Outcome
    killed: str | None = None
    status: str = ""        # RayJob: the job's status as the operator reads it
    anonymous: subprocess.CompletedProcess | None = None  # RayJob: a submission without the token


def prepared(variant: str, k8s: Path) -> list[dict]:
    """The variant's objects with the tiny training flags and 1-CPU pods."""
    objects = render(variant, k8s)
    find(objects, "ConfigMap", "distributed-step-config")["data"]["train.yaml"] = yaml.safe_dump(TINY_CONFIG)
    obj = workload(objects)
    if obj["kind"] == "TrainJob":
        resources = [obj["spec"]["trainer"]["resourcesPerNode"]]
    elif obj["kind"] == "Job":
        resources = [c["resources"] for c in obj["spec"]["template"]["spec"]["containers"]]
    elif obj["kind"] == "PyTorchJob":
        resources = [c["resources"] for rs in obj["spec"]["pytorchReplicaSpecs"].values()
                     for c in rs["template"]["spec"]["containers"]]
    else:
        resources = []  # Ray's pods keep their CPUs: they are Ray's resources for --cpus-per-worker
    for r in resources:
        r["requests"]["cpu"] = r["limits"]["cpu"] = "1"
    return objects


def run_dir(objects: list[dict], root: Path) -> Path:
    name = workload(objects)["metadata"]["name"]
    return root / "claims" / "distributed-step-runs" / name


def kill_after_first_checkpoint(out: Path, pod: str, killed: list):
    """During the run: once step 2's checkpoint is written, SIGKILL every process of `pod`."""
    def during(outcome: Outcome) -> None:
        if not killed and (out / "checkpoints" / "step_00000002.pt").exists():
            outcome.runs[pod][-1].kill()
            killed.append(pod)
    return during


def through_kueue(obj: dict) -> dict:
    """The workload as a cluster that queues every job runs it: created suspended, then
    admitted into its LocalQueue with a flavor's toleration (testing.k8s.kueue)."""
    waiting = created(obj, manage_without_queue=True)
    assert suspended(waiting) and admission(waiting, {"distributed-step"}, manage_without_queue=True) == "admitted"
    return admitted(waiting, [FLAVOR_TOLERATION])


def run_torchrun_variant(variant: str, root: Path, k8s: Path, kill: str | None = None, edit=None,
                         host_last_s: float | None = None) -> Run:
    objects = prepared(variant, k8s)
    obj = workload(objects)
    if edit:
        edit(obj)
    obj = through_kueue(obj)
    net = Network()
    if obj["kind"] == "Job":
        pods = indexed_job_pods(obj, objects, net)
    elif obj["kind"] == "PyTorchJob":
        pods = pytorchjob_pods(obj, net)
    else:
        pods = trainjob_pods(obj, net)
    out, killed = run_dir(objects, root), []
    during = kill_after_first_checkpoint(out, kill, killed) if kill else None
    outcome = run_until_done(Node(root, objects, net), pods, backoff_limit(obj), timeout_s=300 + (host_last_s or 0),
                             during=during, host_last_s=host_last_s)
    assert killed == ([kill] if kill else []), "the run ended before the pod could be killed"
    return Run(out, outcome, kill)


def run_rayjob_variant(root: Path, k8s: Path) -> Run:
    objects = prepared("rayjob", k8s)
    obj, net = through_kueue(workload(objects)), Network()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    try:
        head, workers, submitter = rayjob_pods(obj, net, temp)
        # Token authentication as KubeRay sets it up (authOptions): its Secret, the token in every pod.
        node = Node(root, objects + auth_secrets(obj), net, extra_env={"RAY_USAGE_STATS_ENABLED": "0"})
        outcome, status, anonymous = run_rayjob(node, head, workers, submitter,
                                                obj["spec"]["submitterConfig"]["backoffLimit"])
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return Run(run_dir(objects, root), outcome, status=status, anonymous=anonymous)


def two_pods_are_all(obj: dict) -> None:
    # maxReplicas = the 2 pods we run: with room for more, every rendezvous would wait its
    # last_call_timeout (30 s) for pods that are never coming. minReplicas too: the host starts
    # last, and the other agent's store client retries with a growing backoff (here it connected
    # ~35 s after the store came up), longer than that last call; with 1 the host would train
    # alone and a 6-step run end before the other joined.
    obj["spec"]["elasticPolicy"]["maxReplicas"] = obj["spec"]["elasticPolicy"]["minReplicas"] = 2


PLANS = {  # variant -> how it runs; the longest first
    "pytorchjob/elastic": lambda root, k8s: run_torchrun_variant("pytorchjob/elastic", root, k8s, edit=two_pods_are_all,
                                                                 host_last_s=HOST_LAST_S),
    "rayjob": lambda root, k8s: run_rayjob_variant(root, k8s),
    "job": lambda root, k8s: run_torchrun_variant("job", root, k8s, kill="ds-job-1"),
    "pytorchjob": lambda root, k8s: run_torchrun_variant("pytorchjob", root, k8s, kill="ds-pytorchjob-master-0"),
    "trainjob": lambda root, k8s: run_torchrun_variant("trainjob", root, k8s, kill="ds-trainjob-node-0-1"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every variant's run, three at a time: much of a run is waiting (rendezvous, restarts,
    Ray's start), so several share even a 2-core machine without slowing each other much."""
    need_kubectl()  # before any thread starts: every test here skips (or, under CI, fails) at once
    roots = {v: tmp_path_factory.mktemp("k8s-" + v.replace("/", "-")) for v in PLANS}
    k8s = with_components(tmp_path_factory.mktemp("manifests"), {v: ["kueue"] for v in PLANS})
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {v: pool.submit(plan, roots[v], k8s) for v, plan in PLANS.items()}
    return {v: f.exception() or f.result() for v, f in futures.items()}


def ran(runs: dict, variant: str) -> Run:
    if isinstance(runs[variant], BaseException):
        raise runs[variant]
    return runs[variant]


def assert_complete(run: Run) -> dict:
    result = summary(run.out)
    assert result["status"] == "complete" and result["steps"] == STEPS and result["world_size"] == 2, result
    assert (run.out / "model.pt").is_file()
    for pod, runs in run.outcome.runs.items():  # every pod's last attempt exited 0
        assert runs[-1].poll() == 0, f"{pod}:\n{runs[-1].output()[-3000:]}"
    return result


def assert_resumed(run: Run, survivor: str) -> None:
    """The killed pod was started again, and training went on from the last step finished before
    the kill, which the surviving pod saved (distributed_step/recovery.py), not from 0."""
    result = assert_complete(run)
    assert [code for pod, _, code in run.outcome.exits if pod == run.killed] == [-9, 0], run.outcome.exits
    said = re.search(r"a peer failed; (?:saved )?the last finished step, (\d+)", run.outcome.runs[survivor][0].output())
    assert said, run.outcome.runs[survivor][0].output()[-3000:]
    resumed = int(result["resumed_from"].rsplit("step_", 1)[1][:8])
    assert resumed == int(said[1]) >= 2 and result["resumed_from"].startswith(str(run.out)), result["resumed_from"]
    assert [m["step"] for m in metrics(run.out) if "loss" in m][-1] == STEPS


def test_indexed_job_pod_killed_mid_run_is_replaced_and_the_job_resumes(runs):
    job = ran(runs, "job")
    assert_resumed(job, survivor="ds-job-0")
    # Pod 0 (the rendezvous host) lived on: its agent re-admitted the replacement pod 1.
    assert [code for pod, _, code in job.outcome.exits if pod == "ds-job-0"] == [0]
    assert "resumed from" in job.outcome.runs["ds-job-0"][0].output()


def test_pytorchjob_master_killed_mid_run_every_pod_restarts_and_resumes(runs):
    pytorchjob = ran(runs, "pytorchjob")
    assert_resumed(pytorchjob, survivor="ds-pytorchjob-worker-0")
    # The worker's agent lost the rendezvous store with the master, failed, and was restarted
    # in place (restartPolicy OnFailure), within the job's backoffLimit.
    assert [code for pod, _, code in pytorchjob.outcome.exits if pod == "ds-pytorchjob-worker-0"] == [1, 0]


def test_elastic_pytorchjob_completes_with_its_rendezvous_host_started_last(runs):
    elastic = ran(runs, "pytorchjob/elastic")
    assert_complete(elastic)
    host, other = (elastic.outcome.runs[f"ds-pytorchjob-elastic-worker-{i}"] for i in (0, 1))
    assert host[0].started - other[0].started >= HOST_LAST_S
    # The other agent waited in its store client, longer than torch's default read_timeout, and
    # went on: no restart, one run.
    assert [code for pod, _, code in elastic.outcome.exits if pod.endswith("worker-1")] == [0]


def test_trainjob_node_killed_mid_run_both_restart_in_place_and_resume(runs):
    trainjob = ran(runs, "trainjob")
    assert_resumed(trainjob, survivor="ds-trainjob-node-0-0")
    # Static rendezvous: the surviving node's torchrun fails with its peer and restarts in place
    # too, and both meet again: 2 of the 6 restarts the runtime's Job allows (backoffLimit, >=).
    assert [code for pod, _, code in trainjob.outcome.exits if pod == "ds-trainjob-node-0-0"] == [1, 0]


def test_rayjob_completes_with_its_checkpoints_on_the_shared_volume(runs):
    run = ran(runs, "rayjob")
    assert "succeeded" in run.status.lower(), run.status
    assert summary(run.out)["status"] == "complete" and (run.out / "model.pt").is_file()
    assert list((run.out / "ray").glob("checkpoint_*")), "Ray's checkpoints are not under --storage-path"


def test_rayjob_head_refuses_a_submission_without_the_token(runs):
    """authOptions.mode token: the submitter got the token (the job ran, above); anyone else who
    reaches the job server (:8265) is refused."""
    anonymous = ran(runs, "rayjob").anonymous
    output = anonymous.stdout + anonymous.stderr
    assert anonymous.returncode != 0, output
    assert any(word in output.lower() for word in ("401", "unauthorized", "authentication")), output


def test_every_torchrun_variant_trains_the_same_model(runs):
    """Same ranks, same data, same steps: the same weights, bit for bit, whichever operator
    launched torchrun, and whether or not a pod was killed and the run resumed."""
    torchrun = ("job", "pytorchjob", "pytorchjob/elastic", "trainjob")
    digests = {v: tuple(summary(ran(runs, v).out)["replica_digests"]) for v in torchrun}
    assert len(set(digests.values())) == 1, digests
