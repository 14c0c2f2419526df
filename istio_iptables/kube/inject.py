"""Injection: a workload's pod template in, the same with the capture's init container and annotations out,
as Istio's injector (``istioctl kube-inject`` and the webhook) makes them. Pure: documents in, documents out.

The capture: the ``istio-init`` container (``istio-validation`` when a CNI plugin captures) and the pod
annotations that carry the capture settings. The proxy: the ``istio-proxy`` container of the injector
configuration's template (its overlays laid as the pod's conditions ask, the user's own ``istio-proxy`` over
it), with the capture derived from it, and what Istio's injector does for its agent in code (``agent.py``).
Without a configuration, a user's ``istio-proxy`` is left as it is, and its ``runAsUser`` is the UID the
rules exempt.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from istio_iptables.errors import ConfigError
from istio_iptables.kube import capture, pilot_agent
from istio_iptables.kube.capture import InjectionError, Sidecar, init_args
from istio_iptables.kube.pilot_agent import PROXY_CONTAINER
from istio_iptables.kube.policy import SIDECAR_STATUS, PodFacts, chosen_templates, decide, string_map
from istio_iptables.kube.quantity import canonical_quantity
from istio_iptables.kube.settings import DEFAULT_MESH, Settings, go_text
from istio_iptables.kube.template import InjectorConfig, Template, declared_ports, substitute
from istio_iptables.records import record

DEFAULT_IMAGE = "istio-iptables:0.1.0"
"""This project's image, as the Dockerfile tags it."""

INIT_CONTAINER = "istio-init"
VALIDATION_CONTAINER = "istio-validation"

TEMPLATES = "inject.istio.io/templates"
NATIVE_SIDECAR = "sidecar.istio.io/nativeSidecar"
MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"
MULTUS_NETWORK = "default/istio-cni"
PROXY_IMAGE = "sidecar.istio.io/proxyImage"
PROXY_LOG_LEVEL = "sidecar.istio.io/logLevel"
PROXY_COMPONENT_LOG_LEVEL = "sidecar.istio.io/componentLogLevel"
WORKLOAD_NAME_LABEL = "service.istio.io/workload-name"
USER_VOLUME = "sidecar.istio.io/userVolume"
USER_VOLUME_MOUNT = "sidecar.istio.io/userVolumeMount"
RESOURCE_ANNOTATIONS = (
    ("requests", "cpu", "sidecar.istio.io/proxyCPU"),
    ("requests", "memory", "sidecar.istio.io/proxyMemory"),
    ("limits", "cpu", "sidecar.istio.io/proxyCPULimit"),
    ("limits", "memory", "sidecar.istio.io/proxyMemoryLimit"),
)

CAPTURE_TEMPLATE = "sidecar"
"""The only one of Istio's injection templates with an init container; the others (gateway, grpc-agent, ...)
leave capture alone. A name we do not know is taken for a custom template of the mesh's injector
configuration, which this injector does not see: it gets no capture unless ``sidecar`` is named too."""

HARDENED_USER = 65532
"""The image's non-root user (Dockerfile)."""
LOCK_VOLUME = "istio-iptables-lock"
LOCK_DIRECTORY = "/run/istio-iptables"
"""Where the image's XTABLES_LOCKFILE lives: on a read-only root it needs a writable emptyDir."""

WORKLOAD_GROUPS: Mapping[str, frozenset[str]] = {
    "Pod": frozenset({""}),
    "ReplicationController": frozenset({""}),
    "Deployment": frozenset({"apps", "extensions"}),
    "ReplicaSet": frozenset({"apps", "extensions"}),
    "DaemonSet": frozenset({"apps", "extensions"}),
    "StatefulSet": frozenset({"apps"}),
    "Job": frozenset({"batch"}),
    "CronJob": frozenset({"batch"}),
    "DeploymentConfig": frozenset({"apps.openshift.io", ""}),  # OpenShift's, and its legacy v1
}
"""The kinds that hold a pod, and their API groups: a custom resource that reuses a name is not one."""


@record
class Injector:
    settings: Settings
    image: str = DEFAULT_IMAGE
    hardened: bool = False
    """Our init container instead of Istio's root one: non-root, read-only root filesystem, same capabilities."""
    config: InjectorConfig | None = None
    """The injector's configuration (which pods, which proxy); None: the capture alone, for pods that bring
    their own proxy (or with ``capture_only``), every pod Istio would inject."""
    capture_only: bool = False
    """Inject the capture into pods that get no proxy (asked for: their traffic goes where nothing listens
    until a proxy is added some other way)."""
    namespace_labels: Mapping[str, str] | None = None
    """The namespace's labels, when known (``inject --namespace-labels``); the webhook's are chosen by the API
    server's namespaceSelector."""


@record
class Outcome:
    """A pod after injection (equal to the input when it is not injected), and why."""

    pod: dict[str, Any]
    reason: str


def inject_pod(pod: Mapping[str, Any], injector: Injector, *, workload: str, namespace: str = "") -> dict[str, Any]:
    """The pod (or pod template: ``metadata`` + ``spec``) after injection, as a new object; equal to the input
    when Istio would skip it. ``workload`` (e.g. ``Deployment default/app``) is named in errors; ``namespace``
    is the workload's, for Istio's never-injected system namespaces."""
    return injected_pod(pod, injector, workload=workload, namespace=namespace).pod


