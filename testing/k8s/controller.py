"""The controllers' loop, on this machine: start the pods of a workload on a `kubelet.Node`,
restart a failed one as its controller would, until every pod exits 0 or the backoff limit ends
the workload.

A pod with restartPolicy OnFailure restarts in place (the same pod; its init containers do not
run again) and its restarts count with `>=`: the Job controller (pastBackoffLimitOnFailure in
kubernetes/kubernetes pkg/controller/job/job_controller.go) and the training operator
(kubeflow/trainer v1.9.4, pkg/core/job.go PastBackoffLimit) fail the job once the restarts of
its pods reach backoffLimit (with 0: at the first). A Never pod is replaced by a new one with the
same index and its failures count with `>`: the Job fails once they exceed backoffLimit.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from testing.k8s.kubelet import Node, Running, replace_paths
from testing.k8s.kuberay import submission_id
from testing.k8s.network import LOOPBACK
from testing.k8s.operators import Pod
from testing.machine import BIN

# The kubelet's crash-loop backoff, and the Job controller's for a replaced pod, both start at
# 10 s. Faster is not faithful: under torchrun's static rendezvous (a TrainJob) a node restarted
# while the surviving master's torchrun is still exiting passes the rendezvous against that
# dying agent's store, and its ranks then wait out --timeout-s for a master that started anew
# (seen in CI at 0.5 s: the killed node restarted twice instead of once).
RESTART_DELAY_S = 10.0
RAY_READY = "Ray runtime started"  # printed by `ray start` once its raylet has joined the cluster


class PodsFailed(AssertionError):
    pass


@dataclass
class Outcome:
    """Every attempt of every pod, in order: (pod name, attempt, exit code)."""
    exits: list[tuple[str, int, int]] = field(default_factory=list)
    runs: dict[str, list[Running]] = field(default_factory=dict)

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {r.pod.name} attempt {r.attempt}:\n{r.output()[-tail:]}"
                         for runs in self.runs.values() for r in runs)


def listening(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
        return True
    except OSError:
        return False


def exceeded(limit: int | None, restarts: int, failed: int) -> bool:
    """Whether the controller ends the workload: restarts in place with >=, replaced pods with >."""
    if limit is None:
        return False
    return restarts >= max(limit, 1) or failed > limit


def run_until_done(node: Node, pods: list[Pod], backoff_limit: int | None, timeout_s: float = 300,
                   during=None, host_last_s: float | None = None) -> Outcome:
    """Run the pods as their controller would until each exits 0; `during(outcome)` is called
    every 50 ms once all run (a test kills a pod from there).

    A pod that hosts a rendezvous store (`Pod.serves`) starts first, and the others once it
    serves. With `host_last_s` it starts that long after every other pod instead, as when its
    node pulls a cold image: its port is held until then (testing.k8s.network), so the others find
    it taken and wait for it in their store clients, as on a cluster."""
    outcome = Outcome()
    hosts, others = [p for p in pods if p.serves], [p for p in pods if not p.serves]
    waiting = {p.name: 0.0 for p in pods}  # pod -> when it may (re)start
    deadline, restarts, failed, done = time.time() + timeout_s, 0, 0, set()

    def started(pod: Pod) -> bool:
        return bool(outcome.runs.get(pod.name))

    def may_start(pod: Pod) -> bool:
        if time.time() < waiting[pod.name]:
            return False
        if pod.serves:
            if started(pod) or not host_last_s:
                return True
            return all(map(started, others)) and time.time() >= max(
                [outcome.runs[p.name][0].started for p in others], default=0) + host_last_s
        if host_last_s and not started(pod):
            return True
        # Otherwise, and for every restart, once the hosts serve: the hold ends when the host's
        # process starts, not when it binds (nor comes back: a killed host leaves its port in
        # TIME_WAIT, which a holder without SO_REUSEADDR cannot bind), and an agent here, where
        # every address is this machine, could bind the store first and host it, which on a
        # cluster (another hostname) it never would.
        return all(started(h) and outcome.runs[h.name][-1].poll() is None and listening(h.serves) for h in hosts)

    try:
        while len(done) < len(pods):
            if time.time() > deadline:
                raise PodsFailed(f"pods still running after {timeout_s} s:\n{outcome.logs()}")
            for pod in pods:
                if pod.name in waiting:
                    if may_start(pod):
                        runs = outcome.runs.setdefault(pod.name, [])
                        runs.append(node.start(pod, attempt=len(runs), fresh=not (runs and pod.in_place)))
                        del waiting[pod.name]
                    continue
                current = outcome.runs[pod.name][-1]
                code = None if pod.name in done else current.poll()
                if code is None:
                    continue
                node.stopped(pod)
                outcome.exits.append((pod.name, current.attempt, code))
                if code == 0:
                    done.add(pod.name)
                    continue
                restarts, failed = restarts + pod.in_place, failed + (not pod.in_place)
                if exceeded(backoff_limit, restarts, failed):
                    raise PodsFailed(f"{pod.name} failed ({code}); backoff limit {backoff_limit} reached "
                                     f"({restarts} restarts, {failed} failed pods):\n{outcome.logs()}")
                waiting[pod.name] = time.time() + RESTART_DELAY_S
            if during and not waiting:
                during(outcome)
            time.sleep(0.05)
        return outcome
    finally:
        for runs in outcome.runs.values():
            for run in runs:
                run.kill()
        node.net.close()


def start_ready(node: Node, pods: list[Pod], ready_line: str, started: list[Running], restarts: int = 2,
                timeout_s: float = 180) -> None:
    """Start pods (each run is added to `started`) and wait until each prints `ready_line`, its
    readiness; a pod that exits first is restarted, as the kubelet restarts a RayCluster pod."""
    runs = {pod.name: node.start(pod) for pod in pods}
    started += runs.values()
    deadline = time.time() + timeout_s
    while not all(ready_line in run.output() for run in runs.values()):
        for pod in pods:
            run = runs[pod.name]
            if ready_line not in run.output() and run.poll() is not None:
                if run.attempt >= restarts:
                    raise PodsFailed(f"{pod.name} never became ready:\n{run.output()[-3000:]}")
                runs[pod.name] = node.start(pod, attempt=run.attempt + 1)
                started.append(runs[pod.name])
        if time.time() > deadline:
            raise PodsFailed("not ready in time:\n" + "\n".join(r.output()[-2000:] for r in runs.values()))
        time.sleep(0.2)


def run_rayjob(node: Node, head: Pod, workers: list[Pod], submitter: Pod, backoff_limit: int,
               timeout_s: float = 300) -> tuple[Outcome, str, subprocess.CompletedProcess]:
    """KubeRay's sequence: the Ray cluster's pods; once the cluster is Ready (every pod's raylet
    up) the submitter, retried up to the submitter Job's backoffLimit; then the job's status as
    the operator reads it from the head; then the cluster is deleted (SIGTERM, then SIGKILL).
    Before that, one more submission, by whoever reaches the head's port without the token
    (`anonymous_submission`): with token authentication the head must refuse it."""
    # The entrypoint runs on the head, so its paths are the head's (the image's and its mounts).
    head_paths = node.paths(head, head.template["spec"]["containers"][0])
    box = submitter.template["spec"]["containers"][0]
    box["args"] = [replace_paths(arg, head_paths) for arg in box.get("args", [])]
    cluster: list[Running] = []
    try:
        # One at a time: raylets that start together on one IP can miss each other's
        # registration and time out ("Failed to get node info"); pods have IPs of their own.
        for pod in [head, *workers]:
            start_ready(node, [pod], RAY_READY, cluster)
        outcome = run_until_done(node, [submitter], backoff_limit, timeout_s)
        command = [str(BIN / "ray"), "job", "status", "--address", f"http://{LOOPBACK}:{head.serves}",
                   submission_id(submitter)]
        env = node.environment(submitter, box, {})
        status = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60, env=env).stdout
        anonymous = anonymous_submission(node, head, env)
        for run in cluster:
            outcome.runs.setdefault(run.pod.name, []).append(run)
        return outcome, status, anonymous
    finally:
        for run in cluster:
            run.kill(signal.SIGTERM)
        time.sleep(1)
        for run in cluster:
            run.kill()



def anonymous_submission(node: Node, head: Pod, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`ray job submit` to the head's job server as the submitter would, less the token: no
    RAY_AUTH_* variables and a HOME without ~/.ray/auth_token (where Ray also looks for one)."""
    home = node.root / "anonymous-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")} | {"HOME": str(home)}
    command = [str(BIN / "ray"), "job", "submit", "--address", f"http://{LOOPBACK}:{head.serves}", "--no-wait",
               "--", "echo", "anyone can run code here"]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60, env=env)
