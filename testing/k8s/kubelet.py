"""The kubelet's part, on this machine: pods become local process trees.

`Node` turns a pod (from testing.k8s.operators or testing.k8s.kuberay) into a process: each volume
becomes a directory (a ConfigMap's keys as files, one directory per PersistentVolumeClaim shared
by every pod, an emptyDir per pod; the memory-backed /dev/shm is the host's own), every mount
path and every path of the image (the repository at /app, k8s/Dockerfile) in the command, args
and env values is replaced by its directory, env is resolved as the kubelet does (envFrom, value
with $(VAR) expansion, fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef), then $(VAR) in command and
args. Init containers run first, in order (not again when the pod restarts in place); once the
main container starts the pod is Ready and the names its Services give it resolve (for
`nslookup`, see testing.k8s.network). Every process of a pod carries the pod's marker in its
environment, so "kill the pod" kills them all, as a container runtime does.

With `unprivileged`, the processes run without any capability (setpriv), so that file
permissions bind them as they bind the pods' uid 1000 even where the tests run as root: the
storage test. Elsewhere everything runs as the test's own user.
"""
from __future__ import annotations

import base64
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from testing.k8s.netpol import policies_of
from testing.k8s.network import LOOPBACK, Network
from testing.k8s.operators import Pod
from testing.k8s.render import VAR_REF, config_maps, resource_field
from testing.machine import BIN, ROOT

IMAGE = "distributed-step"           # the image of k8s/Dockerfile(.cuda): the repository at /app
IMAGE_PATHS = {"/app": ROOT}         # its WORKDIR, where the Dockerfiles put the repository
POD_MARKER = "DS_K8S_POD"            # set in every emulated pod; inherited by all its processes
DNS_ENV = "DS_K8S_DNS"               # the folder of names that resolve now, one empty file a name
NSLOOKUP = """#!/bin/sh
# nslookup as the cluster's DNS answers here: a name resolves while its file exists (testing/k8s/network.py).
if [ -n "$1" ] && [ -e "$DS_K8S_DNS/$1" ]; then echo "Name: $1"; echo "Address: 127.0.0.1"; exit 0; fi
echo "** server can't find $1: NXDOMAIN" >&2
exit 1
"""


def _secret_data(secret: dict) -> dict[str, str]:
    """A Secret's keys as the container sees them: data base64-decoded, stringData as written."""
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return {**data, **(secret.get("stringData") or {})}


def ours(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":")[0].split("@")[0] == IMAGE


