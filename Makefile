# The README's commands. Each target sets up .venv itself, so a fresh clone needs only `make`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-integration test-k8s lint venv clean k8s-schemas k8s-check

# pyproject.toml declares the torch range we support; constraints.txt pins the exact versions
# that make and CI install, so every run here is reproducible.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The embedded default: 4 ranks on CPU, the real digits data set, ~98% held-out accuracy.
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/torchrun --standalone --nproc_per_node=4 -m distributed_step train --out runs/demo

# The whole suite (what CI runs): lint, then unit, integration (real processes) and k8s tests.
# The slices below run parts of it; docs/testing.md says what each holds and how long it takes.
test: lint
	$(PY) -m pytest -q --durations=15 tests

# The inner loop while editing: lint and the in-process unit tests (multi-rank ones included).
test-fast: lint
	$(PY) -m pytest -q tests/unit

# Real training processes: torchrun, Ray, several emulated hosts.
test-integration: lint
	$(PY) -m pytest -q tests/integration

# The manifests: rendered, schema-checked, admitted, and run as emulated pods.
test-k8s: lint
	$(PY) -m pytest -q tests/k8s

lint: $(STAMP)
	$(PY) -m ruff check .

# The operators' CRDs for the strict-schema tests of k8s/ (tests/k8s, testing/k8s): downloaded at the tags in
# k8s/crds.json, sha256-checked, into .k8s-schemas/ (git-ignored). Standard library: no .venv needed.
k8s-schemas:
	$(PYTHON) k8s/fetch_schemas.py

# The manifests' verdict without a cluster, as tests/k8s/test_manifests.py gives it: every variant
# rendered, schema-validated and checked against the operators' and the house rules, one line each
# (testing/k8s/check.py; `$(PY) -m testing.k8s.check DIR` checks your own overlay). Needs the CRDs above.
k8s-check: $(STAMP)
	$(PY) -m testing.k8s.check

clean:
	rm -rf $(VENV) runs
