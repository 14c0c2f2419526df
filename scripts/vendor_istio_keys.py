#!/usr/bin/env python3
"""Write istio_iptables/kube/istio_keys.json: every setting path Istio knows, for ``inject`` to refuse the others.

Usage: scripts/vendor_istio_keys.py ISTIO_GIT_DIR API_GIT_DIR
(clones of github.com/istio/istio and github.com/istio/api; their HEAD commits are noted in the output)

The tree is an IstioOperator spec: ``values`` (the operator's ``Values`` message of
operator/pkg/apis/values_types.proto, with the keys of the istio-discovery and istio-cni charts' values.yaml),
``meshConfig`` (``MeshConfig`` of mesh/v1alpha1/config.proto, ``defaultConfig`` being ``ProxyConfig`` of
proxy.proto) and ``components`` (operator/pkg/apis/types.go). A node is a map of its keys, ``"*"`` (any key
below: a free-form map such as labels or proxyMetadata, or a type not vendored here) or ``1`` (a value: a
scalar or a list, nothing below it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ANY = "*"
VALUE = 1
OUTPUT = Path(__file__).resolve().parent.parent / "istio_iptables" / "kube" / "istio_keys.json"
DISCOVERY_VALUES = "manifests/charts/istio-control/istio-discovery/values.yaml"
CNI_VALUES = "manifests/charts/istio-cni/values.yaml"
VALUES_PROTO = "operator/pkg/apis/values_types.proto"
OPERATOR_TYPES = "operator/pkg/apis/types.go"
MESH_PROTO = "mesh/v1alpha1/config.proto"
FREE_FORM = frozenset(
    {
        *("labels", "annotations", "podAnnotations", "podLabels", "deploymentLabels", "deploymentAnnotations"),
        *("serviceAnnotations", "serviceAccountAnnotations", "proxyMetadata", "resources", "env", "nodeSelector"),
        *("tolerations", "affinity", "seccompProfile", "securityContext", "seLinuxOptions", "templates"),
    }
)
"""Maps whose keys are the user's (names, Kubernetes objects): any key below them is accepted."""
SCALARS = frozenset(
    {"string", "bool", "bytes", "double", "float", "int32", "int64", "uint32", "uint64", "sint32", "sint64"}
    | {"fixed32", "fixed64", "sfixed32", "sfixed64"}
)
WELL_KNOWN_VALUES = frozenset(
    {"google.protobuf.Duration", "google.protobuf.Timestamp"}
    | {f"google.protobuf.{kind}Value" for kind in ("Bool", "String", "Bytes", "Double", "Float")}
    | {f"google.protobuf.{kind}Value" for kind in ("Int32", "Int64", "UInt32", "UInt64")}
)
"""Well-known types written as one JSON value (google.protobuf.Struct and Value hold anything: ANY)."""


def git_show(repo: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", repo, "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
    ).stdout


def git_head(repo: str) -> str:
    return subprocess.run(
        ["git", "-C", repo, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def json_name(field: str) -> str:
    """protobuf's default JSON name: snake_case in lowerCamelCase."""
    return re.sub(r"_([a-z0-9])", lambda match: match.group(1).upper(), field)


class Protos:
    """The messages and enums of a set of .proto files, by fully qualified name."""

    def __init__(self, *, proto_names: bool = False) -> None:
        self.proto_names = proto_names
        """Name fields as the .proto spells them (as Go's JSON tags do), not in protobuf's JSON spelling."""
        self.messages: dict[str, list[tuple[str, str, str]]] = {}  # name -> [(json name, label, type)]
        self.enums: set[str] = set()

    def read(self, text: str) -> None:
        text = re.sub(r"/\*.*?\*/", "", re.sub(r"//[^\n]*", "", text), flags=re.DOTALL)
        package = match.group(1) if (match := re.search(r"^\s*package\s+([\w.]+)\s*;", text, re.M)) else ""
        scope: list[tuple[str, str]] = []  # (kind, name) of the open blocks
        for token in re.finditer(r"(message|enum|oneof|service)\s+(\w+)\s*\{|\{|\}|[^{};]+;", text):
            if token.group(1):
                scope.append((token.group(1), token.group(2)))
                name = ".".join([package, *(name for kind, name in scope if kind in ("message", "enum"))])
                if token.group(1) == "enum":
                    self.enums.add(name)
                elif token.group(1) == "message":
                    self.messages.setdefault(name, [])
            elif token.group(0) == "{":
                scope.append(("block", ""))
            elif token.group(0) == "}":
                scope.pop()
            elif scope and any(kind == "message" for kind, _ in scope) and scope[-1][0] in ("message", "oneof"):
                self._field(package, scope, token.group(0))

    def _field(self, package: str, scope: list[tuple[str, str]], statement: str) -> None:
        field = re.match(
            r"\s*(repeated\s+|optional\s+)?(map\s*<[^>]*>|[\w.]+)\s+(\w+)\s*=\s*\d+\s*(\[.*\])?\s*;", statement, re.S
        )
        if not field:
            return
        label, kind, name, options = field.groups()
        custom = re.search(r'json_name\s*=\s*"([^"]+)"', options or "")
        message = ".".join([package, *(name for kind, name in scope if kind == "message")])
        self.messages[message].append(
            (custom.group(1) if custom else name if self.proto_names else json_name(name), (label or "").strip(), kind)
        )

    def resolve(self, kind: str, scope: str) -> str | None:
        """The fully qualified name of a type named in ``scope`` (protobuf's scoping: innermost first)."""
        if kind.startswith("."):
            return kind[1:]
        parts = scope.split(".")
        for depth in range(len(parts), -1, -1):
            candidate = ".".join([*parts[:depth], kind])
            if candidate in self.messages or candidate in self.enums:
                return candidate
        return None

    def tree(self, message: str, seen: tuple[str, ...] = ()) -> Any:
        node: dict[str, Any] = {}
        for name, label, kind in self.messages[message]:
            node[name] = ANY if name in FREE_FORM else self._node(label, kind, message, seen)
        return node

    def _node(self, label: str, kind: str, scope: str, seen: tuple[str, ...]) -> Any:
        if kind.startswith("map"):
            return ANY
        if label == "repeated" or kind in SCALARS or kind in WELL_KNOWN_VALUES:
            return VALUE
        resolved = self.resolve(kind, scope)
        if resolved in self.enums:
            return VALUE
        if resolved is None or resolved in seen:
            return ANY  # google.protobuf.Struct/Value/Any, a type not vendored, or a recursive type
        return self.tree(resolved, (*seen, resolved))


def api_protos(api: str, first: str) -> Protos:
    """``first`` and the files of istio/api it imports, transitively."""
    protos, pending, done = Protos(), [first], set()
    while pending:
        path = pending.pop()
        if path in done:
            continue
        done.add(path)
        text = git_show(api, path)
        protos.read(text)
        pending += [name for name in re.findall(r'^import\s+"([^"]+)"', text, re.M) if not name.startswith("google/")]
    return protos


def from_yaml(document: Any) -> Any:
    """The keys of a chart's values: ``{}`` is a map the chart leaves to the user."""
    if isinstance(document, dict):
        if not document:
            return ANY
        return {key: ANY if key in FREE_FORM else from_yaml(value) for key, value in document.items()}
    return VALUE


def union(one: Any, other: Any) -> Any:
    """Both trees' keys; where one accepts any key below, so does the union."""
    if ANY in (one, other):
        return ANY
    if isinstance(one, dict) and isinstance(other, dict):
        return {
            key: union(one[key], other[key]) if key in one and key in other else one.get(key, other.get(key))
            for key in {**one, **other}
        }
    return one if isinstance(one, dict) else other


def chart_values(istio: str, path: str) -> dict[str, Any]:
    document = yaml.safe_load(git_show(istio, path))
    return dict(document.get("_internal_defaults_do_not_set", document))


def values_tree(istio: str, mesh: Any) -> Any:
    protos = Protos(proto_names=True)  # the operator reads values with Go's JSON tags: istio_cni, not istioCni
    protos.read(git_show(istio, VALUES_PROTO))
    (values,) = [name for name in protos.messages if name.endswith(".Values")]
    tree = protos.tree(values)
    # The discovery chart's own keys are pilot's (the operator copies values.pilot to the chart's top level),
    # but for those that are the Values message's fields.
    discovery = chart_values(istio, DISCOVERY_VALUES)
    top = {key: discovery.pop(key) for key in list(discovery) if key in tree}
    tree = union(tree, from_yaml({**top, "pilot": discovery}))
    cni = chart_values(istio, CNI_VALUES)
    tree = union(tree, from_yaml({"global": cni.pop("global", {}), "cni": cni}))
    tree["meshConfig"] = mesh  # a google.protobuf.Value in the proto: the chart reads it as a mesh config
    return tree


def go_structs(text: str) -> dict[str, list[tuple[str, str]]]:
    """Each struct of a Go file: its fields' JSON names and types."""
    structs = {}
    for name, body in re.findall(r"^type (\w+) struct \{\n(.*?)^\}", text, re.M | re.S):
        structs[name] = [
            (tag, kind)
            for kind, tag in re.findall(r'^\s*\w+\s+(\S+)\s+`json:"([^",]*)[^`]*`', body, re.M)
            if tag and tag != "-"
        ]
    return structs


def go_tree(structs: dict[str, list[tuple[str, str]]], name: str) -> Any:
    node: dict[str, Any] = {}
    for tag, kind in structs[name]:
        bare = kind.lstrip("*")
        if tag in FREE_FORM or bare.startswith("map[") or bare == "any" or "." in bare:
            node[tag] = ANY  # a map, or a Kubernetes type not vendored here
        elif bare.startswith("[]") or bare not in structs or bare == "BoolValue":
            node[tag] = VALUE
        else:
            node[tag] = go_tree(structs, bare)
    return node


def main() -> None:
    istio, api = sys.argv[1:3]
    protos = api_protos(api, MESH_PROTO)
    mesh = protos.tree("istio.mesh.v1alpha1.MeshConfig")
    structs = go_structs(git_show(istio, OPERATOR_TYPES))
    spec = go_tree(structs, "IstioOperatorSpec")
    spec.update(values=values_tree(istio, mesh), meshConfig=mesh)
    document = {
        "format": 'a node maps its keys to their nodes; "*": any key below (a free-form map); 1: a value',
        "sources": {
            "github.com/istio/istio": {
                "commit": git_head(istio),
                "paths": [DISCOVERY_VALUES, CNI_VALUES, VALUES_PROTO, OPERATOR_TYPES],
            },
            "github.com/istio/api": {"commit": git_head(api), "paths": [MESH_PROTO, "and the files it imports"]},
        },
        "keys": spec,
    }
    OUTPUT.write_text(json.dumps(document, separators=(",", ":"), sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