def image_env(image: str, tools: Path, home: str) -> dict[str, str]:
    """What an image provides: ours (k8s/Dockerfile) the package and Ray on PATH; any other (the
    operator's alpine init container) a shell, coreutils and nslookup."""
    if not ours(image):
        return {"PATH": f"{tools}:/usr/bin:/bin", "HOME": "/"}
    return {"PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": home,
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
    started: float

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

    def __init__(self, root: Path, objects: list[dict], net: Network, extra_env: dict | None = None,
                 unprivileged: bool = False):
        self.root, self.net, self.extra_env, self.unprivileged = root, net, extra_env or {}, unprivileged
        self.config_maps = config_maps(objects)
        self.secrets = {o["metadata"]["name"]: _secret_data(o) for o in objects if o["kind"] == "Secret"}
        net.policies = policies_of(objects)  # what decides which names a pod may reach
        self.logs, self.dns, self.tools, self.home = (root / d for d in ("logs", "dns", "image-tools", "home"))
        for folder in (self.logs, self.dns, self.tools, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in (self.home, self.dns):  # the image's HOME; the names a pod's shell publishes
            folder.chmod(0o777)
        (self.tools / "nslookup").write_text(NSLOOKUP)
        (self.tools / "nslookup").chmod(0o755)

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

    def paths(self, pod: Pod, container: dict) -> dict[str, Path]:
        """Every path the container sees that stands for something here: the image's, then mounts."""
        return {**(IMAGE_PATHS if ours(container.get("image", "")) else {}), **self.mounts(pod, container)}

    # --- environment and command line -----------------------------------------------------------
    def environment(self, pod: Pod, container: dict, paths: dict[str, Path]) -> dict[str, str]:
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
        local = {k: replace_paths(self._names(pod, container, v), paths) for k, v in env.items()}
        image = image_env(container.get("image", ""), self.tools, str(self.home))
        return {**image, "HOSTNAME": pod.hostname, **local, **self.extra_env, DNS_ENV: str(self.dns)}

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
        refs = (("secretKeyRef", "Secret", self.secrets), ("configMapKeyRef", "ConfigMap", self.config_maps))
        for key, kind, store in refs:
            if key in source:
                ref = source[key]
                value = store.get(ref["name"], {}).get(ref["key"])
                if value is None and not ref.get("optional"):
                    raise LookupError(f"{pod.name}: {var['name']}: no key {ref['key']} in {kind} {ref['name']}")
                return value
        raise NotImplementedError(f"{pod.name}: {var['name']}: {source} is not emulated")

    def command_line(self, pod: Pod, container: dict, env: dict[str, str], paths: dict[str, Path]) -> list[str]:
        argv = [*container.get("command", []), *container.get("args", [])]
        if not argv:
            raise ValueError(f"container {container['name']} has no command: the image's would run")
        return [replace_paths(self._names(pod, container, expand(a, env)), paths) for a in argv]

    def _names(self, pod: Pod, container: dict, text: str) -> str:
        """Our image's processes connect to names: those become 127.0.0.1 where the NetworkPolicies
        let this pod reach them (testing.k8s.network). Another image's tools (the init container's
        nslookup) look names up, in the emulated DNS: they keep them."""
        return self.net.rewrite(text, source=pod.name) if ours(container.get("image", "")) else text

    def process(self, pod: Pod, container: dict) -> tuple[list[str], dict[str, str]]:
        paths = self.paths(pod, container)
        env = self.environment(pod, container, paths)
        return self.command_line(pod, container, env, paths), env

    # --- readiness: the names a pod's Services give it ------------------------------------------
    def publish(self, pod: Pod) -> list[Path]:
        for name in self.net.always_published():
            (self.dns / name).touch()
        return [self.dns / name for name in self.net.published_by(pod.name)]

    def stopped(self, pod: Pod) -> None:
        """Not Ready any more: its Ready-only names stop resolving."""
        for name in self.net.published_by(pod.name):
            (self.dns / name).unlink(missing_ok=True)

    # --- processes ----------------------------------------------------------------------------
    def start(self, pod: Pod, attempt: int = 0, fresh: bool = True) -> Running:
        """Start the pod (`fresh`: a new pod, whose init containers run first; else a restart in
        place of its main container only)."""
        spec = pod.template["spec"]
        marker = f"{uuid.uuid4().hex}-{pod.name}-{attempt}"
        inits = [self.process(pod, c) for c in spec.get("initContainers", [])] if fresh else []
        argv, env = self.process(pod, spec["containers"][0])
        ready = self.publish(pod)
        if inits:  # one shell runs them in order, publishes the names, then becomes the main container
            def clean(step_argv: list[str], step_env: dict[str, str]) -> str:
                return shlex.join(["env", "-i", *(f"{k}={v}" for k, v in {**step_env, POD_MARKER: marker}.items()),
                                   *step_argv])
            publish = [shlex.join(["touch", "--", *map(str, ready)])] if ready else []
            script = " && ".join([*(clean(*step) for step in inits), *publish])
            argv, env = ["/bin/sh", "-c", f"{script} && exec {clean(argv, env)}"], {"PATH": "/usr/bin:/bin"}
        else:
            for path in ready:
                path.touch()
        self.net.release(pod.serves)  # the port it serves is its own from now on
        log = self.logs / f"{pod.name}.{attempt}.log"
        container = spec["containers"][0]
        cwd = IMAGE_PATHS["/app"] if ours(container.get("image", "")) else Path("/")  # the image's WORKDIR
        if self.unprivileged:  # no capability survives the exec, not even root's to override file modes
            argv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", *argv]
        with open(log, "w") as out:
            proc = subprocess.Popen(argv, env={**env, POD_MARKER: marker}, cwd=cwd, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        return Running(pod, proc, log, attempt, marker, time.time())
