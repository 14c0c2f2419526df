"""Injection: a workload's pod template in, the same with the capture's init container and annotations out,
as Istio's injector (``istioctl kube-inject`` and the webhook) makes them. Pure: documents in, documents out.

Only the capture is injected: the ``istio-init`` container (``istio-validation`` when Istio's CNI plugin
captures) and the pod annotations that carry the capture settings. The ``istio-proxy`` container stays the
mesh's job; one the user wrote is left as it is, and its ``runAsUser`` is the UID the rules exempt.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from istio_iptables.kube import capture
from istio_iptables.kube.capture import InjectionError, init_args
from istio_iptables.kube.quantity import canonical_quantity
from istio_iptables.kube.settings import Settings, go_text
from istio_iptables.records import record

DEFAULT_IMAGE = "istio-iptables:0.1.0"
"""This project's image, as the Dockerfile tags it."""

INIT_CONTAINER = "istio-init"
VALIDATION_CONTAINER = "istio-validation"
PROXY_CONTAINER = "istio-proxy"

SIDECAR_STATUS = "sidecar.istio.io/status"
INJECT = "sidecar.istio.io/inject"
TEMPLATES = "inject.istio.io/templates"
NATIVE_SIDECAR = "sidecar.istio.io/nativeSidecar"
MULTUS_NETWORKS = "k8s.v1.cni.cncf.io/networks"
MULTUS_NETWORK = "default/istio-cni"
RESOURCE_ANNOTATIONS = (
    ("requests", "cpu", "sidecar.istio.io/proxyCPU"),
    ("requests", "memory", "sidecar.istio.io/proxyMemory"),
    ("limits", "cpu", "sidecar.istio.io/proxyCPULimit"),
    ("limits", "memory", "sidecar.istio.io/proxyMemoryLimit"),
)

IGNORED_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "local-path-storage"})
"""Namespaces Istio never injects (``inject.IgnoredNamespaces``)."""
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


Skipped = Callable[[str, str], None]
"""Told of each workload left as it was: its name (``Deployment default/app``) and why."""


@record
class Injector:
    settings: Settings
    image: str = DEFAULT_IMAGE
    hardened: bool = False
    """Our init container instead of Istio's root one: non-root, read-only root filesystem, same capabilities."""


