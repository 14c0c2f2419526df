"""The ``istio-iptables-cni`` plugin: the init container's capture, applied from the node while the runtime
sets up the pod's network, so the pod itself needs no NET_ADMIN.

Chained after the cluster's network plugin. For a pod injected for CNI mode (its ``sidecar.istio.io/status``
names the ``istio-validation`` container), ADD builds the argv ``inject`` would give its init container
(``kube.capture``: annotations, then the plugin's values and mesh config), parses it with the CLI's own
parser, and applies that plan inside ``CNI_NETNS`` through the CLI's apply path: the same rules, atomically,
whichever way a pod is captured. Every other pod is left alone. DEL removes every rule and route of ours;
CHECK compares the live rules with the plan. Errors are the spec's JSON on stdout and a non-zero exit.

Most pods on a node are left alone, and the plugin runs in each one's start. So this module loads only the
protocol: a pod left alone is answered from the request before anything else is imported (the flag table,
logging, ``enum`` and ``re`` come with the first pod to capture).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from istio_iptables.cni.protocol import (
    DNS,
    POD_ANNOTATIONS,
    CniError,
    Request,
    dumps,
    error_json,
    loads,
    read_request,
    result_json,
    version_json,
)
from istio_iptables.errors import ApplyError, ConfigError, HostError, NoAddressError
from istio_iptables.records import record, replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

    from istio_iptables.capture import config as configuration
    from istio_iptables.kube.settings import Settings
    from istio_iptables.log import LogLevel

PROG = "istio-iptables-cni"
STATUS = "sidecar.istio.io/status"
INJECT = "sidecar.istio.io/inject"
VALIDATION_CONTAINER = "istio-validation"
PROXY_CONTAINER = "istio-proxy"
DEFAULT_EXCLUDED_NAMESPACES = ("kube-system",)
STANDARD_KEYS = frozenset(
    {"cniVersion", "cniVersions", "name", "type", "args", "ipMasq", "ipam", "dns", "capabilities"}
    | {"runtimeConfig", "prevResult"}
)
"""The spec's keys of a plugin's configuration object; any other key must be one of this plugin's settings."""
SETTINGS = frozenset({"values", "mesh_config", "exclude_namespaces", "log_level", "kubernetes", "iptables"})
QUIET_LEVELS = frozenset({"info", "warn", "warning", "error", "none"})
"""``log_level`` values that log nothing about a pod left alone (its reason is a debug line)."""


@record
class PluginConfig:
    """This plugin's settings: its object in the conflist."""

    values: Mapping[str, object] | None = None
    """The injector's Helm values (as ``inject --values``): defaults for what a pod does not annotate."""
    mesh_config: Mapping[str, object] | None = None
    """The mesh config (as ``inject --mesh-config``)."""
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDED_NAMESPACES
    log_level: LogLevel | None = None
    """None: info."""
    kubeconfig: str = ""
    """Where to get a pod's annotations when the runtime does not pass them."""
    iptables: configuration.IptablesVariant | None = None
    """``legacy`` or ``nft``; None: detect, as the CLI does."""

    def excludes(self, namespace: str) -> bool:
        return namespace in self.exclude_namespaces


