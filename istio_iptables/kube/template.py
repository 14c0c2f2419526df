"""The injector's configuration: which pods get a sidecar, and the sidecar itself (the proxy container, its
volumes, labels and annotations), as a ConfigMap shaped like Istio's ``istio-sidecar-injector`` holds it
under its ``config`` key.

Istio's templates are Go text/template; ours are structured YAML (``injector-config.schema.json``) whose
strings may hold placeholders, ``{{ .Name }}``, from a fixed list (``PLACEHOLDERS``): no loops, no functions,
and no conditions but the overlays' fixed ones (``CONDITIONS``). A placeholder that is a whole string takes
the value's type (``containerPort: "{{ .OutboundPort }}"`` is a number); standing for nothing (null or an
empty string) it removes its key, as Kubernetes leaves an unset field out; a list item standing for a list is
spliced in. Pure: the caller reads the files, this module only the package's own schema and shipped
configurations.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from istio_iptables.errors import ConfigError
from istio_iptables.records import record

SCHEMA_FILE = "injector-config.schema.json"
SHIPPED = {"istio": "istio.yaml", "relay": "relay.yaml"}
"""The shipped configurations (``kube/templates/``), by the name ``--injector-config`` takes."""

PLACEHOLDERS: Mapping[str, str] = {
    "ProxyUID": "the proxy's securityContext.runAsUser",
    "ProxyGID": "the proxy's securityContext.runAsGroup (its runAsUser when not set)",
    "OutboundPort": "listeners.outbound, where captured outbound connections arrive (-p)",
    "InboundPort": "listeners.inbound, where captured inbound connections arrive (-z)",
    "InterceptionMode": "the pod's interception mode (REDIRECT or TPROXY)",
    "Namespace": "the pod's namespace as known at injection (default when not given)",
    "WorkloadName": "the name of the workload that owns the pod (the pod's own name for a bare pod)",
    "Owner": "kubernetes://apis/<apiVersion>/namespaces/<namespace>/<kind>s/<name> of that workload",
    "AppContainers": "the names of the pod's containers, comma separated",
    "PodPorts": "the ports the pod's containers declare, as a JSON list (as Istio's ISTIO_META_POD_PORTS)",
    "ProxyConfig": "the pod's proxy config where it differs from the built-in defaults, as JSON (Istio's PROXY_CONFIG)",
    "ProxyResources": "the proxy's resources: the sidecar.istio.io/proxyCPU... annotations, else the values'",
    "AnnotatedResources": "the proxy's resources from the sidecar.istio.io/proxyCPU... annotations only ({} without)",
    "ProxyImage": "sidecar.istio.io/proxyImage when it holds a '/', else values.global.proxy.image when it does, "
    "else hub/image:tag of the values",
    "StatusPort": "the agent's status port: status.sidecar.istio.io/port, else values.global.proxy.statusPort",
    "ReadinessInitialDelaySeconds": "readiness.status.sidecar.istio.io/initialDelaySeconds, else "
    "values.global.proxy.readinessInitialDelaySeconds (nothing when 0)",
    "ReadinessPeriodSeconds": "readiness.status.sidecar.istio.io/periodSeconds, else "
    "values.global.proxy.readinessPeriodSeconds (nothing when 0)",
    "ReadinessFailureThreshold": "readiness.status.sidecar.istio.io/failureThreshold, else "
    "values.global.proxy.readinessFailureThreshold (nothing when 0)",
    "ProxyMetadataEnv": "the pod's proxy config's proxyMetadata as env entries, by name (a list item: spliced in)",
    "CanonicalName": "the pod's app.kubernetes.io/name label, else its app label, else .WorkloadName (63 characters "
    "at most)",
    "CanonicalRevision": "the pod's app.kubernetes.io/version label, else its version label, else latest",
    "DefaultContainer": "the name of the pod's first container but the proxy (nothing without one)",
    "AgentArgs": "the agent's optional arguments from the values (--stsPort, --log_as_json, --outlierLogPath; "
    "a list item: spliced in)",
    "CAAddress": "values.global.caAddress, else istiod[-revision].<values.global.istioNamespace>.svc:15012",
    "ClusterID": "values.global.multiCluster.clusterName, else Kubernetes",
    "TrustDomain": "the mesh config's trustDomain, else cluster.local",
    "MeshID": "values.global.meshID, else the trust domain",
    "UserVolumes": "the volumes of the pod's sidecar.istio.io/userVolume (a list item: spliced in)",
    "UserVolumeMounts": "the mounts of the pod's sidecar.istio.io/userVolumeMount (a list item: spliced in)",
    "LogLevel": "sidecar.istio.io/logLevel, else values.global.proxy.logLevel",
    "ComponentLogLevel": "sidecar.istio.io/componentLogLevel, else values.global.proxy.componentLogLevel",
    "AgentLogLevel": "sidecar.istio.io/agentLogLevel, else values.global.logging.level",
    "Values.PATH": "a value of the values tree (Values.global.proxy.statusPort)",
    "MeshConfig.PATH": "a value of the mesh config (MeshConfig.defaultConfig.discoveryAddress)",
}
"""What ``{{ .Name }}`` may name, and what it stands for."""

CONDITIONS: Mapping[str, str] = {
    "tproxy": "the pod's interception mode is TPROXY",
    "nativeSidecar": "the proxy runs as a native sidecar (an init container with restartPolicy Always)",
    "holdApplication": "the proxy holds the app until it is ready (holdApplicationUntilProxyStarts of the pod's "
    "proxy config or values.global.proxy; a native sidecar does by itself, so never with one)",
    "statusPort": "the agent's status port is not 0",
}
"""What an overlay's ``when`` may name: the facts of a pod an overlay depends on."""

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_NAME = re.compile(r"\.([A-Za-z]+)((?:\.[A-Za-z0-9_-]+)*)")
_TREES = ("Values", "MeshConfig")