def inject_pod(
    pod: Mapping[str, Any],
    injector: Injector,
    *,
    workload: str,
    namespace: str = "",
    skipped: Skipped | None = None,
) -> dict[str, Any]:
    """The pod (or pod template: ``metadata`` + ``spec``) after injection, as a new object; equal to the input
    when Istio would skip it, and then ``skipped`` is told why. ``workload`` (e.g. ``Deployment default/app``)
    is named in errors; ``namespace`` is the workload's, for Istio's never-injected system namespaces."""
    metadata = dict(_mapping(pod.get("metadata"), "metadata", workload))
    spec = dict(_mapping(pod.get("spec"), "spec", workload))
    annotations = dict(_mapping(metadata.get("annotations"), "metadata.annotations", workload))
    labels = _mapping(metadata.get("labels"), "metadata.labels", workload)
    _check_strings(annotations, workload)
    settings = injector.settings
    unchanged = copy.deepcopy(dict(pod))
    namespace = namespace or go_text(metadata.get("namespace"))
    reason = _skip_reason(spec, annotations=annotations, labels=labels, namespace=namespace, settings=settings)
    try:
        mode = "" if reason else capture.interception_mode(annotations, settings)
        if mode == "NONE":
            reason = f"the interception mode is NONE ({capture.INTERCEPTION_MODE} or the mesh's default)"
        if reason:
            if skipped is not None:
                skipped(workload, reason)
            return unchanged
        proxy = _security_context(_find(spec, PROXY_CONTAINER), workload)
        container = _init_container(annotations, settings, mode, proxy, injector)
    except InjectionError as error:
        raise InjectionError(f"{workload}: {error}") from None
    spec = copy.deepcopy(spec)
    init_containers = _list(spec, "initContainers", workload)
    name = container["name"]
    user = next((c for c in init_containers if isinstance(c, Mapping) and c.get("name") == name), None)
    if user is not None:
        container = _strategic_merge(container, {k: v for k, v in user.items() if not (k == "image" and v == "auto")})
    others = [c for c in init_containers if not (isinstance(c, Mapping) and c.get("name") == name)]
    # Istio's order: the validation probe first, to block everything until the CNI plugin has captured; the
    # init container last, so other init containers reach the network uncaptured, unless the proxy runs as a
    # native sidecar (an init container itself), which must start after the capture.
    native = _native_sidecar(annotations, others)
    first = name == VALIDATION_CONTAINER or native
    spec["initContainers"] = [container, *others] if first else [*others, container]
    if injector.hardened and name == INIT_CONTAINER:
        volumes = _list(spec, "volumes", workload)
        if not any(isinstance(v, Mapping) and v.get("name") == LOCK_VOLUME for v in volumes):
            volumes.append({"name": LOCK_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
        spec["volumes"] = volumes
    if settings.cni:
        annotations.update(cni_annotations(annotations, settings))
        annotations.update(recorded_proxy_uid(container["args"]))
    annotations[SIDECAR_STATUS] = json.dumps(
        {
            "initContainers": [name],
            "containers": None,
            "volumes": [LOCK_VOLUME] if injector.hardened and name == INIT_CONTAINER else None,
            "imagePullSecrets": None,
            "revision": "default",
        },
        separators=(",", ":"),
    )
    return {**unchanged, "metadata": {**copy.deepcopy(metadata), "annotations": annotations}, "spec": spec}


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


def inject_documents(documents: Iterable[Any], injector: Injector, skipped: Skipped | None = None) -> list[Any]:
    """Every workload of the documents (and of ``kind: List`` items) injected; other objects unchanged;
    ``skipped`` told of each workload left as it was."""
    return [_inject_object(document, injector, skipped) for document in documents]


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


def _inject_object(document: Any, injector: Injector, skipped: Skipped | None) -> Any:
    if not isinstance(document, Mapping):
        return document
    kind = document.get("kind")
    if kind == "List" and isinstance(document.get("items"), list):
        return {**document, "items": [_inject_object(item, injector, skipped) for item in document["items"]]}
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
    injected = inject_pod(pod, injector, workload=workload, namespace=namespace, skipped=skipped)
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


def _skip_reason(
    spec: Mapping[str, Any],
    *,
    annotations: Mapping[str, str],
    labels: Mapping[str, Any],
    namespace: str,
    settings: Settings,
) -> str:
    """Why Istio leaves the workload alone (``injectRequired`` and the template choice, as far as the capture
    goes); empty when it injects it."""
    if spec.get("hostNetwork") is True:
        return "it uses the host's network (spec.hostNetwork)"
    if namespace in IGNORED_NAMESPACES:
        return f"namespace {namespace} is one Istio never injects"
    if SIDECAR_STATUS in annotations:
        return f"it is injected already (annotation {SIDECAR_STATUS})"  # injecting again changes nothing
    # The label is the newer API and wins over the annotation. Only y/yes/true/on (any case) ask for it; any
    # other non-empty value, "enabled" included (istio#33618), turns injection off.
    where, selector = (
        ("label", go_text(labels[INJECT])) if INJECT in labels else ("annotation", annotations.get(INJECT, ""))
    )
    if selector and selector.lower() not in ("y", "yes", "true", "on"):
        return f"{where} {INJECT} is '{selector}'"
    templates = [name.strip() for name in annotations[TEMPLATES].split(",")] if TEMPLATES in annotations else None
    if templates is None:
        defaults = settings.value("sidecarInjectorWebhook.defaultTemplates")
        templates = [go_text(name) for name in defaults] if isinstance(defaults, list) and defaults else ["sidecar"]
    if CAPTURE_TEMPLATE not in templates:
        chosen = ", ".join(templates)
        return f"its injection templates ({chosen}) do not include '{CAPTURE_TEMPLATE}', the one with the capture"
    return ""


def _native_sidecar(annotations: Mapping[str, str], init_containers: list[Any]) -> bool:
    if annotations.get(NATIVE_SIDECAR, "").lower() == "true":
        return True
    return any(isinstance(c, Mapping) and c.get("name") == PROXY_CONTAINER for c in init_containers)


def _init_container(
    annotations: Mapping[str, str], settings: Settings, mode: str, proxy: Mapping[str, Any], injector: Injector
) -> dict[str, Any]:
    """The init container as Istio's template renders it, field by field (its order kept)."""
    proxy_uid, proxy_gid = _int_or_none(proxy.get("runAsUser")), _int_or_none(proxy.get("runAsGroup"))
    container: dict[str, Any] = {
        "name": VALIDATION_CONTAINER if settings.cni else INIT_CONTAINER,
        "image": _image(settings, injector),
        "args": init_args(annotations, settings, proxy_uid=proxy_uid),
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


def _resources(annotations: Mapping[str, str], settings: Settings) -> dict[str, Any]:
    given = [(part, kind, name) for part, kind, name in RESOURCE_ANNOTATIONS if name in annotations]
    resources: dict[str, Any] = {}
    if given:
        for part, kind, name in given:
            resources.setdefault(part, {})[kind] = _quantity(annotations[name], f"annotation '{name}'")
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


def _merge_by(generated: list[Any], user: list[Any], key: str) -> list[Any]:
    merged = list(generated)
    for item in user:
        at = next(
            (
                i
                for i, old in enumerate(merged)
                if isinstance(old, Mapping) and isinstance(item, Mapping) and old.get(key) == item.get(key)
            ),
            None,
        )
        if at is None:
            merged.append(copy.deepcopy(item))
        else:
            merged[at] = _strategic_merge(merged[at], item)
    return merged


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