def parse_plugin_config(document: Mapping[str, object]) -> PluginConfig:
    """This plugin's settings; CniError naming the setting and the value when one is wrong."""
    from istio_iptables.capture import config as configuration  # noqa: PLC0415 (see the module's docstring)
    from istio_iptables.log import LogLevel  # noqa: PLC0415

    unknown = sorted(set(document) - STANDARD_KEYS - SETTINGS)
    if unknown:
        known = ", ".join(sorted(SETTINGS))
        raise _config_error(unknown[0], document[unknown[0]], f"unknown setting (known: {known})")
    values, mesh = document.get("values"), document.get("mesh_config")
    for key, tree in (("values", values), ("mesh_config", mesh)):
        if tree is not None and not isinstance(tree, Mapping):
            raise _config_error(key, tree, "must be an object")
    excluded = document.get("exclude_namespaces", list(DEFAULT_EXCLUDED_NAMESPACES))
    if not isinstance(excluded, list) or not all(isinstance(name, str) for name in excluded):
        raise _config_error("exclude_namespaces", excluded, "must be a list of namespace names")
    level_text = document.get("log_level", "info")
    kubernetes = document.get("kubernetes", {})
    if not isinstance(kubernetes, Mapping) or not isinstance(kubernetes.get("kubeconfig", ""), str):
        raise _config_error("kubernetes", kubernetes, 'must be {"kubeconfig": PATH}')
    variant = document.get("iptables", "")
    try:
        level = configuration.parse_log_level(str(level_text), LogLevel.INFO)
    except ValueError as error:
        raise _config_error("log_level", level_text, str(error)) from None
    try:
        iptables = configuration.parse_force_binary(str(variant))
    except ValueError as error:
        raise _config_error("iptables", variant, str(error)) from None
    return PluginConfig(
        values=values,  # type: ignore[arg-type]
        mesh_config=mesh,  # type: ignore[arg-type]
        exclude_namespaces=tuple(excluded),
        log_level=level,
        kubeconfig=str(kubernetes.get("kubeconfig", "")),
        iptables=iptables,
    )


def check_plugin_config(document: Mapping[str, object]) -> PluginConfig:
    """Everything this plugin will read of its settings, read now: ``parse_plugin_config`` and the injector
    settings it builds from ``values`` and ``mesh_config`` (on a node, only for the pods it captures and on
    DEL). The installer refuses with this what the plugin would refuse at a pod's ADD or DEL."""
    plugin = parse_plugin_config(document)
    _settings(plugin)
    return plugin


def _config_error(key: str, value: object, reason: str) -> CniError:
    from istio_iptables.capture import config as configuration  # noqa: PLC0415

    shown = configuration.shown(dumps(value))
    return CniError(CniError.INVALID_CONFIG, f"invalid value for plugin setting {key}: {shown}: {reason}")


@record
class PodInfo:
    """What the plugin knows of a pod: its annotations, and from the API also labels and containers."""

    annotations: Mapping[str, str]
    labels: Mapping[str, str] = {}
    containers: tuple[str, ...] | None = None
    proxy_uid: int | None = None


def skip_reason(pod: PodInfo) -> str | None:
    """Why the plugin leaves this pod alone, or None when it is one to capture (unless its interception mode
    is NONE). Istio's plugin decides the same way, but that only a pod whose injection left the capture to
    a CNI plugin has an ``istio-validation`` init container: a pod with ``istio-init`` captures itself, a
    gateway has neither."""
    # The label is the newer API and wins over the annotation; only y/yes/true/on ask for injection.
    selector = pod.labels.get(INJECT, pod.annotations.get(INJECT, ""))
    if selector and selector.lower() not in ("y", "yes", "true", "on"):
        return f"{INJECT} is '{selector}'"
    status = pod.annotations.get(STATUS)
    if status is None:
        return f"not injected (no {STATUS} annotation)"
    if VALIDATION_CONTAINER not in _init_containers(status):
        return f"not injected for CNI mode ({STATUS} names no {VALIDATION_CONTAINER} init container)"
    if pod.containers is not None and PROXY_CONTAINER not in pod.containers:
        return f"no {PROXY_CONTAINER} container"
    return None


def _init_containers(status: str) -> list[str]:
    try:
        document = loads(status)
    except ValueError:
        return []
    names = document.get("initContainers") if isinstance(document, dict) else None
    return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []


def main() -> None:
    """The executable a runtime runs: the request from the environment and stdin, the answer on stdout."""
    _node_libraries()
    version = ""
    try:
        request = read_request(os.environ, sys.stdin.buffer.read())
        version = request.version
        output = handle(request, own_process=True)
    except CniError as error:
        fail(error, version)
    except Exception as error:  # a defect: the runtime still gets an error object, the log the traceback
        import traceback  # noqa: PLC0415

        traceback.print_exc()
        fail(CniError(CniError.INTERNAL, f"internal error: {type(error).__name__}: {error}"), version)
    sys.stdout.write(output)


def fail(error: CniError, version: str) -> NoReturn:
    print(f"{PROG}: {error.message}{': ' + error.details if error.details else ''}", file=sys.stderr)
    sys.stdout.write(error_json(error, version))
    sys.exit(1)


