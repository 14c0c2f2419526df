"""What Istio's injector does in code, past its template, for the agent its proxy runs (pilot-agent): the app
containers' probes answered by the agent on its status port (``pkg/kube/inject/app_probe.go``:
``ISTIO_KUBE_APP_PROBERS`` on the proxy, the probes rewritten to ``/app-health/<container>/<readyz|livez|
startupz>``), and the app's Prometheus metrics merged into the agent's (``applyPrometheusMerge``:
``ISTIO_PROMETHEUS_ANNOTATIONS`` on the proxy, the pod's ``prometheus.io`` annotations pointed at the agent).
A template asks for them (``rewriteAppProbes``, ``mergePrometheusMetrics``): a proxy that is not Istio's agent
answers neither. Pure: a pod spec in, a changed copy out.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from istio_iptables.capture.config import parse_go_bool
from istio_iptables.kube.settings import Settings

PROXY_CONTAINER = "istio-proxy"
REWRITE_APP_PROBERS = "sidecar.istio.io/rewriteAppHTTPProbers"
STATUS_PORT = "status.sidecar.istio.io/port"
MERGE_METRICS = "prometheus.istio.io/merge-metrics"
SCRAPE_TARGETS = "prometheus.istio.io/scrape-targets"
PROMETHEUS_SCRAPE = "prometheus.io/scrape"
PROMETHEUS_PORT = "prometheus.io/port"
PROMETHEUS_PATH = "prometheus.io/path"
APP_PROBERS_ENV = "ISTIO_KUBE_APP_PROBERS"
PROMETHEUS_ENV = "ISTIO_PROMETHEUS_ANNOTATIONS"
AGENT_METRICS_PATH = "/stats/prometheus"
DEFAULT_STATUS_PORT = 15020

_PROBES = (("readinessProbe", "readyz"), ("livenessProbe", "livez"), ("startupProbe", "startupz"))
_HOOKS = (("preStop", "prestopz"), ("postStart", "poststartz"))
_ACTION_FIELDS = {
    "httpGet": ("path", "port", "host", "scheme", "httpHeaders"),
    "tcpSocket": ("port", "host"),
    "grpc": ("port", "service"),
}
"""Each action's fields in the order of Kubernetes' Go structs, as Istio's JSON writes them."""


def mesh_status_port(settings: Settings) -> int:
    """The mesh config's ``defaultConfig.statusPort``: where Istio's code (not its template) expects the agent."""
    port = settings.mesh_value("defaultConfig.statusPort")
    return port if isinstance(port, int) and not isinstance(port, bool) else DEFAULT_STATUS_PORT


def go_bool(text: str | None) -> bool | None:
    """Go's ``strconv.ParseBool``, None for anything else (Istio then keeps its default)."""
    if text is None:
        return None
    try:
        return parse_go_bool(text)
    except ValueError:
        return None


def rewrites_probes(annotations: Mapping[str, str], settings: Settings) -> bool:
    """Whether the app's probes go to the agent: the pod's ``sidecar.istio.io/rewriteAppHTTPProbers``, else
    ``values.sidecarInjectorWebhook.rewriteAppHTTPProbe`` (true)."""
    asked = go_bool(annotations.get(REWRITE_APP_PROBERS))
    return asked if asked is not None else settings.value("sidecarInjectorWebhook.rewriteAppHTTPProbe") is not False


def rewrite_app_probes(
    spec: dict[str, Any], proxy: dict[str, Any], annotations: Mapping[str, str], settings: Settings
) -> None:
    """The app containers' probes and lifecycle hooks, in ``ISTIO_KUBE_APP_PROBERS`` on ``proxy``, rewritten to
    the agent's status port (``status.sidecar.istio.io/port``, else the mesh config's), in place."""
    probers = app_probers(spec, mesh_status_port(settings))
    env = list(proxy.get("env") or [])
    at = next(
        (i for i, item in enumerate(env) if isinstance(item, Mapping) and item.get("name") == APP_PROBERS_ENV), None
    )
    if at is not None:
        # The user's istio-proxy brings probers already (an injected pod's, as Istio merges them when it injects
        # a pod again): theirs win, and the variable stays one.
        try:
            given = json.loads(str(env[at].get("value") or "{}"))
        except ValueError:
            given = None
        if isinstance(given, dict):
            env[at] = {"name": APP_PROBERS_ENV, "value": go_json(dict(sorted({**probers, **given}.items())))}
    elif probers:
        env.append({"name": APP_PROBERS_ENV, "value": go_json(probers)})
    if env:
        proxy["env"] = env
    port_text = annotations.get(STATUS_PORT)
    port = int(port_text) if port_text is not None and port_text.strip().isdigit() else mesh_status_port(settings)
    for key in ("initContainers", "containers"):
        containers = spec.get(key)
        if not isinstance(containers, list):
            continue
        spec[key] = [_rewritten_container(container, port) for container in containers]


def app_probers(spec: Mapping[str, Any], agent_port: int) -> dict[str, Any]:
    """Istio's ``DumpAppProbers``: each app container's probes (HTTP, TCP, gRPC) and lifecycle hooks (HTTP,
    TCP), by the agent's path for them, named ports resolved; those already on the agent's port are left out."""
    found: dict[str, Any] = {}
    for container in _app_containers(spec):
        name = container.get("name")
        named = {
            port["name"]: port.get("containerPort")
            for port in container.get("ports") or []
            if isinstance(port, Mapping) and port.get("name")
        }
        for field, suffix in _PROBES:
            prober = _prober(container.get(field), named, agent_port, probe=True)
            if prober is not None:
                found[f"/app-health/{name}/{suffix}"] = prober
        lifecycle = container.get("lifecycle")
        hooks = lifecycle if isinstance(lifecycle, Mapping) else {}
        for field, suffix in _HOOKS:
            prober = _prober(hooks.get(field), named, agent_port, probe=False)
            if prober is not None:
                found[f"/app-lifecycle/{name}/{suffix}"] = prober
    return dict(sorted(found.items()))