def injected_pod(
    pod: Mapping[str, Any],
    injector: Injector,
    *,
    workload: str,
    namespace: str = "",
    owner: Owner | None = None,
) -> Outcome:
    """``inject_pod`` with the reason it was or was not injected. ``owner`` is the workload the pod belongs to,
    for the template's ``.WorkloadName`` and ``.Owner`` (by default the pod's controller, or the pod)."""
    metadata = dict(_mapping(pod.get("metadata"), "metadata", workload))
    spec = dict(_mapping(pod.get("spec"), "spec", workload))
    annotations = dict(_mapping(metadata.get("annotations"), "metadata.annotations", workload))
    labels = _mapping(metadata.get("labels"), "metadata.labels", workload)
    _check_strings(annotations, workload)
    settings = injector.settings
    unchanged = copy.deepcopy(dict(pod))
    namespace = namespace or go_text(metadata.get("namespace")) or "default"
    config = injector.config or _capture_config(settings)
    facts = PodFacts(
        labels=string_map(labels),
        annotations=annotations,
        host_network=spec.get("hostNetwork") is True,
        namespace=namespace,
        namespace_labels=injector.namespace_labels,
    )
    decision = decide(facts, config)
    if not decision.inject:
        return Outcome(unchanged, f"not injected: {decision.reason}")
    names = chosen_templates(annotations, config)
    if injector.config is None:
        # No configuration: Istio's own template names; only "sidecar" has the capture.
        if CAPTURE_TEMPLATE not in names:
            return Outcome(unchanged, f"not injected: templates {', '.join(names)} have no capture")
        template = None
    else:
        ours = [name for name in names if name in injector.config.templates]
        if not ours:
            return Outcome(unchanged, f"not injected: no template of the injector config among {', '.join(names)}")
        template = injector.config.templates[ours[0]]
    try:
        mode = capture.interception_mode(annotations, settings)
        user_proxy = _find(spec, PROXY_CONTAINER)
        _security_context(user_proxy, workload)
        if template is None and user_proxy is None and not injector.capture_only and mode != "NONE":
            raise InjectionError(
                "the pod gets no proxy (no template in the injector config, no istio-proxy container in the pod): "
                "its captured traffic would go to ports where nothing listens (--injector-config FILE gives it "
                "one; --capture-only injects the capture alone)"
            )
        proxy = None
        native = template is not None and _native(annotations, template)
        if template is not None:
            values = _placeholder_values(pod, spec, annotations, settings, mode, template, namespace, owner)
            conditions = _conditions(annotations, settings, mode, native)
            overrides = {key: value for key, value in (user_proxy or {}).items() if (key, value) != ("image", "auto")}
            proxy = _strategic_merge(_rendered_proxy(template, conditions, values, settings), overrides)
        captures = template is None or template.listeners is not None
        sidecar = _sidecar(template, proxy) if template is not None and proxy is not None and captures else None
        if sidecar is not None:
            _check_apps(spec, proxy or {}, workload)
        if mode == "NONE" or not captures:
            container = None
        else:
            context = proxy.get("securityContext") if proxy is not None else _security_context(user_proxy, workload)
            container = _init_container(annotations, settings, mode, context or {}, injector, sidecar)
    except InjectionError as error:
        raise InjectionError(f"{workload}: {error}") from None
    if container is None and proxy is None:
        return Outcome(unchanged, "not injected: interception mode NONE asks for no capture")
    spec = copy.deepcopy(spec)
    added_volumes: list[str] = []
    if template is not None and proxy is not None:
        # What Istio's injector does in code for its agent, after the template (and the user's proxy) are laid.
        if template.merge_prometheus_metrics:
            pilot_agent.merge_prometheus(annotations, proxy, settings)
        if template.rewrite_app_probes and pilot_agent.rewrites_probes(annotations, settings):
            pilot_agent.rewrite_app_probes(spec, proxy, annotations, settings)
    init_containers = _list(spec, "initContainers", workload)
    if proxy is not None:
        others = [c for c in init_containers if not (isinstance(c, Mapping) and c.get("name") == PROXY_CONTAINER)]
        containers = [
            c
            for c in _list(spec, "containers", workload)
            if not (isinstance(c, Mapping) and c.get("name") == PROXY_CONTAINER)
        ]
        if native:
            init_containers = [{**proxy, "restartPolicy": "Always"}, *others]
        else:
            init_containers = others
            # Last, so that kubectl's commands default to the app; first when it holds the app until it is ready.
            first = _holds_application(annotations, settings)[1]
            containers = [proxy, *containers] if first else [*containers, proxy]
        spec["containers"] = containers
        added_volumes = _add_volumes(spec, template, values, settings, workload)  # type: ignore[arg-type]
    if container is not None:
        name = container["name"]
        user = next((c for c in init_containers if isinstance(c, Mapping) and c.get("name") == name), None)
        if user is not None:
            container = _strategic_merge(
                container, {k: v for k, v in user.items() if not (k == "image" and v == "auto")}
            )
        others = [c for c in init_containers if not (isinstance(c, Mapping) and c.get("name") == name)]
        # Istio's order: the validation probe first, to block everything until the CNI plugin has captured;
        # the init container last, so other init containers reach the network uncaptured, unless the proxy
        # runs as a native sidecar (an init container itself), which must start after the capture.
        first = name == VALIDATION_CONTAINER or native or _native_sidecar(annotations, others)
        init_containers = [container, *others] if first else [*others, container]
        if injector.hardened and name == INIT_CONTAINER:
            volumes = _list(spec, "volumes", workload)
            if not any(isinstance(v, Mapping) and v.get("name") == LOCK_VOLUME for v in volumes):
                volumes.append({"name": LOCK_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
            spec["volumes"] = volumes
            added_volumes.append(LOCK_VOLUME)
    spec["initContainers"] = init_containers
    if container is not None and settings.cni:
        annotations.update(cni_annotations(annotations, settings))
        annotations.update(recorded_proxy_uid(container["args"]))
        annotations.update(recorded_proxy_ports(sidecar))
    new_labels = dict(labels)
    if template is not None:
        for key, value in substitute(dict(template.labels), values, _trees(settings)).items():
            new_labels.setdefault(key, value)
        for key, value in substitute(dict(template.annotations), values, _trees(settings)).items():
            annotations.setdefault(key, value)
    status: dict[str, Any] = {
        "initContainers": [c["name"] for c in (container, proxy if native else None) if c is not None] or None,
        "containers": [PROXY_CONTAINER] if proxy is not None and not native else None,
        "volumes": added_volumes or None,
        "imagePullSecrets": None,
        "revision": "default",
    }
    if proxy is None and user_proxy is None:
        status["captureOnly"] = True
    annotations[SIDECAR_STATUS] = json.dumps(status, separators=(",", ":"))
    new_metadata = {**copy.deepcopy(metadata), "annotations": annotations}
    if new_labels != labels:
        new_metadata["labels"] = new_labels
    what = (
        f"the capture and the proxy of template {template.name}"
        if template is not None and container is not None
        else f"the proxy of template {template.name} (a template without listeners: no capture)"
        if template is not None and template.listeners is None
        else f"the proxy of template {template.name} (interception mode NONE: no capture)"
        if template is not None
        else "the capture, for the pod's own istio-proxy container"
        if user_proxy is not None
        else "the capture only (--capture-only: no proxy)"
    )
    return Outcome({**unchanged, "metadata": new_metadata, "spec": spec}, f"injected {what}: {decision.reason}")


def cni_annotations(annotations: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """The capture settings Istio writes on the pod in CNI mode, for the CNI plugin to read."""
    written: dict[str, str] = {}

    def pick(annotation: str, path: str) -> str:
        return annotations[annotation] if annotation in annotations else settings.text(path)

    if _multus(settings):
        written[MULTUS_NETWORKS] = append_multus_network(annotations.get(MULTUS_NETWORKS, ""), MULTUS_NETWORK)
    written[capture.INTERCEPTION_MODE] = capture.interception_mode(annotations, settings)
    for annotation, path in (
        (capture.INCLUDE_OUTBOUND_IP_RANGES, "global.proxy.includeIPRanges"),
        (capture.EXCLUDE_OUTBOUND_IP_RANGES, "global.proxy.excludeIPRanges"),
    ):
        if value := pick(annotation, path):
            written[annotation] = value
    written[capture.INCLUDE_INBOUND_PORTS] = pick(capture.INCLUDE_INBOUND_PORTS, "global.proxy.includeInboundPorts")
    written[capture.EXCLUDE_INBOUND_PORTS] = capture.exclude_inbound_port(
        pick(capture.STATUS_PORT, "global.proxy.statusPort"),
        pick(capture.EXCLUDE_INBOUND_PORTS, "global.proxy.excludeInboundPorts"),
    )
    for annotation, path in (
        (capture.INCLUDE_OUTBOUND_PORTS, "global.proxy.includeOutboundPorts"),
        (capture.EXCLUDE_OUTBOUND_PORTS, "global.proxy.excludeOutboundPorts"),
    ):
        if annotation in annotations or settings.text(path):
            written[annotation] = pick(annotation, path)
    for annotation in (capture.KUBEVIRT_INTERFACES, capture.REROUTE_VIRTUAL_INTERFACES, capture.EXCLUDE_INTERFACES):
        if annotations.get(annotation):
            written[annotation] = annotations[annotation]
    return written


def recorded_proxy_uid(args: object) -> dict[str, str]:
    """CNI mode: the init argv's ``-u`` when it is not the default, as the annotation the plugin reads back
    (``capture.RECORDED_PROXY_UID``): the proxy's UID is in its container's securityContext, which a runtime
    does not hand a CNI plugin."""
    uid = str(capture.DEFAULT_PROXY_UID)
    if isinstance(args, list) and "-u" in args[:-1]:  # the user's init container may have replaced the args
        uid = str(args[args.index("-u") + 1])
    return {} if uid == str(capture.DEFAULT_PROXY_UID) else {capture.RECORDED_PROXY_UID: uid}


def recorded_proxy_ports(sidecar: Sidecar | None) -> dict[str, str]:
    """CNI mode: the ports the capture takes from the template's proxy (``-p``, ``-z``, the start of ``-d``),
    as the annotation the plugin reads back (``capture.RECORDED_PROXY_PORTS``), when they are not Istio's: the
    template and the proxy's container are not handed to a CNI plugin."""
    if sidecar is None:
        return {}
    istio = (*capture.DEFAULT_LISTENERS, capture.ALWAYS_EXCLUDED_INBOUND)
    if (sidecar.outbound, sidecar.inbound, ",".join(map(str, sidecar.own_ports))) == istio:
        return {}
    return {capture.RECORDED_PROXY_PORTS: capture.recorded_ports_text(sidecar)}


def append_multus_network(existing: str, network: str) -> str:
    """Istio's ``appendMultusNetwork``: ``network`` (``namespace/name``) added to a comma list or a JSON list
    of Multus networks, unless already there."""
    namespace, _, name = network.rpartition("/")
    if not existing:
        return network
    end = existing.rfind("]")
    if end != -1:
        try:
            networks = json.loads(existing)
        except ValueError:
            return existing  # not JSON after all: Istio leaves it alone
        if any(isinstance(n, Mapping) and n.get("name") == name for n in networks if isinstance(networks, list)):
            return existing
        entry = json.dumps({"name": name, "namespace": namespace}, separators=(", ", ": "))
        return f"{existing[:end]}, {entry}{existing[end:]}"
    if any(item.strip() in (network, name) for item in existing.split(",")):
        return existing
    return f"{existing}, {network}"


def inject_documents(documents: Iterable[Any], injector: Injector) -> list[Any]:
    """Every workload of the documents (and of ``kind: List`` items) injected; other objects unchanged."""
    return explained_documents(documents, injector)[0]


def explained_documents(documents: Iterable[Any], injector: Injector) -> tuple[list[Any], list[str]]:
    """``inject_documents``, and one line per workload saying why it was or was not injected."""
    reasons: list[str] = []
    return [_inject_object(document, injector, reasons) for document in documents], reasons


_POD_PATHS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Pod": (("metadata",), ("spec",)),
    **{
        kind: (("spec", "template", "metadata"), ("spec", "template", "spec"))
        for kind in WORKLOAD_GROUPS
        if kind not in ("Pod", "CronJob")
    },
    # Istio's quirk, kept: for a CronJob it reads and writes the job template's metadata
    # (spec.jobTemplate.metadata), not the pod template's (its golden shows the status annotation there).
    "CronJob": (("spec", "jobTemplate", "metadata"), ("spec", "jobTemplate", "spec", "template", "spec")),
}
"""Where each kind that holds a pod keeps the metadata Istio reads and writes, and the pod spec."""


def _inject_object(document: Any, injector: Injector, reasons: list[str]) -> Any:
    if not isinstance(document, Mapping):
        return document
    kind = document.get("kind")
    if kind == "List" and isinstance(document.get("items"), list):
        return {**document, "items": [_inject_object(item, injector, reasons) for item in document["items"]]}
    paths = pod_paths(document)
    if paths is None:
        return copy.deepcopy(document)
    metadata = document.get("metadata")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    namespace = go_text(metadata.get("namespace"))
    workload = f"{kind} {namespace or 'default'}/{go_text(metadata.get('name') or metadata.get('generateName'))}"
    metadata_path, spec_path = paths
    pod = {"metadata": _at(document, metadata_path), "spec": _at(document, spec_path)}
    pod = {key: {} if value is None else value for key, value in pod.items()}
    outcome = injected_pod(pod, injector, workload=workload, namespace=namespace, owner=owner_of(document))
    reasons.append(f"{workload}: {outcome.reason}")
    injected = outcome.pod
    result = copy.deepcopy(dict(document))
    if injected != pod:
        for path, key in zip(paths, ("metadata", "spec"), strict=True):
            _put(result, path, injected[key])
    return result


def pod_paths(document: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The paths of the metadata Istio reads and writes and of the pod spec, for an object holding a pod."""
    kind, api_version = document.get("kind"), document.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api_version, str) or kind not in WORKLOAD_GROUPS:
        return None
    group, _, version = api_version.rpartition("/")
    paths = _POD_PATHS[kind]
    if not version or group not in WORKLOAD_GROUPS[kind] or not isinstance(_at(document, paths[1][:-1]), Mapping):
        return None
    return paths


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, Mapping) else None
    return tree


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        child = tree.get(key)
        tree[key] = child = dict(child) if isinstance(child, Mapping) else {}
        tree = child
    tree[path[-1]] = value


@record
class Owner:
    """The workload a pod belongs to, as the template's ``.WorkloadName`` and ``.Owner`` name it."""

    api_version: str
    kind: str
    name: str


def _capture_config(settings: Settings) -> InjectorConfig:
    """Without an injector configuration: Istio's default templates, as its values name them."""
    defaults = settings.value("sidecarInjectorWebhook.defaultTemplates")
    names = [go_text(name) for name in defaults] if isinstance(defaults, list) and defaults else [CAPTURE_TEMPLATE]
    return InjectorConfig(default_templates=tuple(names))


def check_config(config: InjectorConfig, settings: Settings) -> None:
    """Refuse a configuration whose proxies cannot receive what the capture sends them: listeners other than
    the mesh config's (which Istio's control plane and its CNI plugin use), or a proxy without a UID of its own
    to be exempted by."""
    problems = []
    for template in config.templates.values():
        if template.listeners is None:
            continue  # no capture: nothing to agree with
        for field, path in (("outbound", "proxyListenPort"), ("inbound", "proxyInboundListenPort")):
            port = getattr(template.listeners, field)
            if port != settings.mesh_value(path):
                problems.append(
                    f"templates.{template.name}.listeners.{field}: {port} disagrees with setting "
                    f"meshConfig.{path} ({go_text(settings.mesh_value(path))}), where the capture sends connections"
                )
        named = sorted({condition for overlay in template.overlays for condition in overlay.when})
        # Every combination of the overlays' conditions gives a proxy the capture must be able to exempt.
        for held in (frozenset(c for i, c in enumerate(named) if mask >> i & 1) for mask in range(2 ** len(named))):
            where = f" (when {', '.join(sorted(held))})" if held else ""
            try:
                proxy_identity(_overlaid(template, held))
            except InjectionError as error:
                problems.append(f"templates.{template.name}.proxy{where}: {error}")
                break  # one line per template: the first combination that fails
    if problems:
        raise ConfigError("\n".join(f"invalid value for --injector-config: {problem}" for problem in problems))


def owner_of(document: Mapping[str, Any]) -> Owner:
    """A workload document's own identity; for a bare Pod, its controller's (a ReplicaSet made by a Deployment
    named as its Deployment, as Istio does), else the pod itself."""
    metadata = _mapping(document.get("metadata"), "metadata", "the workload")
    name = go_text(metadata.get("name") or metadata.get("generateName"))
    if document.get("kind") == "Pod":
        for reference in metadata.get("ownerReferences") or []:
            if isinstance(reference, Mapping) and reference.get("controller") is True:
                kind, owner_name = go_text(reference.get("kind")), go_text(reference.get("name"))
                template_hash = _mapping(metadata.get("labels"), "metadata.labels", "the pod").get("pod-template-hash")
                if kind == "ReplicaSet" and template_hash and owner_name.endswith(f"-{template_hash}"):
                    return Owner("apps/v1", "Deployment", owner_name[: -len(template_hash) - 1])
                return Owner(go_text(reference.get("apiVersion")), kind, owner_name)
    return Owner(go_text(document.get("apiVersion")), go_text(document.get("kind")), name)


def _placeholder_values(  # noqa: PLR0917 (one value per placeholder source)
    pod: Mapping[str, Any],
    spec: Mapping[str, Any],
    annotations: Mapping[str, str],
    settings: Settings,
    mode: str,
    template: Template,
    namespace: str,
    owner: Owner | None,
) -> dict[str, Any]:
    """What the template's placeholders stand for, for this pod (template.PLACEHOLDERS lists them)."""
    owner = owner or owner_of({"apiVersion": "v1", "kind": "Pod", **pod})
    apps = [c for c in spec.get("containers") or [] if isinstance(c, Mapping) and c.get("name") != PROXY_CONTAINER]
    context = template.proxy.get("securityContext") or {}
    listeners = template.listeners
    labels = string_map(_mapping(pod.get("metadata"), "metadata", "the pod").get("labels"))

    def annotated(annotation: str, path: str) -> str:
        return annotations[annotation] if annotation in annotations else settings.text(path)

    def readiness(field: str) -> int | None:
        # Kubernetes leaves a probe's zero fields out.
        text = annotated(
            f"readiness.status.sidecar.istio.io/{field}", f"global.proxy.readiness{field[0].upper()}{field[1:]}"
        )
        return int(text) if text.isdigit() and int(text) else None

    metadata = capture.proxy_config(annotations, settings).get("proxyMetadata") or {}
    trust_domain = go_text(settings.mesh_value("trustDomain")) or "cluster.local"
    workload_name = labels.get(WORKLOAD_NAME_LABEL) or owner.name
    canonical_name = labels.get("app.kubernetes.io/name") or labels.get("app") or workload_name
    return {
        "ProxyUID": context.get("runAsUser"),
        "ProxyGID": context.get("runAsGroup", context.get("runAsUser")),
        "OutboundPort": listeners.outbound if listeners else None,
        "InboundPort": listeners.inbound if listeners else None,
        "InterceptionMode": mode,
        "Namespace": namespace,
        # Istio's workload-name label names the workload, not the owner.
        "WorkloadName": workload_name,
        # A label value has at most 63 characters; Istio cuts the name there and drops one trailing '-'.
        "CanonicalName": canonical_name[:63].removesuffix("-"),
        "CanonicalRevision": labels.get("app.kubernetes.io/version") or labels.get("version") or "latest",
        "DefaultContainer": go_text(apps[0].get("name")) if apps else None,
        "Owner": f"kubernetes://apis/{owner.api_version}/namespaces/{namespace}/{owner.kind.lower()}s/{owner.name}",
        "AppContainers": ",".join(go_text(c.get("name")) for c in apps),
        "PodPorts": _pod_ports(apps),
        "ProxyConfig": _proxy_config_text(annotations, settings),
        "ProxyResources": _resources(annotations, settings),
        "AnnotatedResources": _annotated_resources(annotations),
        "ProxyImage": _proxy_image(annotations, settings),
        "StatusPort": _status_port(annotations, settings),
        "ReadinessInitialDelaySeconds": readiness("initialDelaySeconds"),
        "ReadinessPeriodSeconds": readiness("periodSeconds"),
        "ReadinessFailureThreshold": readiness("failureThreshold"),
        "ProxyMetadataEnv": [
            {"name": key, **({"value": go_text(metadata[key])} if go_text(metadata[key]) else {})}
            for key in sorted(metadata)
        ],
        "AgentArgs": _agent_args(settings),
        "CAAddress": settings.text("global.caAddress") or _istiod_address(settings),
        "ClusterID": settings.text("global.multiCluster.clusterName") or "Kubernetes",
        "TrustDomain": trust_domain,
        "MeshID": settings.text("global.meshID") or trust_domain,
        "UserVolumes": _user_volumes(annotations, USER_VOLUME),
        "UserVolumeMounts": _user_volumes(annotations, USER_VOLUME_MOUNT),
        "LogLevel": annotated(PROXY_LOG_LEVEL, "global.proxy.logLevel"),
        "ComponentLogLevel": annotated(PROXY_COMPONENT_LOG_LEVEL, "global.proxy.componentLogLevel"),
        "AgentLogLevel": annotated(capture.AGENT_LOG_LEVEL, "global.logging.level"),
    }


def _agent_args(settings: Settings) -> list[str]:
    """The agent's optional arguments Istio's template adds from the values."""
    args = []
    if port := settings.text("global.sts.servicePort"):
        args.append(f"--stsPort={port}")
    if settings.value("global.logAsJson") is True:
        args.append("--log_as_json")
    if path := settings.text("global.proxy.outlierLogPath"):
        args.append(f"--outlierLogPath={path}")
    return args


def _istiod_address(settings: Settings) -> str:
    revision = settings.text("revision")
    return f"istiod{'-' + revision if revision else ''}.{settings.text('global.istioNamespace')}.svc:15012"


def _user_volumes(annotations: Mapping[str, str], annotation: str) -> list[dict[str, Any]]:
    """Istio's sidecar.istio.io/userVolume and userVolumeMount: a JSON map of name to volume (or volume mount),
    each added with its name, by name."""
    if annotation not in annotations:
        return []
    try:
        given = json.loads(annotations[annotation])
    except ValueError:
        given = None
    if not isinstance(given, dict) or not all(isinstance(value, dict) for value in given.values()):
        raise InjectionError(
            f"invalid value '{go_text(annotations[annotation])}' for annotation '{annotation}': must be a JSON "
            "map of names to volumes"
        )
    return [{"name": name, **given[name]} for name in sorted(given)]


def _proxy_image(annotations: Mapping[str, str], settings: Settings) -> str:
    """Istio's proxy image: the pod's sidecar.istio.io/proxyImage or values.global.proxy.image when it is a
    registry path (holds a '/'), else that name (proxyv2) at the values' hub and tag."""
    for image in (annotations.get(PROXY_IMAGE, ""), settings.text("global.proxy.image")):
        if "/" in image:
            return image
    name = settings.text("global.proxy.image") or "proxyv2"
    return f"{settings.text('global.hub')}/{name}:{settings.text('global.tag')}"


_PORT_FIELDS = ("name", "hostPort", "containerPort", "protocol", "hostIP")
"""A ContainerPort's fields in Go's struct order, as Istio's structToJSON writes them."""


def _pod_ports(containers: list[Mapping[str, Any]]) -> str:
    """Istio's ISTIO_META_POD_PORTS text: each port on its own line, a comma before all but the very first
    (its template tests the first port of the first container, so a first container without ports gives
    a leading comma, kept)."""
    text = "["
    for index, container in enumerate(containers):
        for position, port in enumerate(container.get("ports") or []):
            if not isinstance(port, Mapping):
                continue
            shown = {key: port[key] for key in _PORT_FIELDS if port.get(key) not in (None, "", 0)}
            comma = "" if index == 0 and position == 0 else ","
            text += f"\n    {comma}{json.dumps(shown, separators=(',', ':'))}"
    return text + "\n]"


def _proxy_config_text(annotations: Mapping[str, str], settings: Settings) -> str:
    """The pod's proxy config where it differs from the built-in defaults, as Istio's PROXY_CONFIG env."""
    defaults = DEFAULT_MESH["defaultConfig"]
    config = capture.proxy_config(annotations, settings)
    differing = {key: value for key, value in config.items() if value != defaults.get(key) and value not in ({}, None)}
    # protojson writes a message's fields in the order the .proto declares them, a map's keys sorted (below the
    # top level, every key sorted: the nested messages' declarations are not listed here).
    order = {name: index for index, name in enumerate(PROXY_CONFIG_FIELDS)}
    ordered = sorted(differing, key=lambda key: (order.get(key, len(order)), key))
    return json.dumps({key: _sorted_maps(differing[key]) for key in ordered}, separators=(",", ":")) + "\n"


PROXY_CONFIG_FIELDS = (
    *("configPath", "binaryPath", "serviceCluster", "tracingServiceName", "drainDuration"),
    *("parentShutdownDuration", "discoveryAddress", "discoveryRefreshDelay", "zipkinAddress", "statsdUdpAddress"),
    *("envoyMetricsServiceAddress", "proxyAdminPort", "availabilityZone", "controlPlaneAuthPolicy"),
    *("customConfigFile", "statNameLength", "concurrency", "proxyBootstrapTemplatePath", "interceptionMode"),
    *("tracing", "sds", "envoyAccessLogService", "envoyMetricsService", "proxyMetadata", "runtimeValues"),
    *("statusPort", "extraStatTags", "gatewayTopology", "terminationDrainDuration", "meshId", "readinessProbe"),
    *("proxyStatsMatcher", "holdApplicationUntilProxyStarts", "caCertificatesPem", "image"),
    *("privateKeyProvider", "proxyHeaders", "fileFlushInterval", "fileFlushMinSizeKb"),
)
"""Istio's ProxyConfig (``mesh/v1alpha1/proxy.proto``): its fields in declaration order."""


def _sorted_maps(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _sorted_maps(value[key]) for key in sorted(value)}
    return value


def _trees(settings: Settings) -> dict[str, Any]:
    return {"Values": settings.values, "MeshConfig": settings.mesh}


def _rendered_proxy(
    template: Template, conditions: frozenset[str], values: Mapping[str, Any], settings: Settings
) -> dict[str, Any]:
    rendered: dict[str, Any] = substitute(_overlaid(template, conditions), values, _trees(settings))
    return rendered


def _overlaid(template: Template, conditions: frozenset[str]) -> Mapping[str, Any]:
    """The template's proxy with the overlays whose conditions all hold laid over it, in order."""
    proxy: Mapping[str, Any] = template.proxy
    for overlay in template.overlays:
        if overlay.when <= conditions:
            proxy = _strategic_merge(proxy, overlay.proxy)
    return proxy


def _conditions(annotations: Mapping[str, str], settings: Settings, mode: str, native: bool) -> frozenset[str]:
    """Which of the overlays' conditions (template.CONDITIONS) hold for the pod."""
    held = {"tproxy"} if mode == "TPROXY" else set()
    if native:
        held.add("nativeSidecar")
    elif _holds_application(annotations, settings)[0]:
        held.add("holdApplication")
    if _status_port(annotations, settings) != 0:
        held.add("statusPort")
    return frozenset(held)


def _holds_application(annotations: Mapping[str, str], settings: Settings) -> tuple[bool, bool]:
    """Whether a proxy that is not a native sidecar holds the app until it is ready (its postStart hook), and
    whether it goes first among the containers. Istio reads holdApplicationUntilProxyStarts of the pod's
    proxy config and of values.global.proxy: either puts the proxy first, and the hook is the proxy config's
    choice when it makes one (an explicit false removes it), else the values'."""
    own = capture.proxy_config(annotations, settings).get("holdApplicationUntilProxyStarts")
    values = settings.value("global.proxy.holdApplicationUntilProxyStarts") is True
    return (own is True if isinstance(own, bool) else values), own is True or values


def _status_port(annotations: Mapping[str, str], settings: Settings) -> int:
    """The agent's status port: status.sidecar.istio.io/port (checked as a port), else the values'."""
    text = annotations.get(capture.STATUS_PORT, settings.text("global.proxy.statusPort")).strip()
    return int(text) if text.isdigit() else 0


def _sidecar(template: Template, proxy: Mapping[str, Any]) -> Sidecar:
    """What the capture takes from the proxy, which must be able to receive it."""
    uid, gid = proxy_identity(proxy)
    listeners = template.listeners
    assert listeners is not None  # only a template with listeners gets a capture
    own = [*template.proxy_ports]
    own += [port for port in declared_ports(proxy) if port not in own]
    for port in (listeners.outbound, listeners.inbound):
        if port in own:
            raise InjectionError(
                f"the proxy's container declares port {port}, a redirect listener: excluding it from inbound "
                "capture would let connections to it bypass the proxy"
            )
    return Sidecar(uid=uid or gid, outbound=listeners.outbound, inbound=listeners.inbound, own_ports=tuple(own))


def proxy_identity(proxy: Mapping[str, Any]) -> tuple[int, int]:
    """The proxy's UID and GID (the GID defaults to the UID). A root proxy must have a group of its own: the
    capture then exempts it by that group."""
    context = _mapping(proxy.get("securityContext"), "the istio-proxy container's securityContext", "the proxy")
    uid, gid = context.get("runAsUser"), context.get("runAsGroup")
    if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
        raise InjectionError(
            f"invalid value '{go_text(uid)}' for the istio-proxy container's securityContext.runAsUser: the "
            "capture exempts the proxy by its UID, which must be given (a non-negative integer)"
        )
    gid = uid if gid is None else gid
    if not isinstance(gid, int) or isinstance(gid, bool) or gid < 0 or uid == gid == 0:
        raise InjectionError(
            f"invalid value '{go_text(gid)}' for the istio-proxy container's securityContext.runAsGroup: a proxy "
            "running as root needs a group of its own (not 0), by which the capture exempts it"
        )
    return uid, gid


def _check_apps(spec: Mapping[str, Any], proxy: Mapping[str, Any], workload: str) -> None:
    """Refuse an app container that runs as the proxy's UID or group: the capture would exempt its traffic."""
    uid, gid = proxy_identity(proxy)
    exempt_uid = uid or gid
    pod_context = _mapping(spec.get("securityContext"), "spec.securityContext", workload)
    for key in ("containers", "initContainers"):
        for container in spec.get(key) or []:
            # The capture's own containers run as root, or (the validation probe) as the proxy on purpose.
            if not isinstance(container, Mapping) or container.get("name") in (
                PROXY_CONTAINER,
                INIT_CONTAINER,
                VALIDATION_CONTAINER,
            ):
                continue
            own = _mapping(container.get("securityContext"), f"{key}.securityContext", workload)
            for field, proxy_value in (("runAsUser", exempt_uid), ("runAsGroup", gid)):
                value = own.get(field, pod_context.get(field))
                if value == proxy_value:
                    raise InjectionError(
                        f"container {go_text(container.get('name'))} runs as {field} {value}, the proxy's: the "
                        "capture exempts the proxy by it, so that container's traffic would bypass the proxy"
                    )


def _native(annotations: Mapping[str, str], template: Template) -> bool:
    """The template's choice, unless the pod's sidecar.istio.io/nativeSidecar annotation says otherwise."""
    asked = annotations.get(NATIVE_SIDECAR, "").lower()
    return asked == "true" if asked in ("true", "false") else template.native_sidecar


def _add_volumes(
    spec: dict[str, Any], template: Template, values: Mapping[str, Any], settings: Settings, workload: str
) -> list[str]:
    """The template's volumes added to the pod (one the pod already has, by name, is kept), in the order of
    Istio's strategic merge of the template over the pod; their names."""
    volumes = _list(spec, "volumes", workload)
    present = {v.get("name") for v in volumes if isinstance(v, Mapping)}
    wanted = substitute(list(template.volumes), values, _trees(settings))
    volumes = _merge_by(volumes, wanted, "name", lambda own, _: copy.deepcopy(own))
    if volumes:
        spec["volumes"] = volumes
    return [volume["name"] for volume in wanted if volume["name"] not in present]


def _native_sidecar(annotations: Mapping[str, str], init_containers: list[Any]) -> bool:
    if annotations.get(NATIVE_SIDECAR, "").lower() == "true":
        return True
    return any(isinstance(c, Mapping) and c.get("name") == PROXY_CONTAINER for c in init_containers)


def _init_container(  # noqa: PLR0917
    annotations: Mapping[str, str],
    settings: Settings,
    mode: str,
    proxy: Mapping[str, Any],
    injector: Injector,
    sidecar: Sidecar | None,
) -> dict[str, Any]:
    """The init container as Istio's template renders it, field by field (its order kept). ``proxy`` is the
    proxy's security context."""
    proxy_uid, proxy_gid = _int_or_none(proxy.get("runAsUser")), _int_or_none(proxy.get("runAsGroup"))
    if sidecar is not None:
        proxy_uid = sidecar.uid  # what the rules exempt, which the validation probe runs as
    container: dict[str, Any] = {
        "name": VALIDATION_CONTAINER if settings.cni else INIT_CONTAINER,
        "image": _image(settings, injector),
        "args": init_args(annotations, settings, proxy_uid=proxy_uid, sidecar=sidecar),
    }
    if policy := settings.text("global.imagePullPolicy"):
        container["imagePullPolicy"] = policy
    metadata = capture.proxy_config(annotations, settings).get("proxyMetadata") or {}
    if metadata:
        container["env"] = [{"name": key, "value": go_text(metadata[key])} for key in sorted(metadata)]
    container["resources"] = _resources(annotations, settings)
    privileged = settings.value("global.proxy.privileged") is True
    tproxy = mode == "TPROXY"
    context: dict[str, Any] = {"allowPrivilegeEscalation": privileged, "privileged": privileged}
    if settings.cni:
        # The validation probe needs no capability and runs as the proxy; in TPROXY mode Istio keeps 1337.
        context["capabilities"] = {"drop": ["ALL"]}
        context["readOnlyRootFilesystem"] = True
        context["runAsGroup"] = 1337 if tproxy or proxy_gid is None else proxy_gid
        context["runAsUser"] = 1337 if tproxy or proxy_uid is None else proxy_uid
        context["runAsNonRoot"] = True
    elif injector.hardened:
        # Our image's user, which gets NET_ADMIN and NET_RAW from file capabilities at execve: that needs
        # no_new_privs off, i.e. allowPrivilegeEscalation true (deploy/istio-init-pod.yaml says more).
        context["allowPrivilegeEscalation"] = True
        context["capabilities"] = {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        context["readOnlyRootFilesystem"] = True
        context["runAsGroup"] = HARDENED_USER
        context["runAsNonRoot"] = True
        context["runAsUser"] = HARDENED_USER
        container["volumeMounts"] = [{"name": LOCK_VOLUME, "mountPath": LOCK_DIRECTORY}]
    else:
        context["capabilities"] = {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        context["readOnlyRootFilesystem"] = False
        context["runAsGroup"] = 0
        context["runAsNonRoot"] = False
        context["runAsUser"] = 0
    seccomp = settings.value("global.proxy.seccompProfile")
    if seccomp:
        context["seccompProfile"] = copy.deepcopy(seccomp)
    elif injector.hardened and not settings.cni:
        context["seccompProfile"] = {"type": "RuntimeDefault"}
    container["securityContext"] = context
    return container


def _image(settings: Settings, injector: Injector) -> str:
    # Istio takes values.global.proxy_init.image only when it names a registry path; a bare name is
    # combined with its hub and tag, which name Istio's image, not ours.
    configured = settings.text("global.proxy_init.image")
    if injector.image == DEFAULT_IMAGE and "/" in configured:
        return configured
    return injector.image


def _annotated_resources(annotations: Mapping[str, str]) -> dict[str, Any]:
    """The proxy's resources from the sidecar.istio.io/proxyCPU... annotations alone."""
    resources: dict[str, Any] = {}
    for part, kind, name in RESOURCE_ANNOTATIONS:
        if name in annotations:
            resources.setdefault(part, {})[kind] = _quantity(annotations[name], f"annotation '{name}'")
    return resources


def _resources(annotations: Mapping[str, str], settings: Settings) -> dict[str, Any]:
    resources = _annotated_resources(annotations)
    if resources:
        return resources
    configured = settings.value("global.proxy.resources") or {}
    for part in ("limits", "requests"):
        for kind, value in (configured.get(part) or {}).items():
            if value is None:
                continue  # a null quantity is no quantity (Helm drops it)
            where = f"setting values.global.proxy.resources.{part}.{kind}"
            resources.setdefault(part, {})[kind] = _quantity(go_text(value), where)
    return resources


def _quantity(text: str, origin: str) -> str:
    try:
        return canonical_quantity(text)
    except ValueError as error:
        raise InjectionError(f"invalid value '{text}' for {origin}: {error}") from None


def _strategic_merge(generated: Any, user: Any) -> Any:
    """The user's container laid over the generated one, the user's fields winning (a strategic merge patch
    of a Container: maps merged, env and volumeMounts merged by their keys, other lists replaced)."""
    if isinstance(generated, Mapping) and isinstance(user, Mapping):
        merged = dict(generated)
        for key, value in user.items():
            keyed = _MERGE_KEYS.get(key)
            if keyed and isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = _merge_by(merged[key], value, keyed)
            else:
                merged[key] = _strategic_merge(merged.get(key), value)
        return merged
    return copy.deepcopy(user)


_MERGE_KEYS = {"env": "name", "volumeMounts": "mountPath", "ports": "containerPort", "volumeDevices": "devicePath"}


def _merge_by(
    original: list[Any],
    patch: list[Any],
    key: str,
    combine: Callable[[Any, Any], Any] = _strategic_merge,
) -> list[Any]:
    """Kubernetes' strategic merge of a list keyed by ``key``: an item of both is ``combine``d, and the order is
    apimachinery's (``mergeSortedSlice``): the patch's items in the patch's order, each of the original's own
    items placed before the first patch item that follows it in the original."""

    def key_of(item: Any) -> Any:
        return item.get(key) if isinstance(item, Mapping) else None

    patched = {key_of(item): item for item in patch}
    merged = [combine(item, patched[key_of(item)]) if key_of(item) in patched else item for item in original]
    known = {key_of(item) for item in original}
    merged += [copy.deepcopy(item) for item in patch if key_of(item) not in known]
    order = {key_of(item): index for index, item in enumerate(patch)}
    from_patch = sorted((item for item in merged if key_of(item) in patched), key=lambda item: order[key_of(item)])
    own = [item for item in merged if key_of(item) not in patched]
    position = {key_of(item): index for index, item in enumerate(original)}
    result: list[Any] = []
    while own or from_patch:
        # An original item goes first while it precedes, in the original, the next patch item.
        own_first = bool(own) and (
            not from_patch
            or (key_of(from_patch[0]) in position and position[key_of(own[0])] < position[key_of(from_patch[0])])
        )
        result.append(own.pop(0) if own_first else from_patch.pop(0))
    return result


def _find(spec: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    for key in ("containers", "initContainers"):
        for container in spec.get(key) or ():
            if isinstance(container, Mapping) and container.get("name") == name:
                return container
    return None


def _security_context(container: Mapping[str, Any] | None, workload: str) -> Mapping[str, Any]:
    context = (container or {}).get("securityContext") or {}
    if not isinstance(context, Mapping):
        raise InjectionError(f"{workload}: the istio-proxy container's securityContext is not a map")
    for key in ("runAsUser", "runAsGroup"):
        value = context.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InjectionError(
                f"{workload}: invalid value '{go_text(value)}' for the istio-proxy container's "
                f"securityContext.{key}: must be a non-negative integer"
            )
    return context


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _multus(settings: Settings) -> bool:
    return "multus" in (settings.value("pilot.cni.provider"), settings.value("cni.provider"))


def _mapping(value: Any, what: str, workload: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InjectionError(f"{workload}: {what} is not a map")
    return value


def _list(holder: Mapping[str, Any], key: str, workload: str) -> list[Any]:
    value = holder.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectionError(f"{workload}: spec.{key} is not a list")
    return list(value)


def _check_strings(annotations: Mapping[str, Any], workload: str) -> None:
    for name, value in annotations.items():
        if not isinstance(value, str):
            raise InjectionError(
                f"{workload}: invalid value '{go_text(value)}' for annotation '{name}': annotation values must be "
                "strings (quote it in YAML)"
            )
