#!/usr/bin/env python3
"""Render a kustomization directory without kubectl or kustomize.

    python deploy/render_kustomize.py deploy/k8s/overlays/production > rendered.yaml

Only the features the kustomizations under deploy/k8s use are implemented:

- ``resources``: YAML files (one or more documents) and directories holding a
  ``kustomization.yaml`` (rendered recursively, then treated as plain resources);
- ``namespace``: set on every namespaced resource;
- ``labels``: ``pairs`` added to ``metadata.labels`` and, with ``includeTemplates``, to pod
  templates and StatefulSet volume claim templates; ``includeSelectors: true`` is refused
  (selectors are immutable once deployed);
- ``images``: ``name`` matched against container images, ``newName`` / ``newTag`` / ``digest``;
- ``replicas``: ``name`` / ``count`` for Deployments and StatefulSets;
- ``configMapGenerator``: ``files`` (``key=path`` or ``path``) and ``literals``, name
  suffixed with a content hash, references in pod templates rewritten. The hash is ours,
  not kustomize's (same purpose: a new name whenever the content changes);
- ``patches``: strategic merge patches (no target: each document names its resource by
  kind and metadata.name; merge keys of the list fields used here; ``null`` deletes a
  field; ``$patch: delete`` removes a list item or, at the top, the whole resource) and
  JSON 6902 patches (a list of ``add`` / ``remove`` / ``replace`` operations, with a
  ``target`` naming the resource).

Anything else in a kustomization file is an error, so that these files never rely on a
feature the offline checks would silently ignore. kubectl kustomize renders the same
files to the same resources (modulo the generated ConfigMap's hash and document order).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "replicas",
    "configMapGenerator",
    "patches",
}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

# Strategic-merge keys of the Kubernetes list fields our patches touch (by field name).
# Lists not named here are replaced whole, as Kubernetes does for atomic lists.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "envFrom": None,  # atomic
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "topologySpreadConstraints": "topologyKey",
}


class KustomizeError(Exception):
    """A kustomization this renderer cannot (or will not) render."""


# ---------------------------------------------------------------------------- loading


def load_documents(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def find_kustomization(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _ident(resource: Resource) -> str:
    meta = resource.get("metadata", {})
    return f"{resource.get('kind')}/{meta.get('name')}"


def _group(api_version: str) -> str:
    return api_version.split("/")[0] if "/" in api_version else ""


# ---------------------------------------------------------------------------- rendering


def render(directory: str | Path, kustomization: dict[str, Any] | None = None) -> list[Resource]:
    """The resources of the kustomization in ``directory``, fully transformed.

    ``kustomization`` replaces the directory's own file (relative paths still resolve
    against ``directory``); tests use it to render variants.
    """
    root = Path(directory).resolve()
    if kustomization is None:
        docs = load_documents(find_kustomization(root))
        if len(docs) != 1 or not isinstance(docs[0], dict):
            raise KustomizeError(f"{root}: kustomization must be one mapping")
        kustomization = docs[0]
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{root}: unsupported kustomization field(s): {sorted(unknown)}")

    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        target = (root / entry).resolve()
        if target.is_dir():
            resources.extend(render(target))
        elif target.is_file():
            for doc in load_documents(target):
                if not isinstance(doc, dict) or "kind" not in doc:
                    raise KustomizeError(f"{target}: not a Kubernetes resource")
                resources.append(doc)
        else:
            raise KustomizeError(f"{root}: resource {entry!r} not found")

    generated = [_generate_configmap(root, spec) for spec in kustomization.get("configMapGenerator", [])]
    resources = generated + resources
    _check_unique(resources, root)

    for patch in kustomization.get("patches", []):
        resources = _apply_patch_entry(resources, root, patch)

    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED_KINDS:
                resource.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    for spec in kustomization.get("labels", []):
        _apply_labels(resources, spec, root)
    for spec in kustomization.get("images", []):
        _apply_image(resources, spec)
    for spec in kustomization.get("replicas", []):
        _apply_replicas(resources, spec, root)

    # Generated names get their hash last, once their content is final.
    for cm in generated:
        _suffix_configmap(cm, resources)
    return resources


def _check_unique(resources: list[Resource], root: Path) -> None:
    seen: set[str] = set()
    for resource in resources:
        ident = _ident(resource)
        if ident in seen:
            raise KustomizeError(f"{root}: duplicate resource {ident}")
        seen.add(ident)


# ---------------------------------------------------------------------------- generators


def _generate_configmap(root: Path, spec: dict[str, Any]) -> Resource:
    allowed = {"name", "files", "literals"}
    if set(spec) - allowed:
        raise KustomizeError(f"{root}: configMapGenerator supports only {sorted(allowed)}")
    data: dict[str, str] = {}
    for item in spec.get("files", []):
        key, sep, rel = item.partition("=")
        if not sep:
            key, rel = Path(item).name, item
        source = (root / rel).resolve()
        if root not in source.parents:
            raise KustomizeError(f"{root}: {item!r} is outside the kustomization directory")
        data[key] = source.read_text(encoding="utf-8")
    for item in spec.get("literals", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise KustomizeError(f"{root}: literal {item!r} is not KEY=VALUE")
        data[key] = value
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": spec["name"], "annotations": {"render-kustomize/generated": "true"}},
        "data": data,
    }


def _suffix_configmap(cm: Resource, resources: list[Resource]) -> None:
    meta = cm["metadata"]
    meta["annotations"].pop("render-kustomize/generated")
    if not meta["annotations"]:
        del meta["annotations"]
    digest = hashlib.sha256(json.dumps(cm, sort_keys=True).encode()).hexdigest()[:10]
    old, new = meta["name"], f"{meta['name']}-{digest}"
    meta["name"] = new
    for resource in resources:
        for pod_spec in _pod_specs(resource):
            for volume in pod_spec.get("volumes", []):
                if volume.get("configMap", {}).get("name") == old:
                    volume["configMap"]["name"] = new
                for source in volume.get("projected", {}).get("sources", []):
                    if source.get("configMap", {}).get("name") == old:
                        source["configMap"]["name"] = new
            for container in _containers(pod_spec):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("configMapKeyRef")
                    if ref and ref.get("name") == old:
                        ref["name"] = new
                for env_from in container.get("envFrom", []):
                    ref = env_from.get("configMapRef")
                    if ref and ref.get("name") == old:
                        ref["name"] = new


# ---------------------------------------------------------------------------- transformers


def _pod_template(resource: Resource) -> Resource | None:
    template: Resource | None = None
    if resource.get("kind") in WORKLOAD_KINDS:
        template = resource.get("spec", {}).get("template")
    elif resource.get("kind") == "CronJob":
        template = resource.get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template")
    return template


def _pod_specs(resource: Resource) -> Iterator[Resource]:
    template = _pod_template(resource)
    if template is not None and "spec" in template:
        yield template["spec"]


def _containers(pod_spec: Resource) -> Iterator[Resource]:
    for field in ("initContainers", "containers"):
        yield from pod_spec.get(field, [])


def _apply_labels(resources: list[Resource], spec: dict[str, Any], root: Path) -> None:
    if set(spec) - {"pairs", "includeSelectors", "includeTemplates"}:
        raise KustomizeError(f"{root}: labels entry supports pairs, includeSelectors, includeTemplates")
    if spec.get("includeSelectors"):
        raise KustomizeError(f"{root}: labels.includeSelectors: true is not supported")
    pairs = spec.get("pairs", {})
    for resource in resources:
        resource.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if not spec.get("includeTemplates"):
            continue
        template = _pod_template(resource)
        if template is not None:
            template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if resource["kind"] == "StatefulSet":
            for claim in resource["spec"].get("volumeClaimTemplates", []):
                claim.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)


def _split_image(image: str) -> tuple[str, str]:
    """(name, tag-or-digest suffix including its ':' or '@')."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _apply_image(resources: list[Resource], spec: dict[str, Any]) -> None:
    for resource in resources:
        for pod_spec in _pod_specs(resource):
            for container in _containers(pod_spec):
                name, suffix = _split_image(container.get("image", ""))
                if name != spec["name"]:
                    continue
                if "newName" in spec:
                    name = spec["newName"]
                if "digest" in spec:
                    suffix = "@" + spec["digest"]
                elif "newTag" in spec:
                    suffix = ":" + str(spec["newTag"])
                container["image"] = name + suffix


