"""Shared storage that ignores fsGroup. The pods run as uid 1000 (every securityContext here), and
the kubelet applies fsGroup only to volumes that support ownership management; most
ReadWriteMany volumes do not (NFS, EFS, Azure Files, csi-driver-nfs by default), so /runs stays
root's and uid 1000 cannot create its run directory. The pods must say so at once, in one line
naming the directory; docs/kubernetes.md ("Shared storage as uid 1000") lists the fixes.

Here the Indexed Job's two pods run without any capability (testing.k8s.kubelet, unprivileged), so
file permissions bind them as they bind uid 1000: first on a claim of another owner, mode 755,
the volume such storage gives them; then on a claim of their own uid, as after one of the fixes.
(Not as uid 1000 itself: the interpreter may lie where that uid cannot enter, as pyenv's under
/root does.) Needs root and setpriv.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from testing.k8s.kubelet import Node
from testing.k8s.network import Network
from testing.k8s.operators import indexed_job_pods
from testing.k8s.render import render, workload

pytestmark = [pytest.mark.k8s,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                 reason="needs root and setpriv (util-linux) to run the pods without privileges")]
NOBODY = 65534  # the volume's owner when it is not the pods' (on the cluster: root, the pods uid 1000)


@pytest.fixture
def node_root():
    root = Path(tempfile.mkdtemp(prefix="k8s-storage-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def start_job(root: Path, claim_owner: int) -> tuple[list, Path]:
    objects = render("job")
    context = workload(objects)["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["fsGroup"], context["runAsNonRoot"]) == (1000, 1000, True)
    claim = root / "claims" / "distributed-step-runs"
    claim.mkdir(parents=True)
    claim.chmod(0o755)
    os.chown(claim, claim_owner, claim_owner)
    net = Network()
    node = Node(root, objects, net, unprivileged=True)
    runs = [node.start(pod) for pod in indexed_job_pods(workload(objects), objects, net)]
    net.close()
    return runs, claim


def wait_for(condition, runs: list, timeout_s: float = 120) -> list[str]:
    """Until `condition()`, then kill the pods; fails if every pod ends first or time runs out.

    Returns each pod's output as it was when the condition held, before the kill: killing one pod
    makes the other's agent lose its rendezvous store, and its traceback is the kill's, not the run's.
    """
    deadline = time.time() + timeout_s
    try:
        while not condition():
            alive = any(r.poll() is None for r in runs)
            assert alive and time.time() < deadline, "\n".join(r.output()[-3000:] for r in runs)
            time.sleep(0.2)
        return [r.output() for r in runs]
    finally:
        for run in runs:
            run.kill()


def test_a_volume_of_another_owner_stops_the_pods_at_once_naming_the_run_directory(node_root):
    runs, claim = start_job(node_root, claim_owner=NOBODY)
    message = re.compile(re.escape(f"--out {claim}/ds-job: cannot create the run directory (Permission denied) as uid ")
                         + rf".*; {re.escape(str(claim))} is owned by uid {NOBODY} .*docs/kubernetes\.md")
    outputs = wait_for(lambda: any(message.search(r.output()) for r in runs), runs)
    assert not (claim / "ds-job").exists()
    tracebacks = [output[-4000:] for output in outputs if "Traceback" in output]
    assert not tracebacks, "a traceback instead of one line:\n" + "\n".join(tracebacks)


def test_a_volume_of_the_pods_own_uid_takes_the_run_directory(node_root):
    runs, claim = start_job(node_root, claim_owner=os.geteuid())
    wait_for(lambda: (claim / "ds-job").is_dir(), runs)
