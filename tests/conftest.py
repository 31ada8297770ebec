"""Fixtures for every room: tests/unit (in-process), tests/integration (real processes),
tests/k8s (manifests and the operator emulation). Helpers live in tests/helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")
