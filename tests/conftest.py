"""Fixtures for every room: tests/unit (in-process), tests/integration (real processes),
tests/k8s (manifests and the operator emulation). Helpers live in tests/helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip, with the reason, where CUDA is not available."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch  # only when GPU tests were collected: importing torch costs seconds

    # DS_GPU_TESTS_ON_CPU=1 (benchmarks/gpu.sh --cpu-smoke) runs them on CPU tensors, which
    # checks the tests' own code where no GPU is lent.
    if not torch.cuda.is_available() and os.environ.get("DS_GPU_TESTS_ON_CPU") != "1":
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs CUDA (run on a GPU machine: bash benchmarks/gpu.sh)"))


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def network(hosts: int = 2, **kw):
    """Hosts as network namespaces on one switch (distributed_step/netlab.py), removed afterwards
    whatever happens; skipped where namespaces cannot be made (no root, no iproute2)."""
    from distributed_step.netlab import NetlabError, Network, available

    why = available()
    if why:
        pytest.skip(why)
    try:
        return Network(hosts, **kw).__enter__()
    except NetlabError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")


@pytest.fixture
def two_hosts():
    """Two hosts at 10.213.77.1 and .2, unshaped; the test may reshape the links (net.shape)."""
    net = network(2)
    yield net
    net.close()


def shape_or_skip(net, rate: str) -> None:
    """Shape every link of `net` to `rate`; skip where this kernel has no tbf qdisc."""
    from distributed_step.netlab import NetlabError

    try:
        net.shape(rate)
    except NetlabError as exc:
        pytest.skip(f"cannot shape links here: {exc}")