def _apply_replicas(resources: list[Resource], spec: dict[str, Any], root: Path) -> None:
    hits = [r for r in resources if r["kind"] in WORKLOAD_KINDS and r["metadata"]["name"] == spec["name"]]
    if not hits:
        raise KustomizeError(f"{root}: replicas: no workload named {spec['name']!r}")
    for resource in hits:
        resource["spec"]["replicas"] = int(spec["count"])


# ---------------------------------------------------------------------------- patches


def _apply_patch_entry(resources: list[Resource], root: Path, entry: dict[str, Any]) -> list[Resource]:
    if set(entry) - {"path", "patch", "target"}:
        raise KustomizeError(f"{root}: patches entry supports path, patch, target")
    if "path" in entry:
        text = (root / entry["path"]).read_text(encoding="utf-8")
        where = f"{root}/{entry['path']}"
    else:
        text, where = entry["patch"], f"{root}: inline patch"
    docs = [doc for doc in yaml.safe_load_all(text) if doc is not None]

    if len(docs) == 1 and isinstance(docs[0], list):  # JSON 6902
        if "target" not in entry:
            raise KustomizeError(f"{where}: a JSON 6902 patch needs a target")
        targets = [r for r in resources if _matches_target(r, entry["target"])]
        if not targets:
            raise KustomizeError(f"{where}: target {entry['target']} matches nothing")
        for resource in targets:
            for op in docs[0]:
                _json6902(resource, op, where)
        return resources

    if "target" in entry:
        raise KustomizeError(f"{where}: strategic merge patches here name their resource, no target")
    if sum(1 for doc in docs if isinstance(doc, dict) and doc.get("$patch") == "delete") > 1:
        # kustomize v5.5 (kubectl 1.32) panics on this; keep the files portable.
        raise KustomizeError(f"{where}: one `$patch: delete` document per patch file")
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "name" not in doc.get("metadata", {}):
            raise KustomizeError(f"{where}: a strategic merge patch needs kind and metadata.name")
        index = next(
            (
                i
                for i, r in enumerate(resources)
                if r["kind"] == doc["kind"]
                and r["metadata"]["name"] == doc["metadata"]["name"]
                and _group(r["apiVersion"]) == _group(str(doc.get("apiVersion", r["apiVersion"])))
            ),
            None,
        )
        if index is None:
            raise KustomizeError(f"{where}: patch target {_ident(doc)} not found")
        if doc.get("$patch") == "delete":
            del resources[index]
        else:
            resources[index] = strategic_merge(resources[index], doc)
    return resources