@record
class Listeners:
    outbound: int
    inbound: int


@record
class Overlay:
    """Laid over the proxy container when every condition (``CONDITIONS``) holds for the pod."""

    when: frozenset[str]
    proxy: Mapping[str, Any]


@record
class Template:
    """One sidecar: the proxy container and what goes with it."""

    name: str
    proxy: Mapping[str, Any]
    listeners: Listeners | None
    """None: the template gets no capture (a gateway, an agent without a proxy)."""
    proxy_ports: tuple[int, ...]
    """The proxy's own ports, never captured inbound (``-d``), besides the ports its container declares."""
    native_sidecar: bool
    overlays: tuple[Overlay, ...] = ()
    """In order; the ``tproxy`` field is the first, when ``tproxy``."""
    rewrite_app_probes: bool = False
    """The proxy answers the app's probes on the status port, as Istio's agent (ISTIO_KUBE_APP_PROBERS)."""
    merge_prometheus_metrics: bool = False
    """The proxy merges the app's Prometheus metrics into its own, as Istio's agent (ISTIO_PROMETHEUS_ANNOTATIONS)."""
    volumes: tuple[Mapping[str, Any], ...] = ()
    labels: Mapping[str, str] = {}
    annotations: Mapping[str, str] = {}


@record
class LabelSelector:
    match_labels: Mapping[str, str]
    match_expressions: tuple[Mapping[str, Any], ...]

    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Kubernetes' label selector: every matchLabels pair and every expression (In, NotIn, Exists,
        DoesNotExist) holds."""
        if any(labels.get(key) != value for key, value in self.match_labels.items()):
            return False
        for expression in self.match_expressions:
            key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
            present = key in labels
            if (
                (operator == "In" and not (present and labels[key] in values))
                or (operator == "NotIn" and present and labels[key] in values)
                or (operator == "Exists" and not present)
                or (operator == "DoesNotExist" and present)
            ):
                return False
        return True


@record
class InjectorConfig:
    """The ``config`` key of the injector's ConfigMap."""

    policy: str = "enabled"
    """``enabled``: pods are injected unless they opt out; ``disabled``: only pods that opt in."""
    always_inject: tuple[LabelSelector, ...] = ()
    never_inject: tuple[LabelSelector, ...] = ()
    default_templates: tuple[str, ...] = ("sidecar",)
    templates: Mapping[str, Template] = {}


