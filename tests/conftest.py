"""Fixtures, and the one place that decides which marked tests skip here.

Markers (registered in pyproject.toml): `slow` (real processes, tens of seconds), `netns`
(several hosts as network namespaces: root and iproute2), `ray` (a local Ray cluster), `k8s`
(the manifests and the emulated operators: kubectl and the CRDs, see testing/k8s/render.py),
`gpu` (CUDA). Helpers live in tests/helpers.py and testing/, never here.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.helpers import network


def _no_cuda() -> str | None:
    import torch  # only when GPU tests were collected: importing torch costs seconds

    # DS_GPU_TESTS_ON_CPU=1 (benchmarks/gpu.sh --cpu-smoke) runs them on CPU tensors, which
    # checks the tests' own code where no GPU is lent.
    if torch.cuda.is_available() or os.environ.get("DS_GPU_TESTS_ON_CPU") == "1":
        return None
    return "needs CUDA (run on a GPU machine: bash benchmarks/gpu.sh)"


def _no_netns() -> str | None:
    from testing.netlab import available

    return available()


def _no_ray() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return 'Ray is not installed (pip install "distributed-step[ray]")'
    return None


# The Kubernetes tests' prerequisites (kubectl, the CRDs) are checked where each is needed, by
# testing.k8s.render.unavailable: it skips naming the fix, or fails under CI (DS_REQUIRE_K8S_SCHEMAS).
WHY_UNAVAILABLE = {"gpu": _no_cuda, "netns": _no_netns, "ray": _no_ray}


def pytest_collection_modifyitems(config, items):
    """Each marked test skips, with the reason, where what its marker needs is missing."""
    for marker, why_unavailable in WHY_UNAVAILABLE.items():
        marked = [item for item in items if marker in item.keywords]
        reason = why_unavailable() if marked else None
        for item in marked if reason else ():
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def gloo_world():
    """Two ranks in one gloo process group, started once a session: `gloo_world.run(fn, *args)`
    runs a module-level function on both and returns its results by rank (testing/world.py)."""
    from testing.world import World  # imports torch only when a test asks for the world

    world = World(2).start()
    yield world
    world.close()


@pytest.fixture
def two_hosts():
    """Two hosts at 10.213.77.1 and .2, unshaped; the test may reshape the links (net.shape)."""
    net = network(2)
    yield net
    net.close()