def _node_libraries() -> None:
    """The self-contained build's loader points LD_LIBRARY_PATH at the bundle's libraries (its libssl,
    libz...); iptables and nft, run from here, must load the node's own."""
    if getattr(sys, "frozen", False):
        original = os.environ.pop("LD_LIBRARY_PATH_ORIG", None)
        if original is None:
            os.environ.pop("LD_LIBRARY_PATH", None)
        else:
            os.environ["LD_LIBRARY_PATH"] = original


def handle(request: Request, *, own_process: bool = False) -> str:
    """What the plugin prints for one request; raises CniError. ``own_process``: the plugin's executable
    (main), which takes SIGINT and SIGTERM over; a caller in-process keeps its own handlers and signal mask."""
    if request.command == "VERSION":
        return version_json()
    if left_alone_quietly(request):
        return result_json(request) if request.command == "ADD" else ""
    from istio_iptables.log import LogLevel, LogOptions, configure  # noqa: PLC0415

    if own_process:
        from istio_iptables.host import interrupts  # noqa: PLC0415

        interrupts.install()  # from here on, SIGTERM ends the run with one line (an apply rolls back first)
    plugin = parse_plugin_config(request.config)
    configure(LogOptions(level=plugin.log_level or LogLevel.INFO))
    try:
        if request.command == "DEL":
            delete(request, plugin)
            return ""
        config = pod_capture(request, plugin)
        if config is not None:
            if not os.path.exists(request.netns):
                raise CniError(CniError.INVALID_ENVIRONMENT, f"CNI_NETNS '{request.netns}': no such network namespace")
            (add if request.command == "ADD" else check)(config)
    except ConfigError as error:  # a pod annotation (InjectionError names it), or its proxyMetadata
        raise CniError(CniError.POD_SETTINGS, str(error)) from None
    except NoAddressError:
        # The CLI's remedy (--ipv6) is no plugin user's: here the plugin ran before the pod had an address.
        raise CniError(
            CniError.APPLY_FAILED,
            f"the pod has no usable IP address in its network namespace {request.netns}: {PROG} must come after "
            "the plugin that gives pods their addresses in the conflist's plugins",
        ) from None
    except (ApplyError, HostError) as error:
        raise CniError(CniError.APPLY_FAILED, str(error)) from None
    return result_json(request) if request.command == "ADD" else ""


def left_alone_quietly(request: Request) -> bool:
    """A pod the plugin leaves alone, known from the request alone, when nothing would be logged about it:
    answered with no further import. The settings' names are checked, their values only on the way to a
    capture (the installer checks them all before it writes them); with ``log_level`` debug, the full path
    runs and logs why the pod is left alone."""
    document = request.config
    excluded = document.get("exclude_namespaces", DEFAULT_EXCLUDED_NAMESPACES)
    quiet = str(document.get("log_level", "info")).lower() in QUIET_LEVELS
    if not quiet or set(document) - STANDARD_KEYS - SETTINGS or not isinstance(excluded, (list, tuple)):
        return False
    if request.command == "DEL" and not request.netns:
        return True  # the runtime's second DEL, on removing the sandbox: its namespace is gone
    return why_left_alone(request, excluded) is not None


def why_left_alone(request: Request, excluded_namespaces: tuple[str, ...] | list[object]) -> str | None:
    """Why the plugin leaves this pod alone, from the request alone; None when it is one to capture, or when
    only the Kubernetes API can tell (the runtime passed no annotations)."""
    pod = request.pod
    if pod is None:
        return f"container {request.container_id} is not a Kubernetes pod"
    if pod[0] in excluded_namespaces:
        return f"pod {pod[0]}/{pod[1]}: namespace excluded"
    annotations = given_annotations(request)
    reason = None if annotations is None else skip_reason(PodInfo(annotations))
    return None if reason is None else f"pod {pod[0]}/{pod[1]}: {reason}"


def _debug(message: str, *args: object) -> None:
    from istio_iptables.log import Log  # noqa: PLC0415 (loaded: the full path configured logging)

    Log(__name__).debug(message, *args)