def load_schema() -> Mapping[str, Any]:
    schema: Mapping[str, Any] = json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text())
    return schema


def shipped_text(name: str) -> str:
    """The text of a shipped configuration (a ConfigMap), by name."""
    return resources.files(__package__).joinpath("templates").joinpath(SHIPPED[name]).read_text()


def parse_config(tree: Any, source: str) -> InjectorConfig:
    """The injector configuration in ``tree`` (the ``config`` key's YAML, parsed). Raises ConfigError with
    one line per problem, each naming ``source`` and the field."""
    import jsonschema  # noqa: PLC0415 (only the injector's paths read a configuration)

    validator = jsonschema.Draft202012Validator(load_schema())
    problems = [
        f"{source}: {_path(error.absolute_path) or '(top level)'}: {error.message}"
        for error in sorted(validator.iter_errors(tree), key=lambda error: [str(p) for p in error.absolute_path])
    ]
    if problems:
        raise ConfigError("\n".join(problems))
    templates = {name: _template(name, body) for name, body in tree.get("templates", {}).items()}
    problems = [f"{source}: {problem}" for template in templates.values() for problem in _template_problems(template)]
    defaults = tuple(tree.get("defaultTemplates", ["sidecar"]))
    problems += [
        f"{source}: defaultTemplates: '{name}' is not one of the templates ({', '.join(sorted(templates)) or 'none'})"
        for name in defaults
        if name not in templates
    ]
    if problems:
        raise ConfigError("\n".join(problems))
    return InjectorConfig(
        policy=tree.get("policy", "enabled"),
        always_inject=tuple(_selector(item) for item in tree.get("alwaysInjectSelector", [])),
        never_inject=tuple(_selector(item) for item in tree.get("neverInjectSelector", [])),
        default_templates=defaults,
        templates=templates,
    )


def _template(name: str, body: Mapping[str, Any]) -> Template:
    listeners = body.get("listeners")
    overlays = [Overlay(frozenset({"tproxy"}), copy.deepcopy(body["tproxy"]))] if body.get("tproxy") else []
    overlays += [Overlay(frozenset(item["when"]), copy.deepcopy(item["proxy"])) for item in body.get("overlays", [])]
    return Template(
        name=name,
        proxy=copy.deepcopy(body["proxy"]),
        listeners=Listeners(outbound=listeners["outbound"], inbound=listeners["inbound"]) if listeners else None,
        proxy_ports=tuple(body.get("proxyPorts", [])),
        native_sidecar=body.get("nativeSidecar", False),
        overlays=tuple(overlays),
        rewrite_app_probes=body.get("rewriteAppProbes", False),
        merge_prometheus_metrics=body.get("mergePrometheusMetrics", False),
        volumes=tuple(copy.deepcopy(body.get("volumes", []))),
        labels=dict(body.get("labels", {})),
        annotations=dict(body.get("annotations", {})),
    )


def _selector(item: Mapping[str, Any]) -> LabelSelector:
    return LabelSelector(
        match_labels=dict(item.get("matchLabels", {})), match_expressions=tuple(item.get("matchExpressions", []))
    )


