"""Fixtures for every room: tests/unit (in-process), tests/integration (real processes),
tests/k8s (manifests and the operator emulation). Helpers live in tests/helpers.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers import ADDRS, ip


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


@pytest.fixture
def two_hosts():
    """Two "hosts": network namespaces joined by a veth pair, at ADDRS, each with its loopback."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip netns)")
    tag = uuid.uuid4().hex[:6]
    hosts = (f"ds-a-{tag}", f"ds-b-{tag}")
    try:
        for ns in hosts:
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", f"dsa{tag}", "type", "veth", "peer", "name", f"dsb{tag}")
        for ns, dev, addr in zip(hosts, (f"dsa{tag}", f"dsb{tag}"), ADDRS):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "link", "set", dev, "name", "ds0")  # the same name on both hosts
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "ds0")
            ip("-n", ns, "link", "set", "ds0", "up")
    except subprocess.CalledProcessError as exc:
        for ns in hosts:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
    yield hosts
    for ns in hosts:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
