"""Validate Kubernetes manifests strictly: built-in kinds with kubernetes-validate's bundled
schemas, Prometheus operator kinds (monitoring.coreos.com) against the CRDs vendored in
k8s/schemas/. Unknown fields, unknown kinds and unknown versions are errors everywhere.

    python .ci/validate_manifests.py --kubernetes-version 1.31 FILE... | -

A CRD's openAPIV3Schema is made strict the way the API server's field validation
(`kubectl apply --validate=strict`) treats it: an object schema with `properties` and
neither `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` rejects other
keys; `metadata` is checked against Kubernetes's own ObjectMeta schema.
Prints one line per resource; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
import yaml
from referencing import Registry, Resource

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "k8s" / "schemas"
CRD_GROUPS = {"monitoring.coreos.com"}


def _strict(schema: Any) -> Any:
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], tuple[dict[str, Any], str]]:
    """(apiVersion, kind) -> (strict JSON schema, where it comes from) of every vendored CRD."""
    found = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        version_of_operator = crd["metadata"].get("annotations", {}).get("operator.prometheus.io/version", "?")
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                found[(f"{group}/{version['name']}", kind)] = (
                    schema,
                    f"{path.relative_to(ROOT)} (prometheus-operator v{version_of_operator})",
                )
    return found


def object_meta_validator(k8s_version: str) -> jsonschema.Validator:
    """Kubernetes's strict ObjectMeta, from the schemas kubernetes-validate ships."""
    version = [v for v in kv.all_versions() if kv.major_minor(v) <= kv.major_minor(k8s_version)][-1]
    defs = kv.schema_contents(f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", k8s_version)
    registry = Resource.from_contents(defs) @ Registry()
    ref = {"$ref": f"{defs['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(ref, registry=registry)


def documents(name: str) -> list[dict[str, Any]]:
    text = sys.stdin.read() if name == "-" else pathlib.Path(name).read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    crds = crd_schemas()
    meta = object_meta_validator(args.kubernetes_version)
    failed = 0
    for name in args.files:
        for doc in documents(name):
            what = f"{doc.get('kind', '?').lower()}/{(doc.get('metadata') or {}).get('name', '?')}"
            api_version = doc.get("apiVersion", "")
            if api_version.split("/")[0] in CRD_GROUPS:
                found = crds.get((api_version, doc.get("kind")))
                if found is None:
                    print(f"ERROR {name} {what}: no vendored CRD in k8s/schemas/ for {api_version} {doc.get('kind')}")
                    failed = 1
                    continue
                schema, source = found
                errors = [
                    f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
                    for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)
                ]
                errors += [
                    f"metadata.{'.'.join(map(str, e.absolute_path))}: {e.message}"
                    for e in meta.iter_errors(doc.get("metadata") or {})
                ]
                against = f"the CRD {source}"
            else:
                against = f"Kubernetes {args.kubernetes_version}"
                try:
                    kv.validate(doc, args.kubernetes_version, strict=True)
                    errors = []
                except kv.ValidationError as e:
                    errors = [f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}"]
                except (kv.SchemaNotFoundError, kv.VersionNotSupportedError, kv.InvalidSchemaError) as e:
                    errors = [e.message]
            if errors:
                failed = 1
                for error in errors:
                    print(f"ERROR {name} {what} against {against}: {error}")
            else:
                print(f"INFO {name} {what} passed against {against} (strict)")
    return failed


if __name__ == "__main__":
    sys.exit(main())