def _matches_target(resource: Resource, target: dict[str, Any]) -> bool:
    api_version = resource.get("apiVersion", "")
    version = api_version.split("/")[-1]
    checks = {
        "kind": resource.get("kind"),
        "name": resource.get("metadata", {}).get("name"),
        "group": _group(api_version),
        "version": version,
        "namespace": resource.get("metadata", {}).get("namespace"),
    }
    if set(target) - set(checks):
        raise KustomizeError(f"target supports {sorted(checks)}")
    return all(checks[key] == value for key, value in target.items())


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    """``patch`` merged into a copy of ``base`` (the subset of Kubernetes' strategic merge we use)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if patch.get("$patch") == "replace":
            return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if key == "$patch":
                continue
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value, key)
            else:
                out[key] = _strip_directives(value)
        return out
    if isinstance(patch, list) and isinstance(base, list):
        merge_key = _merge_key(field, base + patch)
        if merge_key is None:
            return _strip_directives(patch)
        # Order as kustomize writes it: the patch's items first (merged with the base
        # item of the same key, if any), then the base items the patch did not name.
        by_key = {old.get(merge_key): old for old in base if isinstance(old, dict)}
        named: set[Any] = set()
        head: list[Any] = []
        for item in patch:
            if not isinstance(item, dict) or merge_key not in item:
                raise KustomizeError(f"list {field!r}: every patch item needs {merge_key!r}")
            key = item[merge_key]
            named.add(key)
            if item.get("$patch") == "delete":
                continue
            head.append(strategic_merge(by_key[key], item, field) if key in by_key else _strip_directives(item))
        tail = [copy.deepcopy(old) for old in base if not (isinstance(old, dict) and old.get(merge_key) in named)]
        return head + tail
    return _strip_directives(patch)


def _merge_key(field: str | None, items: list[Any]) -> str | None:
    if field == "ports":  # containerPort in containers, port in Services
        if all(isinstance(i, dict) and "containerPort" in i for i in items):
            return "containerPort"
        if all(isinstance(i, dict) and "port" in i for i in items):
            return "port"
        return None
    return MERGE_KEYS.get(field or "")


def _strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if k != "$patch" and v is not None}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return copy.deepcopy(value)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _json6902(resource: Resource, op: dict[str, Any], where: str) -> None:
    kind = op.get("op")
    parts = _pointer(op["path"])
    parent: Any = resource
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if kind in ("add", "replace"):
        value = copy.deepcopy(op["value"])
        if isinstance(parent, list):
            if last == "-":
                parent.append(value)
            elif kind == "add":
                parent.insert(int(last), value)
            else:
                parent[int(last)] = value
        else:
            if kind == "replace" and last not in parent:
                raise KustomizeError(f"{where}: replace of missing {op['path']}")
            parent[last] = value
    elif kind == "remove":
        if isinstance(parent, list):
            del parent[int(last)]
        else:
            del parent[last]
    else:
        raise KustomizeError(f"{where}: JSON 6902 op {kind!r} not supported")


# ---------------------------------------------------------------------------- output


def dump(resources: list[Resource]) -> str:
    return str(yaml.safe_dump_all(resources, sort_keys=False, default_flow_style=False))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: render_kustomize.py DIRECTORY", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(dump(render(args[0])))
    except KustomizeError as exc:
        print(f"render_kustomize: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
