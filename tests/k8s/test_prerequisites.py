"""What the Kubernetes tests need and where it comes from: kubectl (the dev extra's, before any on
PATH) and the operators' CRDs (`make k8s-schemas`, i.e. k8s/fetch_schemas.py, run here against
a local HTTP server: no internet). Without one, a test skips naming the fix, or fails where CI
sets DS_REQUIRE_K8S_SCHEMAS=1.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testing.k8s import render
from testing.k8s.render import K8S, REQUIRE_ENV, need_kubectl, need_schemas
from tests.helpers import ROOT, free_port

pytestmark = pytest.mark.k8s

FETCH = K8S / "fetch_schemas.py"
# The required CRDs: the optional one (the PodMonitor's) is not where this repository's CI keeps
# the others, so the local server does not have it: the fetch skips it (tested below).
CRDS = [c for c in json.loads((K8S / "crds.json").read_text())["crds"] if "optional" not in c]
OPTIONAL = [c for c in json.loads((K8S / "crds.json").read_text())["crds"] if "optional" in c]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def served(tmp_path):
    """A copy of the CRDs behind `python -m http.server` on 127.0.0.1: (its folder, its URL)."""
    source, folder = need_schemas(), tmp_path / "served"
    folder.mkdir()
    for crd in CRDS:
        shutil.copyfile(source / crd["file"], folder / crd["file"])
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert server.poll() is None, f"http.server exited {server.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "http.server did not start listening"
                time.sleep(0.1)
        yield folder, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def fetch(dest: Path, base: str) -> subprocess.CompletedProcess:
    # -I: no site customisation or PYTHONPATH; a proxy setting must not catch the local server.
    env = {**os.environ, "DS_K8S_SCHEMAS_URL": base, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    return subprocess.run([sys.executable, "-I", str(FETCH), "--dest", str(dest)],
                          check=False, capture_output=True, text=True, timeout=120, env=env)


def assert_refused(proc: subprocess.CompletedProcess, file: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and file in lines[0], proc.stderr


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one bit: the YAML may still parse, only the hash can tell
    path.write_bytes(bytes(data))


def test_fetch_lands_every_crd_with_its_hash(served, tmp_path):
    _, base = served
    checkout = tmp_path / "checkout"
    dest = checkout / ".k8s-schemas"
    proc = fetch(dest, base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted(c["file"] for c in CRDS)
    assert all(sha256(dest / c["file"]) == c["sha256"] for c in CRDS)
    assert list(checkout.iterdir()) == [dest]  # no temporary folder left beside it
    # Run again: the files are checked where they lie and nothing is downloaded (no server).
    again = fetch(dest, "http://127.0.0.1:1")
    assert again.returncode == 0 and "already" in again.stdout, again.stdout + again.stderr
    assert all(f"skipped the optional {c['file']}" in proc.stdout for c in OPTIONAL), proc.stdout


def test_an_optional_crd_with_a_wrong_hash_is_refused_like_any(served, tmp_path):
    folder, base = served
    (crd,) = OPTIONAL
    (folder / crd["file"]).write_text("kind: CustomResourceDefinition\n")
    proc = fetch(tmp_path / ".k8s-schemas", base)
    assert_refused(proc, crd["file"])
    assert "sha256 mismatch" in proc.stderr and not (tmp_path / ".k8s-schemas").exists()


# The middle file: some are already downloaded when it fails, and must not be left anywhere.
@pytest.mark.parametrize("damage", ["corrupted", "missing"])
def test_a_bad_crd_is_refused_in_one_line_and_nothing_is_written(served, tmp_path, damage):
    folder, base = served
    file = CRDS[len(CRDS) // 2]["file"]
    if damage == "corrupted":
        corrupt(folder / file)
    else:
        (folder / file).unlink()  # the server answers 404
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    proc = fetch(checkout / ".k8s-schemas", base)
    assert_refused(proc, file)
    assert ("sha256 mismatch" if damage == "corrupted" else "download failed") in proc.stderr
    assert list(checkout.iterdir()) == []


def test_a_failed_refetch_keeps_the_old_folder_and_a_good_one_replaces_it(served, tmp_path):
    folder, base = served
    dest = tmp_path / ".k8s-schemas"
    dest.mkdir()
    (dest / "stale.yaml").write_text("kind: Stale\n")
    corrupt(folder / CRDS[-1]["file"])
    assert_refused(fetch(dest, base), CRDS[-1]["file"])
    assert [p.name for p in dest.iterdir()] == ["stale.yaml"]
    shutil.copyfile(need_schemas() / CRDS[-1]["file"], folder / CRDS[-1]["file"])
    assert fetch(dest, base).returncode == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(c["file"] for c in CRDS)  # the set, whole


def test_the_fetch_script_needs_only_the_standard_library():
    """`make k8s-schemas` runs with the system's python3, before .venv exists."""
    tree = ast.parse(FETCH.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    outside = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names | {"__future__"}}
    assert not outside, outside


