"""The kubelet's and the controllers' part, on this machine: pods become local process trees.

`Node` turns a pod (from tests.k8s.operators) into a process: each volume becomes a directory (a
ConfigMap's keys as files, one directory per PersistentVolumeClaim shared by every pod, an
emptyDir per pod; the memory-backed /dev/shm is the host's own), every mount path in the
command, args and env values is replaced by its directory, env is resolved as the kubelet does
(envFrom, value with $(VAR) expansion, fieldRef, resourceFieldRef, configMapKeyRef), then
$(VAR) in command and args. Every process of a pod carries the pod's marker in its environment,
so "kill the pod" kills them all, as a container runtime does.

`run_until_done` plays the controller: start the pods, restart a failed one (in place, or a
replacement with the same index) until the workload's backoff limit, until every pod exits 0.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import BIN, ROOT
from tests.k8s.operators import LOOPBACK, Network, Pod
from tests.k8s.render import VAR_REF, config_maps, resource_field

RESTART_DELAY_S = 0.5  # the kubelet's crash-loop backoff starts at 10 s; nothing to gain by waiting here


def image_env() -> dict[str, str]:
    """What the image provides (k8s/Dockerfile): the environment with the package and Ray on PATH."""
    return {"PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ escapes, the rest stays."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|" + VAR_REF, one, text)


def replace_paths(text: str, mounts: dict[str, Path]) -> str:
    """A mount path at the start of a path in `text` -> the directory standing in for it."""
    for mount in sorted(mounts, key=len, reverse=True):
        text = re.sub(r"(?<![\w./-])" + re.escape(mount) + r"(?=/|$|[^\w.-])", str(mounts[mount]), text)
    return text


POD_MARKER = "DS_K8S_POD"  # set in every emulated pod; inherited by all its processes


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return b"\0" + fh.read()
    except OSError:  # gone, or not ours to read
        return b""


@dataclass
class Running:
    pod: Pod
    proc: subprocess.Popen
    log: Path
    attempt: int
    marker: str

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """The whole pod, as a container runtime kills a container: every process in it.

        Not a process group: torchrun starts each worker in a session of its own. Every process
        of the pod inherits the pod's marker variable, so that is how they are found.
        """
        marker = f"{POD_MARKER}={self.marker}".encode() + b"\0"
        for _ in range(50):
            pids = [pid for pid in _pids() if marker in _environ(pid)]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig != signal.SIGKILL:
                return
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Node:
    """This machine as the one node every pod is scheduled on."""

    def __init__(self, root: Path, objects: list[dict], net: Network, extra_env: dict | None = None):
        self.root, self.net, self.extra_env = root, net, extra_env or {}
        self.config_maps = config_maps(objects)
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # --- volumes ------------------------------------------------------------------------------
    def mounts(self, pod: Pod, container: dict) -> dict[str, Path]:
        volumes = {v["name"]: v for v in pod.template["spec"].get("volumes", [])}
        found = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                path = self._config_map_dir(volume["configMap"])
            elif "persistentVolumeClaim" in volume:
                path = self.root / "claims" / volume["persistentVolumeClaim"]["claimName"]
            elif "emptyDir" in volume:
                if mount["mountPath"] == "/dev/shm":
                    continue  # the host's memory-backed /dev/shm stands in for the pod's
                path = self.root / "pods" / pod.name / volume["name"]
            else:
                raise NotImplementedError(f"volume {volume} is not emulated")
            path = path / mount.get("subPath", "")
            path.mkdir(parents=True, exist_ok=True)
            found[mount["mountPath"]] = path
        return found

    def _config_map_dir(self, ref: dict) -> Path:
        data = self.config_maps[ref["name"]]
        path = self.root / "config-maps" / ref["name"]
        path.mkdir(parents=True, exist_ok=True)
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            (path / item["path"]).write_text(data[item["key"]])
        return path

    # --- environment and command line -----------------------------------------------------------
    def environment(self, pod: Pod, container: dict, mounts: dict[str, Path]) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            data = self.config_maps.get(source["configMapRef"]["name"])
            if data is None and not source["configMapRef"].get("optional"):
                raise LookupError(f"{pod.name}: envFrom ConfigMap {source['configMapRef']['name']} does not exist")
            env.update({source.get("prefix", "") + k: v for k, v in (data or {}).items()})
        for var in container.get("env", []):
            value = expand(var["value"], env) if "value" in var else self._value_from(var, pod, container)
            if value is not None:
                env[var["name"]] = value
        local = {k: replace_paths(self.net.rewrite(v), mounts) for k, v in env.items()}
        return {**image_env(), "HOSTNAME": pod.hostname, **local, **self.extra_env}

    def _value_from(self, var: dict, pod: Pod, container: dict) -> str | None:
        source = var["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            meta = pod.template.get("metadata", {})
            match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if match:
                return meta.get(match.group(1), {}).get(match.group(2), "")
            return {"metadata.name": pod.name, "metadata.namespace": "default", "status.podIP": LOOPBACK,
                    "status.hostIP": LOOPBACK, "spec.nodeName": socket.gethostname()}[path]
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            return resource_field(container.get("resources", {}), ref["resource"], ref.get("divisor", "1"))
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            value = self.config_maps.get(ref["name"], {}).get(ref["key"])
            if value is None and not ref.get("optional"):
                raise LookupError(f"{pod.name}: {var['name']}: no key {ref['key']} in ConfigMap {ref['name']}")
            return value
        raise NotImplementedError(f"{pod.name}: {var['name']}: {source} is not emulated")

    def command_line(self, container: dict, env: dict[str, str], mounts: dict[str, Path]) -> list[str]:
        argv = [*container.get("command", []), *container.get("args", [])]
        if not argv:
            raise ValueError(f"container {container['name']} has no command: the image's would run")
        return [replace_paths(self.net.rewrite(expand(a, env)), mounts) for a in argv]

    # --- processes ----------------------------------------------------------------------------
    def start(self, pod: Pod, attempt: int = 0) -> Running:
        container = pod.template["spec"]["containers"][0]
        mounts = self.mounts(pod, container)
        env = self.environment(pod, container, mounts)
        argv = self.command_line(container, env, mounts)
        log = self.logs / f"{pod.name}.{attempt}.log"
        marker = f"{uuid.uuid4().hex}-{pod.name}-{attempt}"
        with open(log, "w") as out:  # cwd: the image's WORKDIR, the repository
            proc = subprocess.Popen(argv, env={**env, POD_MARKER: marker}, cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return Running(pod, proc, log, attempt, marker)


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


RAY_READY = "Ray runtime started"  # printed by `ray start` once its raylet has joined the cluster


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
               timeout_s: float = 300) -> tuple[Outcome, str]:
    """KubeRay's sequence: the Ray cluster's pods; once the cluster is Ready (every pod's raylet
    up) the submitter, retried up to the submitter Job's backoffLimit; then the job's status as
    the operator reads it from the head; then the cluster is deleted (SIGTERM, then SIGKILL)."""
    # The entrypoint runs on the head, so its paths are the head's mounts.
    head_mounts = node.mounts(head, head.template["spec"]["containers"][0])
    box = submitter.template["spec"]["containers"][0]
    box["args"] = [replace_paths(arg, head_mounts) for arg in box.get("args", [])]
    job_id = re.search(r"--submission-id (\S+)", box["args"][0]).group(1)
    cluster: list[Running] = []
    try:
        # One at a time: raylets that start together on one IP can miss each other's
        # registration and time out ("Failed to get node info"); pods have IPs of their own.
        for pod in [head, *workers]:
            start_ready(node, [pod], RAY_READY, cluster)
        outcome = run_until_done(node, [submitter], backoff_limit, timeout_s)
        command = [str(BIN / "ray"), "job", "status", "--address", f"http://{LOOPBACK}:{head.serves}", job_id]
        status = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60,
                                env=node.environment(submitter, box, {})).stdout
        for run in cluster:
            outcome.runs.setdefault(run.pod.name, []).append(run)
        return outcome, status
    finally:
        for run in cluster:
            run.kill(signal.SIGTERM)
        time.sleep(1)
        for run in cluster:
            run.kill()


def run_until_done(node: Node, pods: list[Pod], backoff_limit: int, timeout_s: float = 300,
                   during=None) -> Outcome:
    """Run the pods as their controller would until each exits 0; `during(outcome)` is called
    every 50 ms while they run (a test kills a pod from there)."""
    outcome = Outcome()
    # Only the pod whose hostname is the rendezvous host may host the store: on a cluster torch
    # decides by hostname, here every pod is this host, so the others start once it listens.
    serving = [p for p in pods if p.serves]
    waiting = {p.name: 0.0 for p in pods}  # pod -> when it may (re)start
    deadline, failures, done = time.time() + timeout_s, 0, set()

    def may_start(pod: Pod) -> bool:
        if time.time() < waiting[pod.name]:
            return False
        return pod.serves or all(outcome.runs.get(h.name) and outcome.runs[h.name][-1].poll() is None
                                 and listening(h.serves) for h in serving)

    try:
        while len(done) < len(pods):
            if time.time() > deadline:
                raise PodsFailed(f"pods still running after {timeout_s} s:\n{outcome.logs()}")
            for pod in pods:
                if pod.name in waiting:
                    if may_start(pod):
                        runs = outcome.runs.setdefault(pod.name, [])
                        runs.append(node.start(pod, attempt=len(runs)))
                        del waiting[pod.name]
                    continue
                current = outcome.runs[pod.name][-1]
                code = None if pod.name in done else current.poll()
                if code is None:
                    continue
                outcome.exits.append((pod.name, current.attempt, code))
                if code == 0:
                    done.add(pod.name)
                    continue
                failures += 1
                if failures > backoff_limit:
                    raise PodsFailed(f"{pod.name} failed ({code}); backoff limit {backoff_limit} reached:\n"
                                     f"{outcome.logs()}")
                # A restart in place and a replacement pod both run the command afresh.
                waiting[pod.name] = time.time() + RESTART_DELAY_S
            if during and not waiting:
                during(outcome)
            time.sleep(0.05)
        return outcome
    finally:
        for runs in outcome.runs.values():
            for run in runs:
                run.kill()