def pod_capture(request: Request, plugin: PluginConfig) -> configuration.Config | None:
    """The Config of the pod's capture, or None when the plugin leaves the pod alone."""
    reason = why_left_alone(request, plugin.exclude_namespaces)
    if reason is not None or request.pod is None:
        _debug("left alone: %s", reason)  # debug: a runtime keeps a successful plugin's stderr nowhere
        return None
    namespace, name = request.pod
    config = capture_of(namespace, name, pod_info(request, plugin, namespace, name), request.netns, plugin)
    return None if config is None else pod_dns(config, request.dns_servers)


def capture_of(
    namespace: str, name: str, info: PodInfo, netns_path: str, plugin: PluginConfig
) -> configuration.Config | None:
    """The Config of a pod's capture from what is known of it, or None when the plugin leaves it alone: the one
    reading of a pod's annotations, for the plugin's ADD and CHECK and for the node agent's repair. The DNS
    servers are the caller's to set (``pod_dns``): the plugin has them from the runtime."""
    reason = skip_reason(info)  # what the API told beyond the annotations (labels, containers)
    if reason is not None:
        _debug("left alone: pod %s/%s: %s", namespace, name, reason)
        return None
    # The settings only now: most pods on a node are not captured, and they need not pay for them.
    settings = _settings(plugin)
    from istio_iptables.kube.capture import interception_mode  # noqa: PLC0415

    if interception_mode(info.annotations, settings) == "NONE":
        _debug("left alone: pod %s/%s: interception mode NONE", namespace, name)
        return None
    return capture_config(info, settings, netns_path, plugin)


def given_annotations(request: Request) -> dict[str, str] | None:
    """The pod's annotations the runtime passed (its pod-annotations capability), or None when it passed
    none. containerd passes a pod without annotations as null."""
    runtime_config = request.runtime_config
    if POD_ANNOTATIONS not in runtime_config:
        return None
    annotations = runtime_config[POD_ANNOTATIONS]
    if not isinstance(annotations, Mapping):
        return {}
    return {str(key): str(value) for key, value in annotations.items()}


def pod_info(request: Request, plugin: PluginConfig, namespace: str, name: str) -> PodInfo:
    annotations = given_annotations(request)
    if annotations is not None:
        return PodInfo(annotations)
    if not plugin.kubeconfig:
        raise CniError(
            CniError.POD_UNKNOWN,
            f"pod {namespace}/{name}: the runtime passed no {POD_ANNOTATIONS} and the plugin configuration "
            "names no kubeconfig (kubernetes.kubeconfig) to get them from",
        )
    from istio_iptables.cni.kubeapi import KubeError, get_pod  # noqa: PLC0415 (only runtimes without the capability)

    try:
        pod = get_pod(plugin.kubeconfig, namespace, name)
    except KubeError as error:
        raise CniError(CniError.POD_UNKNOWN, str(error)) from None
    return PodInfo(pod.annotations, pod.labels, pod.containers, pod.proxy_uid)


def _settings(plugin: PluginConfig) -> Settings:
    from istio_iptables.kube.capture import load_settings  # noqa: PLC0415

    try:
        return load_settings(values=plugin.values, mesh_config=plugin.mesh_config)
    except ConfigError as error:
        raise CniError(CniError.INVALID_CONFIG, f"plugin settings: {error}") from None


def capture_config(pod: PodInfo, settings: Settings, netns_path: str, plugin: PluginConfig) -> configuration.Config:
    """The Config the init container would run with (its argv, its proxyMetadata environment), working in
    the pod's namespace with the plugin's iptables variant."""
    from istio_iptables.kube import capture  # noqa: PLC0415
    from istio_iptables.kube.settings import go_text  # noqa: PLC0415

    flags = capture.capture_args(pod.annotations, settings, proxy_uid=pod.proxy_uid)
    metadata = capture.proxy_config(pod.annotations, settings).get("proxyMetadata") or {}
    environ = {str(key): go_text(value) for key, value in metadata.items()}
    try:
        config = capture.parse_capture_args(flags, environ)
    except ConfigError as error:
        raise ConfigError(_in_proxy_metadata_terms(pod.annotations, flags, environ, error)) from None
    return replace(config, network_namespace=netns_path, force_iptables_binary=plugin.iptables, cni_mode=True)