def _template_problems(template: Template) -> list[str]:
    """What the schema cannot say: placeholders that name nothing, listeners the capture cannot use."""
    where = f"templates.{template.name}"
    problems = [
        f"{where}.{path}: unknown placeholder '{{{{ {text} }}}}' (one of: "
        f"{', '.join('.' + name for name in PLACEHOLDERS)})"
        for path, text in _placeholders(
            {
                "proxy": template.proxy,
                "overlays": [dict(overlay.proxy) for overlay in template.overlays],
                "volumes": list(template.volumes),
                "annotations": template.annotations,
            }
        )
        if not _known(text)
    ]
    listeners = template.listeners
    if listeners is None:
        return problems
    if listeners.outbound == listeners.inbound:
        problems.append(
            f"{where}.listeners: outbound and inbound are both {listeners.outbound}: "
            "the proxy could not tell a captured connection's direction"
        )
    for port in sorted(
        {listeners.outbound, listeners.inbound} & {*template.proxy_ports, *declared_ports(template.proxy)}
    ):
        problems.append(
            f"{where}.proxyPorts: {port} is a redirect listener: excluding it from inbound capture "
            "would let connections to it bypass the proxy"
        )
    return problems


def declared_ports(proxy: Mapping[str, Any]) -> list[int]:
    """The ports a proxy's container declares (``ports[].containerPort``), placeholders left out."""
    return [
        port["containerPort"]
        for port in proxy.get("ports") or []
        if isinstance(port, Mapping) and isinstance(port.get("containerPort"), int)
    ]


def _known(text: str) -> bool:
    match = _NAME.fullmatch(text)
    if not match:
        return False
    name, path = match.groups()
    return (name in _TREES and bool(path)) or (name in PLACEHOLDERS and not path)


def _placeholders(tree: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(tree, Mapping):
        return [found for key, value in tree.items() for found in _placeholders(value, _join(path, str(key)))]
    if isinstance(tree, list):
        return [found for index, item in enumerate(tree) for found in _placeholders(item, f"{path}[{index}]")]
    if isinstance(tree, str):
        return [(path, match.group(1)) for match in _PLACEHOLDER.finditer(tree)]
    return []


def substitute(tree: Any, values: Mapping[str, Any], trees: Mapping[str, Any]) -> Any:
    """``tree`` with every placeholder replaced: ``values`` by name, ``Values.…``/``MeshConfig.…`` looked up in
    ``trees``. A string that is one placeholder takes the value's type (a number stays a number, a map a map);
    one that stands for nothing (null, "") removes its key or list item, and a list item standing for a list
    is spliced in."""
    result = _substituted(tree, values, trees)
    return None if result is _NOTHING else result


_NOTHING = object()
"""What a whole placeholder standing for nothing becomes: its key or list item is left out."""


def _substituted(tree: Any, values: Mapping[str, Any], trees: Mapping[str, Any]) -> Any:
    if isinstance(tree, Mapping):
        items = ((key, _substituted(value, values, trees)) for key, value in tree.items())
        return {key: value for key, value in items if value is not _NOTHING}
    if isinstance(tree, list):
        result = []
        for item in tree:
            value = _substituted(item, values, trees)
            if isinstance(item, str) and isinstance(value, list):
                result += value  # a placeholder standing for list items
            elif value is not _NOTHING:
                result.append(value)
        return result
    if not isinstance(tree, str) or "{{" not in tree:
        return tree
    whole = _PLACEHOLDER.fullmatch(tree)
    if whole:
        value = _value(whole.group(1), values, trees)
        if value is None or value == "":
            return _NOTHING
        return copy.deepcopy(value) if isinstance(value, (int, float, str, Mapping, list)) else _text(value)
    return _PLACEHOLDER.sub(lambda match: _text(_value(match.group(1), values, trees)), tree)


def _value(text: str, values: Mapping[str, Any], trees: Mapping[str, Any]) -> Any:
    match = _NAME.fullmatch(text)
    assert match is not None  # parse_config refused any other placeholder
    name, path = match.groups()
    if name in _TREES:
        node = trees[name]
        for key in path.split(".")[1:]:
            node = node.get(key) if isinstance(node, Mapping) else None
        return node
    return values[name]


def _text(value: Any) -> str:
    """A value inside a string, as Go's template prints a scalar (true, 15020, empty for nil)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _path(parts: Sequence[Any]) -> str:
    text = ""
    for part in parts:
        text = f"{text}[{part}]" if isinstance(part, int) else _join(text, str(part))
    return text


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
