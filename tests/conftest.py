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
