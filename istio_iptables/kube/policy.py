"""Which pods are injected, and why: Istio's decision (``pkg/kube/inject/inject.go``, ``injectRequired``, and
the webhook's namespace selectors), in one function. docs/injection.md publishes it as a truth table, and a
test runs every row of that table through ``decide``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from istio_iptables.kube.template import InjectorConfig
from istio_iptables.records import record

INJECT = "sidecar.istio.io/inject"
SIDECAR_STATUS = "sidecar.istio.io/status"
NAMESPACE_LABEL = "istio-injection"
IGNORED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "local-path-storage"})
"""Namespaces Istio never injects (``inject.IgnoredNamespaces``)."""
YES = ("y", "yes", "true", "on")


@record
class Decision:
    inject: bool
    reason: str
    """One phrase: why the pod is (or is not) injected."""


@record
class PodFacts:
    """What the decision reads of a pod and its namespace."""

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    host_network: bool = False
    namespace: str = "default"
    namespace_labels: Mapping[str, str] | None = None
    """The namespace's labels, or None where the caller cannot see them: the webhook (the API server's
    namespaceSelector already chose) and ``inject`` without ``--namespace-labels``."""


def decide(pod: PodFacts, config: InjectorConfig) -> Decision:
    """Whether Istio's injector would inject ``pod``, and why, in Istio's order: the node's network, the
    system namespaces, an earlier injection, the namespace label, the pod's own label or annotation, the
    never- then always-inject selectors, and the policy."""
    if pod.host_network:
        return Decision(False, "hostNetwork: true (the pod shares the node's network namespace)")
    if pod.namespace in IGNORED_NAMESPACES:
        return Decision(False, f"namespace {pod.namespace} is a system namespace, never injected")
    if SIDECAR_STATUS in pod.annotations:
        return Decision(False, f"already injected ({SIDECAR_STATUS} is set)")
    # The label is the newer API and wins over the annotation. Only y/yes/true/on (any case) ask for
    # injection; any other non-empty value, "enabled" included (istio#33618), refuses it.
    if INJECT in pod.labels:
        asked, where = pod.labels[INJECT], f"label {INJECT}"
    else:
        asked, where = pod.annotations.get(INJECT, ""), f"annotation {INJECT}"
    requested = asked.lower() in YES
    if pod.namespace_labels is not None:
        namespace_value = pod.namespace_labels.get(NAMESPACE_LABEL)
        if namespace_value == "disabled":
            return Decision(False, f"namespace label {NAMESPACE_LABEL}=disabled")
        # Istio's webhook is called for a labelled namespace, or for a pod that opts in by label.
        if namespace_value != "enabled" and not (INJECT in pod.labels and requested):
            return Decision(
                False, f"namespace not labelled {NAMESPACE_LABEL}=enabled and no label {INJECT}=true on the pod"
            )
    if asked:
        if requested:
            return Decision(True, f"{where}={asked}")
        return Decision(False, f"{where}={asked} (only y, yes, true, on ask for injection)")
    for selector in config.never_inject:
        if not selector.empty() and selector.matches(pod.labels):
            return Decision(False, "the pod's labels match neverInjectSelector")
    for selector in config.always_inject:
        if not selector.empty() and selector.matches(pod.labels):
            return Decision(True, "the pod's labels match alwaysInjectSelector")
    if config.policy == "enabled":
        return Decision(True, "policy enabled and the pod does not opt out")
    return Decision(False, "policy disabled and the pod does not opt in")


def chosen_templates(annotations: Mapping[str, str], config: InjectorConfig) -> Sequence[str]:
    """The templates the pod asks for (``inject.istio.io/templates``), else the configuration's defaults."""
    named = annotations.get("inject.istio.io/templates")
    if named is None:
        return config.default_templates
    return [name.strip() for name in named.split(",") if name.strip()]


def string_map(value: Any) -> dict[str, str]:
    """Labels or annotations as strings (a YAML label ``true`` is the string "true" to Kubernetes)."""
    if not isinstance(value, Mapping):
        return {}
    return {
        str(key): "true" if item is True else "false" if item is False else str(item) for key, item in value.items()
    }
