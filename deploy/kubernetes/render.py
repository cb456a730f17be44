#!/usr/bin/env python3
"""Renders a kustomization directory to YAML on stdout, without kubectl.

Only what deploy/kubernetes uses is supported, and anything else is refused, so a
new kustomize feature cannot pass validation unrendered: `resources` (files and
directories), `namespace`, `images`, `configMapGenerator` (files), `secretGenerator`
(literals) and `patches` given as inline JSON 6902 operations with a kind/name
target (the name is a regular expression, as in kustomize). Generated names get no
hash suffix. When kubectl is present, deploy/validate.sh checks that this renders
the same resources as `kubectl kustomize`.

usage: render.py DIR               print the rendered resources
       render.py DIR --same-as FILE  exit 1 unless FILE (kubectl kustomize's output)
                                     holds the same resources, hash suffixes aside
"""
import base64
import copy
import os
import re
import sys

import yaml

KNOWN = {"apiVersion", "kind", "resources", "namespace", "images", "configMapGenerator",
         "secretGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}


def fail(msg):
    sys.exit(f"render.py: {msg}")


def pointer(path):
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def walk(doc, parts):
    for p in parts:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc


def apply_op(doc, op):
    parts = pointer(op["path"])
    parent = walk(doc, parts[:-1])
    last = parts[-1]
    kind = op["op"]
    if isinstance(parent, list):
        idx = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(idx, copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[idx] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[idx]
        else:
            fail(f"unsupported patch op {kind}")
    else:
        if kind in ("add", "replace"):
            if kind == "replace" and last not in parent:
                fail(f"replace of missing path {op['path']}")
            parent[last] = copy.deepcopy(op["value"])
        elif kind == "remove":
            if last not in parent:
                fail(f"remove of missing path {op['path']}")
            del parent[last]
        else:
            fail(f"unsupported patch op {kind}")


def set_images(obj, images):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                for c in v:
                    img = c.get("image", "")
                    name = re.split(r"[:@]", img, maxsplit=1)[0] if not img.startswith("sha256") else img
                    for im in images:
                        if name == im["name"]:
                            new = im.get("newName", name)
                            tag = im.get("newTag")
                            if tag is None and ":" in img:
                                tag = img.split(":", 1)[1]
                            c["image"] = f"{new}:{tag}" if tag else new
            else:
                set_images(v, images)
    elif isinstance(obj, list):
        for v in obj:
            set_images(v, images)


def build(d):
    path = os.path.join(d, "kustomization.yaml")
    with open(path) as f:
        k = yaml.safe_load(f)
    unknown = set(k) - KNOWN
    if unknown:
        fail(f"{path}: unsupported fields {sorted(unknown)}")
    out = []
    for r in k.get("resources", []):
        p = os.path.join(d, r)
        if os.path.isdir(p):
            out.extend(build(p))
        else:
            with open(p) as f:
                out.extend(x for x in yaml.safe_load_all(f) if x)
    for g in k.get("configMapGenerator", []):
        data = {}
        for fn in g.get("files", []):
            with open(os.path.join(d, fn)) as f:
                data[os.path.basename(fn)] = f.read()
        if set(g) - {"name", "files"}:
            fail(f"{path}: unsupported configMapGenerator fields")
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": g["name"]}, "data": data})
    for g in k.get("secretGenerator", []):
        if set(g) - {"name", "literals"}:
            fail(f"{path}: unsupported secretGenerator fields")
        data = {}
        for lit in g.get("literals", []):
            key, val = lit.split("=", 1)
            data[key] = base64.b64encode(val.encode()).decode()
        out.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": g["name"]}, "data": data})
    for p in k.get("patches", []):
        if set(p) - {"target", "patch"} or set(p["target"]) - {"kind", "name"}:
            fail(f"{path}: only inline JSON 6902 patches with a kind/name target are supported")
        ops = yaml.safe_load(p["patch"])
        if not isinstance(ops, list):
            fail(f"{path}: only JSON 6902 patches (a list of operations) are supported")
        hits = 0
        for r in out:
            t = p["target"]
            if "kind" in t and r["kind"] != t["kind"]:
                continue
            if "name" in t and not re.fullmatch(t["name"], r["metadata"]["name"]):
                continue
            hits += 1
            for op in ops:
                apply_op(r, op)
        if hits == 0:
            fail(f"{path}: patch target {p['target']} matches nothing")
    if "namespace" in k:
        for r in out:
            if r["kind"] not in CLUSTER_SCOPED:
                r["metadata"]["namespace"] = k["namespace"]
    if "images" in k:
        for r in out:
            set_images(r, k["images"])
    return out


def same_as(ours, path):
    with open(path) as f:
        theirs = [x for x in yaml.safe_load_all(f) if x]
    generated = {r["metadata"]["name"] for r in ours if r["kind"] in ("ConfigMap", "Secret")}

    def norm(o):
        if isinstance(o, dict):
            return {k: norm(v) for k, v in o.items()}
        if isinstance(o, list):
            return [norm(v) for v in o]
        if isinstance(o, str):
            for g in generated:
                if re.fullmatch(re.escape(g) + r"-[a-z0-9]{10}", o):
                    return g
        return o

    def key(r):
        return (r["kind"], r["metadata"]["name"])

    a = {key(r): r for r in ours}
    b = {key(r): r for r in map(norm, theirs)}
    diff = sorted(set(a) ^ set(b)) + sorted(k for k in a if k in b and a[k] != b[k])
    if diff:
        fail(f"differs from {path} in {diff}")


def main():
    args = sys.argv[1:]
    if len(args) == 1:
        yaml.safe_dump_all(build(args[0]), sys.stdout, sort_keys=False)
    elif len(args) == 3 and args[1] == "--same-as":
        same_as(build(args[0]), args[2])
    else:
        fail("usage: render.py DIR [--same-as FILE]")


if __name__ == "__main__":
    main()