def test_schemas_are_looked_for_in_env_then_fetched_then_shared(monkeypatch, tmp_path):
    fetched, shared = tmp_path / "fetched", tmp_path / "shared"
    monkeypatch.setattr(render, "FETCHED_SCHEMAS", fetched)
    monkeypatch.setattr(render, "SHARED_SCHEMAS", shared)
    monkeypatch.delenv("DS_K8S_SCHEMAS", raising=False)
    assert render.schema_dir() == fetched  # neither: the path `make k8s-schemas` fills
    shared.mkdir()
    assert render.schema_dir() == shared
    fetched.mkdir()
    assert render.schema_dir() == fetched
    monkeypatch.setenv("DS_K8S_SCHEMAS", str(tmp_path / "mine"))
    assert render.schema_dir() == tmp_path / "mine"


def test_a_folder_of_other_crd_versions_is_not_used_silently(monkeypatch, tmp_path):
    table, folder = tmp_path / "crds.json", tmp_path / "fetched"
    table.write_text(json.dumps({"crds": [{"file": "a.yaml", "sha256": hashlib.sha256(b"pinned").hexdigest()}]}))
    folder.mkdir()
    (folder / "a.yaml").write_bytes(b"pinned")
    monkeypatch.setattr(render, "CRD_TABLE", table)
    monkeypatch.setattr(render, "FETCHED_SCHEMAS", folder)
    monkeypatch.delenv("DS_K8S_SCHEMAS", raising=False)
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    assert need_schemas() == folder
    (folder / "a.yaml").write_bytes(b"an older release")
    with pytest.raises(pytest.skip.Exception, match=r"a\.yaml.*make k8s-schemas"):
        need_schemas()
    monkeypatch.setenv("DS_K8S_SCHEMAS", str(folder))  # chosen by hand: used as it is
    assert need_schemas() == folder


def test_kubectl_is_the_venvs_before_the_one_on_path(monkeypatch, tmp_path):
    venv_bin, path_bin = tmp_path / "venv", tmp_path / "path"
    for folder in (venv_bin, path_bin):
        folder.mkdir()
        (folder / "kubectl").write_text("#!/bin/sh\n")
        (folder / "kubectl").chmod(0o755)
    monkeypatch.setattr(render, "BIN", venv_bin)
    monkeypatch.setenv("PATH", str(path_bin))
    assert render.kubectl() == str(venv_bin / "kubectl")
    (venv_bin / "kubectl").unlink()
    assert render.kubectl() == str(path_bin / "kubectl")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert render.kubectl() is None


def _missing_everything(monkeypatch, tmp_path, required: str):
    monkeypatch.setenv("DS_K8S_SCHEMAS", str(tmp_path / "nowhere"))
    monkeypatch.setattr(render, "kubectl", lambda: None)
    monkeypatch.setenv(REQUIRE_ENV, required)


@pytest.mark.parametrize("required, outcome", [("", pytest.skip.Exception), ("0", pytest.skip.Exception),
                                               ("1", pytest.fail.Exception)])
def test_a_missing_prerequisite_skips_naming_the_fix_or_fails_under_ci(monkeypatch, tmp_path, required, outcome):
    _missing_everything(monkeypatch, tmp_path, required)
    with pytest.raises(outcome, match="make k8s-schemas"):
        need_schemas()
    with pytest.raises(outcome, match="install the dev extra"):
        need_kubectl()
    with pytest.raises(outcome, match="install the dev extra"):  # every render goes through it
        render._render.__wrapped__("job")


@pytest.mark.parametrize("required", ["", "1"])
def test_ci_reports_a_manifest_test_without_crds_as_failed(tmp_path, required):
    """The whole way through pytest: under DS_REQUIRE_K8S_SCHEMAS=1 the run fails, else it skips."""
    need_kubectl()
    env = {**os.environ, "DS_K8S_SCHEMAS": str(tmp_path / "nowhere"), REQUIRE_ENV: required}
    test = "tests/k8s/test_manifests.py::test_closed_schemas_still_accept_the_open_parts"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", test],
                          check=False, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert "make k8s-schemas" in proc.stdout, proc.stdout + proc.stderr
    if required:
        assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout
    else:
        assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout
