"""The injector's settings as Istio names them: the Helm values tree (``values.…``), the mesh config
(``meshConfig.…``) and the operator's components (``components.cni.enabled``).

They come from ``--set PATH=VALUE`` (istioctl's syntax), a values tree as the ``istio-sidecar-injector``
ConfigMap holds it, and a mesh config, and are laid over the chart's defaults. Settings that do not concern the
capture are kept and ignored; a setting Istio does not have is refused. Pure: the caller reads the files (this
module reads only its vendored list of Istio's settings).
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from istio_iptables.errors import ConfigError
from istio_iptables.records import record

TYPE_CHECKING = False  # typing only for the type checker: the CNI plugin loads this module per captured pod
if TYPE_CHECKING:
    from typing import Any

DEFAULT_VALUES: Mapping[str, Any] = {
    "global": {
        "proxy": {
            "includeIPRanges": "*",
            "excludeIPRanges": "",
            "includeInboundPorts": "*",
            "excludeInboundPorts": "",
            "includeOutboundPorts": "",
            "excludeOutboundPorts": "",
            "statusPort": 15020,
            "readinessInitialDelaySeconds": 0,
            "readinessPeriodSeconds": 15,
            "readinessFailureThreshold": 4,
            "logLevel": "warning",
            "componentLogLevel": "misc:error",
            "clusterDomain": "cluster.local",
            "privileged": False,
            "holdApplicationUntilProxyStarts": False,
            "resources": {
                "requests": {"cpu": "100m", "memory": "128Mi"},
                "limits": {"cpu": "2000m", "memory": "1024Mi"},
            },
        },
        "proxy_init": {"image": "proxyv2", "forceApplyIptables": False},
        "logging": {"level": "default:info"},
        "logAsJson": False,
        "imagePullPolicy": "",
        "nativeNftables": False,
        "pilotCertProvider": "istiod",
        "istioNamespace": "istio-system",
    },
    "pilot": {"cni": {"enabled": False, "provider": "default"}},
    "sidecarInjectorWebhook": {"defaultTemplates": [], "templates": {}, "rewriteAppHTTPProbe": True},
}
"""Istio's chart defaults (``manifests/charts/istio-control/istio-discovery/values.yaml``) for what the
capture and the shipped istio template read."""

DEFAULT_MESH: Mapping[str, Any] = {
    "proxyListenPort": 15001,
    "proxyInboundListenPort": 15006,
    "defaultConfig": {"interceptionMode": "REDIRECT", "proxyMetadata": {}},
}

_BOOLEANS = (
    "values.global.logAsJson",
    "values.global.nativeNftables",
    "values.global.proxy_init.forceApplyIptables",
    "values.global.proxy.privileged",
    "values.global.proxy.holdApplicationUntilProxyStarts",
    "values.sidecarInjectorWebhook.rewriteAppHTTPProbe",
    "values.pilot.cni.enabled",
    "values.istio_cni.enabled",
    "components.cni.enabled",
)
_MAPS = (
    "values.global",
    "values.global.proxy",
    "values.global.proxy_init",
    "values.global.logging",
    "values.pilot",
    "values.pilot.cni",
    "values.sidecarInjectorWebhook",
    "meshConfig.defaultConfig",
)
"""The branches the capture reads below: a scalar there would silently read as all defaults."""
KNOWN_KEYS_FILE = Path(__file__).with_name("istio_keys.json")
"""Every setting path Istio knows, as an IstioOperator spec (``values``, ``meshConfig``, ``components``, ...),
vendored from Istio's sources by scripts/vendor_istio_keys.py: a node maps its keys to their nodes, or is
ANY_KEY (a free-form map such as labels or proxyMetadata: any key below) or a value (nothing below)."""
ANY_KEY = "*"
_PULL_POLICIES = ("", "Always", "IfNotPresent", "Never")
_INTERCEPTION_MODES = ("REDIRECT", "TPROXY", "NONE")


@record
class Settings:
    values: Mapping[str, Any]
    """The Helm values tree, chart defaults filled in (``global.proxy.includeIPRanges``, ...)."""
    mesh: Mapping[str, Any]
    """The mesh config, defaults filled in (``defaultConfig.interceptionMode``, ...)."""
    cni: bool = False
    """Istio's CNI plugin does the capture (``components.cni.enabled``, ``values.pilot.cni.enabled``)."""

    @classmethod
    def from_sources(
        cls,
        sets: Sequence[str] = (),
        values: Mapping[str, Any] | None = None,
        mesh_config: Mapping[str, Any] | None = None,
    ) -> Settings:
        """The chart defaults, overlaid by ``values`` and ``mesh_config`` (trees), then by each ``--set``.
        Raises ConfigError naming the setting when one is malformed or of the wrong type."""
        tree: dict[str, Any] = {"values": _merged(DEFAULT_VALUES, _tree(values, "--values")), "components": {}}
        tree["meshConfig"] = _merged(DEFAULT_MESH, _tree(mesh_config, "--mesh-config"))
        for what, root, document in (("--values", "values", values), ("--mesh-config", "meshConfig", mesh_config)):
            for path in _key_paths(document, (root,)):
                if problem := unknown_setting(path):
                    raise ConfigError(f"invalid value for {what}: {problem}")
        for assignment in sets:
            path, value = _parse_set(assignment)
            if problem := unknown_setting(path):
                raise ConfigError(f"invalid value for --set: '{assignment}': {problem}")
            _put(tree, path, value, assignment)
        for branch in _MAPS:
            _check(tree, branch, lambda value: isinstance(value, Mapping), "must be a map of settings")
        for boolean in _BOOLEANS:
            _check(tree, boolean, lambda value: isinstance(value, bool), "must be true or false")
        _check(
            tree, "values.global.imagePullPolicy", lambda value: value in _PULL_POLICIES, "Always|IfNotPresent|Never"
        )
        _check(tree, "meshConfig.defaultConfig.interceptionMode", _is_mode, "must be REDIRECT, TPROXY or NONE")
        _check(tree, "meshConfig.defaultConfig.proxyMetadata", _is_string_map, "must map names to strings")
        _check(tree, "values.global.proxy.resources", _is_resources, "must hold requests and limits maps")
        for port in (
            "meshConfig.proxyListenPort",
            "meshConfig.proxyInboundListenPort",
            "meshConfig.defaultConfig.statusPort",
            "values.global.proxy.statusPort",
        ):
            _check(tree, port, _is_port_or_zero, "must be a port number (0-65535)")
        for count in (
            "values.global.proxy.readinessInitialDelaySeconds",
            "values.global.proxy.readinessPeriodSeconds",
            "values.global.proxy.readinessFailureThreshold",
        ):
            _check(tree, count, _is_count, "must be a non-negative integer")
        values_tree, components = tree["values"], tree["components"]
        cni = any(
            _lookup(root, path) is True
            for root, path in (
                (components, ("cni", "enabled")),
                (values_tree, ("pilot", "cni", "enabled")),
                (values_tree, ("istio_cni", "enabled")),
            )
        )
        return cls(values=values_tree, mesh=tree["meshConfig"], cni=cni)

    def value(self, path: str) -> Any:
        """The value at a dotted path of the values tree (``global.proxy.statusPort``), None if absent."""
        return _lookup(self.values, tuple(path.split(".")))

    def text(self, path: str) -> str:
        """The value as Istio's template prints it into an argument (Go's ``fmt.Sprint``)."""
        return go_text(self.value(path))

    def mesh_value(self, path: str) -> Any:
        return _lookup(self.mesh, tuple(path.split(".")))