def _app_containers(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [
        container
        for key in ("initContainers", "containers")
        for container in spec.get(key) or []
        if isinstance(container, Mapping) and container.get("name") != PROXY_CONTAINER
    ]


def _prober(handler: Any, named: Mapping[str, Any], agent_port: int, *, probe: bool) -> dict[str, Any] | None:
    if not isinstance(handler, Mapping):
        return None
    kinds = ("httpGet", "tcpSocket", "grpc") if probe else ("httpGet", "tcpSocket")
    kind = next((kind for kind in kinds if handler.get(kind) is not None), None)
    if kind is None or not isinstance(handler[kind], Mapping):
        return None
    action = handler[kind]
    port = action.get("port")
    if kind != "grpc":  # a gRPC port is a number, never a name
        if isinstance(port, str):
            if port not in named:
                return None
            port = named[port]
        elif port == agent_port:
            return None  # rewritten already
    fields = {
        field: port if field == "port" else action.get(field)
        for field in _ACTION_FIELDS[kind]
        if field == "port" or (kind == "grpc" and field == "service") or action.get(field) not in (None, "", [])
    }
    prober: dict[str, Any] = {kind: fields}
    if probe and handler.get("timeoutSeconds"):
        prober["timeoutSeconds"] = handler["timeoutSeconds"]
    return prober


def _rewritten_container(container: Any, port: int) -> Any:
    """Istio's ``patchRewriteProbe`` for one container: each probe and hook it rewrites aimed at the agent."""
    if not isinstance(container, Mapping) or container.get("name") == PROXY_CONTAINER:
        return container
    name = container.get("name")
    changed = dict(container)
    for field, suffix in _PROBES:
        if (handler := _rewritten(container.get(field), f"/app-health/{name}/{suffix}", port, probe=True)) is not None:
            changed[field] = handler
    lifecycle = container.get("lifecycle")
    if isinstance(lifecycle, Mapping):
        hooks = dict(lifecycle)
        for field, suffix in _HOOKS:
            path = f"/app-lifecycle/{name}/{suffix}"
            if (handler := _rewritten(lifecycle.get(field), path, port, probe=False)) is not None:
                hooks[field] = handler
        changed["lifecycle"] = hooks
    return changed


def _rewritten(handler: Any, path: str, port: int, *, probe: bool) -> dict[str, Any] | None:
    """An HTTP handler aimed at the agent's ``path`` and ``port`` (HTTPS becomes HTTP: the agent makes the
    HTTPS request); a TCP (or a probe's gRPC) handler becomes an HTTP one there, which the agent checks."""
    if not isinstance(handler, Mapping):
        return None
    result = copy.deepcopy(dict(handler))
    if isinstance(handler.get("httpGet"), Mapping):
        action = dict(result["httpGet"])
        action.update(port=port, path=path)
        if action.get("scheme") == "HTTPS":
            action["scheme"] = "HTTP"
        result["httpGet"] = action
        return result
    for kind in ("tcpSocket", "grpc") if probe else ("tcpSocket",):
        if handler.get(kind) is not None:
            del result[kind]
            result["httpGet"] = {"path": path, "port": port}
            return result
    return None


def merge_prometheus(annotations: dict[str, str], proxy: dict[str, Any], settings: Settings) -> None:
    """Istio's ``applyPrometheusMerge``, in place: the app's scrape settings (``prometheus.io/scrape``, ``path``,
    ``port``, ``prometheus.istio.io/scrape-targets``) in ``ISTIO_PROMETHEUS_ANNOTATIONS`` on ``proxy``, and the
    pod's ``prometheus.io`` annotations aimed at the agent, which serves the app's metrics merged with its own.
    Nothing when the mesh (``enablePrometheusMerge``) or the pod (``prometheus.istio.io/merge-metrics``) turns it
    off, when the pod asks not to be scraped, or when its port is the agent's already."""
    if settings.mesh_value("enablePrometheusMerge") is False or go_bool(annotations.get(MERGE_METRICS)) is False:
        return
    agent_port = str(mesh_status_port(settings))
    scrape = annotations.get(PROMETHEUS_SCRAPE, "")
    if annotations.get(PROMETHEUS_PORT) == agent_port or scrape == "false":
        return
    targets = [
        {"port": port.strip(), **({"path": path.strip()} if path.strip() else {})}
        for port, _, path in (item.partition(":") for item in annotations.get(SCRAPE_TARGETS, "").split(","))
        if port.strip()
    ]
    first = targets[0] if targets else {}
    scraping = {
        "scrape": scrape,
        "path": annotations.get(PROMETHEUS_PATH) or first.get("path", ""),
        "port": annotations.get(PROMETHEUS_PORT) or first.get("port", ""),
        "targets": targets,
    }
    scraping = {key: value for key, value in scraping.items() if value}
    if scraping:
        proxy["env"] = [*(proxy.get("env") or []), {"name": PROMETHEUS_ENV, "value": go_json(scraping)}]
    annotations.update({PROMETHEUS_SCRAPE: "true", PROMETHEUS_PORT: agent_port, PROMETHEUS_PATH: AGENT_METRICS_PATH})


def go_json(value: Any) -> str:
    """JSON as Go's ``encoding/json`` writes it: compact, UTF-8, and <, >, &, U+2028, U+2029 escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text
