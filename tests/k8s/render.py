"""Render the kustomizations under k8s/ and look things up in what they produce.

Shared by the manifest tests (schemas, rules) and the pod tests (local runs). Rendering uses
`kubectl kustomize`, offline; each variant is rendered once per test session and handed out
as deep copies, so a test may edit what it gets (inject a typo, scale a replica count).
"""
from __future__ import annotations

import copy
import functools
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.helpers import ROOT  # noqa: E402  (one definition of the repository root)
K8S = ROOT / "k8s"

# Every folder a user may `kubectl apply -k`: the four ways to deploy (the PyTorchJob twice:
# fixed size and elastic), each on CPU and on GPU.
CPU_VARIANTS = ("job", "pytorchjob", "pytorchjob/elastic", "trainjob", "rayjob")
VARIANTS = CPU_VARIANTS + tuple(f"{v}/gpu" for v in CPU_VARIANTS)

# The Kubernetes release whose built-in schemas the objects must pass (docs/kubernetes.md).
K8S_VERSION = "1.30.0"


def schema_dir() -> Path:
    """The operators' CRDs: ../shared/k8s-schemas, or $DS_K8S_SCHEMAS."""
    return Path(os.environ.get("DS_K8S_SCHEMAS", ROOT.parent / "shared" / "k8s-schemas"))


def kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.lru_cache(maxsize=None)
def _render(variant: str) -> tuple[dict, ...]:
    proc = subprocess.run([kubectl() or "kubectl", "kustomize", str(K8S / variant)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize k8s/{variant} failed:\n{proc.stderr.strip()}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(variant: str) -> list[dict]:
    """The objects `kubectl apply -k k8s/<variant>` would create (a fresh copy each call)."""
    return copy.deepcopy(list(_render(variant)))


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    if len(hits) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(hits)}")
    return hits[0]


def workload(objects: list[dict]) -> dict:
    """The one object of a variant that runs training (everything else is config and volume)."""
    return next(o for o in objects if o["kind"] in ("Job", "PyTorchJob", "TrainJob", "RayJob"))


# $(VAR) in a container's command, args or env: Kubernetes replaces a defined name, $$ escapes.
VAR_REF = r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)"


def config_maps(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}


# --- resource quantities ---------------------------------------------------------------------
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes quantity ("500m", "8Gi", 4) as a number (cores, bytes, devices)."""
    match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)([a-zA-Z]*)", str(value))
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def resource_field(resources: dict, resource: str, divisor: str = "1") -> str:
    """The value the downward API gives a resourceFieldRef: rounded up, as the kubelet does."""
    section, name = resource.split(".", 1)
    value = resources.get(section, {}).get(name)
    if value is None:  # no limit: the node's allocatable; here, this machine
        value = os.cpu_count() if name == "cpu" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return str(math.ceil(quantity(value) / quantity(divisor)))