def go_text(value: Any) -> str:
    """Go's ``fmt.Sprint`` of a scalar from a YAML or JSON tree (``true``, ``15020``, ``<nil>`` aside)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def go_truthy(value: Any) -> bool:
    """A Go template's ``if``: false, 0, "", nil and empty maps and lists are false."""
    return bool(value) and value != "false"


def parse_set_value(text: str) -> Any:
    """istioctl's --set value: true/false and integers typed, anything else a string."""
    if text in ("true", "false"):
        return text == "true"
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    return text


def _parse_set(assignment: str) -> tuple[tuple[str, ...], Any]:
    path, equals, text = assignment.partition("=")
    keys = tuple(path.split("."))
    if not equals or not path or "" in keys:
        raise ConfigError(f"invalid value for --set: '{assignment}': must be PATH=VALUE (e.g. values.global.x=y)")
    return keys, parse_set_value(text)


@functools.cache
def known_keys() -> Mapping[str, Any]:
    """The vendored tree of Istio's setting paths (KNOWN_KEYS_FILE), read when a setting is given."""
    keys: Mapping[str, Any] = json.loads(KNOWN_KEYS_FILE.read_text())["keys"]
    return keys


def unknown_setting(path: tuple[str, ...]) -> str:
    """What is wrong with a setting path Istio does not know (a misspelling that Istio too would ignore, or
    refuse), naming the nearest known key; empty when the path is known."""
    node: Any = known_keys()
    for depth, key in enumerate(path):
        if node == ANY_KEY:
            return ""
        name = key.partition("[")[0]
        if isinstance(node, Mapping) and name in node and name != key:
            return ""  # istioctl's list element (ingressGateways[0]): a list's elements are not listed
        if not isinstance(node, Mapping) or key not in node:
            nearest = difflib.get_close_matches(key, sorted(node), n=1) if isinstance(node, Mapping) else []
            hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
            return f"unknown setting '{'.'.join(path[: depth + 1])}'{hint}"
        node = node[key]
    return ""


def _key_paths(document: Any, prefix: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """The path of each key of a settings tree, down to the values (lists and scalars are not entered)."""
    for key, value in document.items() if isinstance(document, Mapping) else ():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value:
            yield from _key_paths(value, path)
        else:
            yield path


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any, assignment: str) -> None:
    node = tree
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"invalid value for --set: '{assignment}': {'.'.join(path[: depth + 1])} is not a map")
        node = child
    node[path[-1]] = value


def _tree(document: Mapping[str, Any] | None, what: str) -> Mapping[str, Any]:
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ConfigError(f"invalid value for {what}: must be a map of settings, got {type(document).__name__}")
    return document


def _merged(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``overlay`` laid over a copy of ``base``, maps merged key by key and a null removing the key (as Helm
    merges values: ``cpu: null`` under ``resources.limits`` drops the chart's CPU limit)."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(key)
    return tree


def _check(tree: Mapping[str, Any], path: str, valid: Any, expected: str) -> None:
    value = _lookup(tree, tuple(path.split(".")))
    if value is not None and not valid(value):
        raise ConfigError(f"invalid value for setting {path}: '{go_text(value)}': {expected}")


def _is_mode(value: Any) -> bool:
    return value in _INTERCEPTION_MODES


def _is_string_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(key, str) and isinstance(item, (str, int, float, bool)) for key, item in value.items()
    )


def _is_resources(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        key in ("requests", "limits") and isinstance(item, Mapping) for key, item in value.items()
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFFFFFF


def _is_port_or_zero(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535
