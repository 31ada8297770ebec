"""Strict schema validation of rendered objects, offline.

Built-in kinds (Job, Service, ConfigMap, PVC, and every pod template a custom resource holds,
as a core/v1 PodTemplate) go through kubernetes-validate with its strict schemas, which refuse
unknown fields. Custom resources go through the JSON schema of their CustomResourceDefinition
(`make k8s-schemas`, found by render.schema_dir), closed first: the published schemas accept
unknown fields, so every object schema that lists its properties, and does not say otherwise, is
made to refuse others. Without that, a typo such as `backofLimit` would pass silently.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from testing.k8s.operators import pod_templates
from testing.k8s.render import K8S_VERSION, schema_dir

BUILT_IN_GROUPS = ("v1", "batch/v1", "apps/v1", "policy/v1", "networking.k8s.io/v1")
# Kinds whose CRD k8s/crds.json marks optional: validated when `make k8s-schemas` fetched it.
OPTIONAL_CRDS = {("monitoring.coreos.com/v1", "PodMonitor")}


def close(schema: dict) -> dict:
    """A copy of `schema` where objects with listed properties refuse any other property
    (except the object's own `metadata`, which the API server validates itself)."""
    schema = copy.deepcopy(schema)
    metadata = schema.get("properties", {}).get("metadata")

    def visit(node) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        if (node is not metadata and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            visit(child)
        for key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            visit(node.get(key))

    visit(schema)
    return schema


@functools.cache
def crd_schemas(folder: str) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the closed schema of each served version of each CRD in `folder`."""
    found = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    found[(f"{group}/{version['name']}", kind)] = close(version["schema"]["openAPIV3Schema"])
    return found


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top)"


def builtin_errors(obj: dict, label: str) -> list[str]:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{label}: no Kubernetes {K8S_VERSION} schema for {obj.get('apiVersion')} {obj.get('kind')}"]
    except kubernetes_validate.ValidationError as exc:
        return [f"{label}: {_where(exc)}: {exc.message}"]
    return []


def custom_errors(obj: dict, label: str) -> list[str]:
    schemas = crd_schemas(str(schema_dir()))
    schema = schemas.get((obj.get("apiVersion"), obj.get("kind")))
    if schema is None and (obj.get("apiVersion"), obj.get("kind")) in OPTIONAL_CRDS:
        return []  # its CRD is not fetched here: testing.k8s.rules checks what it refers to
    if schema is None:
        return [f"{label}: no CRD in {schema_dir()} for {obj.get('apiVersion')} {obj.get('kind')}"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{label}: {_where(e)}: {e.message}" for e in sorted(validator.iter_errors(obj), key=str)]


def schema_errors(obj: dict) -> list[str]:
    """Every schema error of one rendered object (an empty list: it is valid)."""
    label = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("apiVersion") in BUILT_IN_GROUPS:
        return builtin_errors(obj, label)
    errors = custom_errors(obj, label)
    # The pod templates inside a custom resource, against Kubernetes' own (strict) pod schema:
    # the CRDs embed an older copy of it, and kubernetes-validate also checks formats.
    for where, template, _ in pod_templates(obj):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        errors += builtin_errors(wrapped, f"{label} {where}")
    return errors