def _in_proxy_metadata_terms(
    annotations: Mapping[str, str], flags: list[str], environ: Mapping[str, str], error: ConfigError
) -> str:
    """The CLI names a refused environment variable by the flag it stands for; here it is a proxyMetadata
    entry, of the pod's proxy config annotation or of the plugin's mesh_config."""
    from istio_iptables.capture.config import shown  # noqa: PLC0415
    from istio_iptables.kube import capture  # noqa: PLC0415

    for key, value in environ.items():
        try:
            capture.parse_capture_args(flags, {key: value})
        except ConfigError as alone:
            overlay = capture.proxy_config_overlay(annotations.get(capture.PROXY_CONFIG, ""))
            where = (
                f"the pod's annotation '{capture.PROXY_CONFIG}'"
                if key in (overlay.get("proxyMetadata") or {})
                else "plugin setting mesh_config defaultConfig.proxyMetadata"
            )
            reason = str(alone).rpartition(f"'{shown(value)}': ")[2]
            return f"invalid value '{shown(value)}' for proxyMetadata {key} ({where}): {reason}"
    return str(error)


def pod_dns(config: configuration.Config, servers: list[str] | None) -> configuration.Config:
    """The DNS servers the init container would capture: the ``nameserver`` lines of the pod's resolv.conf,
    which the runtime writes from the pod's DNS config. The plugin runs on the node, whose resolv.conf is not
    the pod's; the runtime hands it the pod's DNS config through the ``dns`` capability (containerd's CRI
    does). A runtime that passes none gets all DNS captured, as Istio's plugin always does."""
    if not config.redirect_dns or config.capture_all_dns or config.dns_servers is not None:
        return config  # no DNS capture, or one that reads no resolv.conf
    if servers is None:
        _debug("the runtime passed no %s capability: capturing DNS to every server", DNS)
        return replace(config, capture_all_dns=True)
    from istio_iptables.host.hostfacts import nameserver_addresses  # noqa: PLC0415

    return replace(config, dns_servers=tuple(nameserver_addresses(servers, f"the runtime's {DNS} capability")))


def add(config: configuration.Config) -> None:
    from istio_iptables.apply import apply, apply_native  # noqa: PLC0415
    from istio_iptables.host.hostfacts import enter  # noqa: PLC0415 (plan, host facts, namespaces: only for pods to capture)

    _, plan = enter(config, changes_system=True)
    (apply_native if config.native_nftables else apply)(config, plan)


def check(config: configuration.Config) -> None:
    from istio_iptables.explain.status import render_status_text, status  # noqa: PLC0415
    from istio_iptables.host.hostfacts import enter  # noqa: PLC0415

    _, plan = enter(config, changes_system=False)
    report = status(config, plan)
    if not report.in_sync:
        raise CniError(CniError.DRIFT, "the pod's rules differ from its plan", render_status_text(report))


def delete(request: Request, plugin: PluginConfig) -> None:
    """Remove every rule, chain and route of ours from the pod; nothing to do when its namespace is gone (a
    runtime's second DEL, on removing the sandbox, comes without one) or for a pod the plugin leaves alone."""
    if not request.netns or not os.path.exists(request.netns):
        _debug("container %s: network namespace gone, nothing to remove", request.container_id)
        return
    reason = why_left_alone(request, plugin.exclude_namespaces)
    if reason is not None:
        _debug("left alone: %s", reason)  # the ADD left it alone too (the pod's own istio-init's go with it)
        return
    from istio_iptables.capture import config as configuration  # noqa: PLC0415
    from istio_iptables.host.hostfacts import enter  # noqa: PLC0415

    native = _settings(plugin).value("global.nativeNftables") is True
    config = configuration.Config(
        network_namespace=request.netns,
        cleanup_only=True,
        native_nftables=native,
        force_iptables_binary=plugin.iptables,
        cni_mode=True,
        ipv6=True,
    )
    try:
        _, plan = enter(config, changes_system=True)
    except ApplyError:
        if not os.path.exists(request.netns):
            return  # gone between the look and the open
        raise
    from istio_iptables.apply import apply, apply_native  # noqa: PLC0415

    (apply_native if native else apply)(config, plan)
