"""The one mapping from a pod's annotations, the injector's values and the mesh config to the capture argv,
as Istio's injection template renders it (``injection-template.yaml``, the ``istio-init`` container's args).

Every value is checked twice before it is written: by Istio's own annotation checks (``pkg/kube/inject/
validate.go``, whose wording the messages keep) and by this program's Config parser, so an injected pod never
carries an argv its init container would refuse. The CNI plugin builds the same argv and parses it with the
same parser (``parse_capture_args``), so a pod gets the same rules whichever way it is captured.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence

from istio_iptables.capture import config as configuration
from istio_iptables.capture.config import plain_run
from istio_iptables.errors import ConfigError
from istio_iptables.kube.settings import Settings, go_text
from istio_iptables.records import record

TYPE_CHECKING = False  # typing only for the type checker: the CNI plugin loads this module per captured pod
if TYPE_CHECKING:
    from typing import Any

INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
KUBEVIRT_INTERFACES = "traffic.sidecar.istio.io/kubevirtInterfaces"
REROUTE_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"
EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces"
STATUS_PORT = "status.sidecar.istio.io/port"
AGENT_LOG_LEVEL = "sidecar.istio.io/agentLogLevel"
PROXY_CONFIG = "proxy.istio.io/config"
READINESS_INITIAL_DELAY = "readiness.status.sidecar.istio.io/initialDelaySeconds"
READINESS_PERIOD = "readiness.status.sidecar.istio.io/periodSeconds"
READINESS_FAILURE_THRESHOLD = "readiness.status.sidecar.istio.io/failureThreshold"
PROMETHEUS_MERGE_METRICS = "prometheus.istio.io/merge-metrics"
RECORDED_PROXY_UID = "istio-iptables.io/proxy-uid"
"""This injector's own annotation, written in CNI mode only when the init argv's ``-u`` is not the default:
the UID comes from the ``istio-proxy`` container's securityContext, which a runtime does not hand a CNI plugin
(only the pod's annotations). Read back here, it gives the plugin the init container's ``-u`` exactly."""

RECORDED_PROXY_PORTS = "istio-iptables.io/proxy-ports"
"""This injector's own annotation, written in CNI mode only when the template's proxy gives the capture other
ports than Istio's: ``{"outbound":P,"inbound":Z,"own":[PORT,...]}``, the init argv's ``-p``, ``-z`` and the
proxy's own ports that start its ``-d``. A runtime hands a CNI plugin the annotations only, not the template
or the proxy's container; read back here, it gives the plugin the init container's ports exactly."""

DEFAULT_PROXY_UID = 1337
ALWAYS_EXCLUDED_INBOUND = "15090,15021"
"""Envoy's Prometheus port and the agent's health port: the template writes them before the status port."""
DEFAULT_LISTENERS = (15001, 15006)
"""Istio's outbound and inbound listeners (``meshConfig.proxyListenPort``, ``proxyInboundListenPort``)."""


@record
class Sidecar:
    """What the capture takes from the proxy the template gives the pod, so that the two cannot disagree."""

    uid: int
    """``-u``: the proxy's runAsUser, or its runAsGroup for a root proxy (the rules match the group too)."""
    outbound: int
    """``-p``: the proxy's outbound listener."""
    inbound: int
    """``-z``: the proxy's inbound listener."""
    own_ports: tuple[int, ...]
    """The proxy's own ports, first in ``-d`` (in place of Istio's 15090,15021)."""


def recorded_ports_text(sidecar: Sidecar) -> str:
    """``RECORDED_PROXY_PORTS``'s value for the ports the capture takes from ``sidecar``."""
    ports = {"outbound": sidecar.outbound, "inbound": sidecar.inbound, "own": list(sidecar.own_ports)}
    return json.dumps(ports, separators=(",", ":"))


def recorded_ports(text: str) -> tuple[int, int, tuple[int, ...]]:
    """The outbound and inbound listeners and the proxy's own ports of a ``RECORDED_PROXY_PORTS`` value;
    InjectionError naming the annotation when it is not one this injector writes."""
    try:
        ports = json.loads(text)
    except ValueError:
        ports = None
    valid = (
        isinstance(ports, dict)
        and sorted(ports) == ["inbound", "outbound", "own"]
        and isinstance(ports["own"], list)
        and all(_is_port(port) for port in [ports["outbound"], ports["inbound"], *ports["own"]])
    )
    if not valid:
        raise InjectionError(
            f"invalid value '{configuration.shown(text)}' for annotation '{RECORDED_PROXY_PORTS}': must be "
            '{"outbound":PORT,"inbound":PORT,"own":[PORT,...]} with ports 1-65535, as the injector writes it'
        )
    return ports["outbound"], ports["inbound"], tuple(ports["own"])


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535


class InjectionError(ConfigError):
    """The injector refuses a workload: the message names the workload, the annotation or setting, the value."""

    def __init__(self, message: str) -> None:
        # One line whatever the annotations held: parsers' reasons may quote a value unescaped.
        super().__init__("".join(char if char.isprintable() else repr(char)[1:-1] for char in message))


# ---- Istio's annotation checks (validate.go), with its wording ------------------------------------------


def _go_port(text: str) -> None:
    """Go's ``strconv.ParseUint(strings.TrimSpace(p), 10, 16)``: 0 passes, as in Istio."""
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit()) or int(stripped) > 65535:
        raise ValueError(f"failed parsing port '{configuration.shown(text)}'")


def _port_list(what: str, wildcard: bool) -> Callable[[str], None]:
    def check(text: str) -> None:
        if wildcard and text == "*":
            return
        if text.strip():
            for port in text.strip().split(","):
                try:
                    _go_port(port)
                except ValueError as error:
                    raise ValueError(f"{what} invalid: {error}") from None

    return check


def _cidr_list(what: str, wildcard: bool) -> Callable[[str], None]:
    def check(text: str) -> None:
        if wildcard and text == "*":
            return
        for cidr in text.split(",") if text else ():
            try:
                configuration.parse_cidr(cidr)
            except ValueError as error:
                raise ValueError(
                    f"{what} invalid: failed parsing cidr '{configuration.shown(cidr)}': {error}"
                ) from None

    return check


def _uint32(text: str) -> None:
    if not (text.isascii() and text.isdigit()) or int(text) > 0xFFFFFFFF:
        raise ValueError(f'strconv.ParseUint: parsing "{configuration.shown(text)}": invalid syntax')


def _go_bool(text: str) -> None:
    configuration.parse_go_bool(text)


def _interception_mode(text: str) -> None:
    if text not in ("REDIRECT", "TPROXY", "NONE"):
        raise ValueError(f"interceptionMode invalid, use REDIRECT,TPROXY,NONE: {text}")


def _status_port(text: str) -> None:
    try:
        _go_port(text)
    except ValueError as error:
        raise ValueError(f"excludeInboundPorts invalid: {error}") from None


def _proxy_config_check(text: str) -> None:
    proxy_config_overlay(text)


ISTIO_CHECKS: Mapping[str, Callable[[str], None]] = {
    INTERCEPTION_MODE: _interception_mode,
    STATUS_PORT: _status_port,
    READINESS_INITIAL_DELAY: _uint32,
    READINESS_PERIOD: _uint32,
    READINESS_FAILURE_THRESHOLD: _uint32,
    INCLUDE_OUTBOUND_IP_RANGES: _cidr_list("includeIPRanges", wildcard=True),
    EXCLUDE_OUTBOUND_IP_RANGES: _cidr_list("excludeIPRanges", wildcard=False),
    INCLUDE_INBOUND_PORTS: _port_list("includeInboundPorts", wildcard=True),
    EXCLUDE_INBOUND_PORTS: _port_list("excludeInboundPorts", wildcard=False),
    EXCLUDE_OUTBOUND_PORTS: _port_list("excludeOutboundPorts", wildcard=False),
    PROMETHEUS_MERGE_METRICS: _go_bool,
    PROXY_CONFIG: _proxy_config_check,
}


def check_annotations(annotations: Mapping[str, str]) -> None:
    """Istio's checks of the annotations it knows; every failure listed in one message (Istio lists them all)."""
    problems = []
    for name in sorted(set(annotations) & set(ISTIO_CHECKS)):
        value = annotations[name]
        try:
            ISTIO_CHECKS[name](value)
        except ValueError as error:
            problems.append(f"invalid value '{configuration.shown(value)}' for annotation '{name}': {error}")
    if problems:
        raise InjectionError("; ".join(problems))


# ---- the proxy config: the mesh's defaultConfig, overlaid by the pod's proxy.istio.io/config ------------


def proxy_config_overlay(text: str) -> Mapping[str, Any]:
    """The ``proxy.istio.io/config`` annotation's ProxyConfig (YAML), checked for the fields injection reads."""
    import yaml  # noqa: PLC0415 (only pods with this annotation need it)

    try:
        overlay = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"failed to convert to apply proxy config: {_first_line(error)}") from None
    overlay = {} if overlay is None else overlay
    if not isinstance(overlay, Mapping):
        raise ValueError("failed to convert to apply proxy config: not a map of ProxyConfig fields")
    mode = overlay.get("interceptionMode")
    if mode is not None:
        _interception_mode(go_text(mode))
    metadata = overlay.get("proxyMetadata")
    if metadata is not None and not (
        isinstance(metadata, Mapping) and all(isinstance(value, (str, int, float, bool)) for value in metadata.values())
    ):
        raise ValueError("failed to convert to apply proxy config: proxyMetadata must map names to strings")
    return overlay


def proxy_config(annotations: Mapping[str, str], settings: Settings) -> Mapping[str, Any]:
    """The pod's effective ProxyConfig: the mesh's ``defaultConfig`` with the annotation's fields laid over
    it, ``proxyMetadata`` merged key by key (as Istio's ``mesh.ApplyProxyConfig``)."""
    base = dict(settings.mesh_value("defaultConfig") or {})
    text = annotations.get(PROXY_CONFIG)
    if text is None:
        return base
    try:
        overlay = proxy_config_overlay(text)
    except ValueError as error:
        raise InjectionError(
            f"invalid value '{configuration.shown(text)}' for annotation '{PROXY_CONFIG}': {error}"
        ) from None
    merged = {**base, **overlay}
    merged["proxyMetadata"] = {**(base.get("proxyMetadata") or {}), **(overlay.get("proxyMetadata") or {})}
    return merged


def interception_mode(annotations: Mapping[str, str], settings: Settings) -> str:
    return annotations.get(INTERCEPTION_MODE) or go_text(proxy_config(annotations, settings).get("interceptionMode"))


def cni_enabled(settings: Settings) -> bool:
    """Istio's CNI plugin captures, and the injector adds only the ``istio-validation`` probe."""
    return settings.cni


# ---- the argv ------------------------------------------------------------------------------------------


def capture_args(
    annotations: Mapping[str, str], settings: Settings, *, proxy_uid: int | None = None, sidecar: Sidecar | None = None
) -> list[str]:
    """The capture flags the injector writes (``-p -z -u -m -i -x -b -d``, then the optional ones), without
    the leading ``istio-iptables`` word and without the validation/CNI-mode flags. ``proxy_uid`` is the
    ``runAsUser`` of an ``istio-proxy`` container the user put in the pod; a UID the injector recorded
    (``RECORDED_PROXY_UID``, the CNI plugin's case) wins over it. Raises InjectionError naming the
    annotation (or setting) and the value when Istio's checks or this program's Config parser refuse one, and
    for a pod whose ``interception_mode`` is NONE (no capture: callers skip those first). With ``sidecar`` (the
    proxy the template gives), ``-u``, ``-p``, ``-z`` and the start of ``-d`` come from it instead."""
    return _arguments(annotations, settings, proxy_uid, (), sidecar)


def init_args(
    annotations: Mapping[str, str], settings: Settings, *, proxy_uid: int | None = None, sidecar: Sidecar | None = None
) -> list[str]:
    """The ``istio-init`` (or, in CNI mode, ``istio-validation``) container's args, exactly as Istio's
    injector renders them, leading word included."""
    if settings.cni:
        mode_flags: tuple[str, ...] = ("--run-validation", "--skip-rule-apply")
    elif settings.value("global.proxy_init.forceApplyIptables") is True:
        mode_flags = ("--force-apply",)
    else:
        mode_flags = ()
    return ["istio-iptables", *_arguments(annotations, settings, proxy_uid, mode_flags, sidecar)]


def parse_capture_args(args: list[str], environ: Mapping[str, str] | None = None) -> configuration.Config:
    """The Config the CLI makes of an argv ``capture_args`` or ``init_args`` wrote (leading word or not), in
    ``environ`` (the init container's environment: its proxyMetadata; none by default)."""
    given = plain_run(args[1:] if args[:1] == ["istio-iptables"] else args)
    if given is None:
        raise InjectionError(f"the capture arguments {args} are not a plain istio-iptables command line")
    return configuration.load(given, environ or {})


def load_settings(
    sets: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    mesh_config: Mapping[str, Any] | None = None,
) -> Settings:
    """The injector's settings (``Settings.from_sources``), refused when they would give every pod a bad argv."""
    settings = Settings.from_sources(sets, values, mesh_config)
    check_settings(settings)
    return settings


def check_settings(settings: Settings) -> None:
    """Refuse settings that would give every pod a bad argv, naming the setting (before any workload)."""
    # A mesh-wide NONE captures nothing by default, but a pod may still ask for a mode: check the rest.
    none = interception_mode({}, settings) == "NONE"
    capture_args({INTERCEPTION_MODE: "REDIRECT"} if none else {}, settings)


def exclude_inbound_port(status_port: str, excluded: str) -> str:
    """Istio's ``excludeInboundPort``: the status port appended to the exclusions unless already in them or 0."""
    port = status_port.strip()
    if not port or port == "0":
        return excluded
    kept = []
    for item in excluded.split(","):
        if item == port:
            return excluded
        if item.strip():
            kept.append(item.strip())
    return ",".join([*kept, port])


_KEY_OF_FLAG = {flag: setting.key for setting in configuration.SETTINGS for flag in setting.flags}


def _arguments(
    annotations: Mapping[str, str],
    settings: Settings,
    proxy_uid: int | None,
    mode_flags: tuple[str, ...],
    sidecar: Sidecar | None,
) -> list[str]:
    check_annotations(annotations)

    def pick(annotation: str, value_path: str) -> tuple[str, str]:
        if annotation in annotations:
            return annotations[annotation], f"annotation '{annotation}'"
        return settings.text(value_path), f"setting values.{value_path}"

    def mesh_port(path: str, default: int) -> tuple[str, str]:
        return str(settings.mesh_value(path) or default), f"setting meshConfig.{path}"

    mode = interception_mode(annotations, settings)
    if mode == "NONE":
        raise InjectionError("interception mode NONE asks for no capture: there is no capture argv")
    mode_origin = (
        f"annotation '{INTERCEPTION_MODE}'"
        if INTERCEPTION_MODE in annotations
        else "the proxy config's interceptionMode"
    )
    status_port, status_origin = pick(STATUS_PORT, "global.proxy.statusPort")
    excluded, excluded_origin = pick(EXCLUDE_INBOUND_PORTS, "global.proxy.excludeInboundPorts")
    excluded_with_status = exclude_inbound_port(status_port, excluded)
    if sidecar is None and RECORDED_PROXY_PORTS in annotations:
        # The ports the injector recorded are the init argv's, whatever the settings here say.
        outbound, inbound, own = recorded_ports(annotations[RECORDED_PROXY_PORTS])
        recorded = f"annotation '{RECORDED_PROXY_PORTS}'"
        listeners = [("-p", str(outbound), recorded), ("-z", str(inbound), recorded)]
        uid, own_ports = _proxy_uid(annotations, proxy_uid), ",".join(map(str, own))
    elif sidecar is None:
        listeners = [
            ("-p", *mesh_port("proxyListenPort", DEFAULT_LISTENERS[0])),
            ("-z", *mesh_port("proxyInboundListenPort", DEFAULT_LISTENERS[1])),
        ]
        uid, own_ports = _proxy_uid(annotations, proxy_uid), ALWAYS_EXCLUDED_INBOUND
    else:
        listeners = [
            ("-p", str(sidecar.outbound), "the template's listeners.outbound"),
            ("-z", str(sidecar.inbound), "the template's listeners.inbound"),
        ]
        uid = (str(sidecar.uid), "the proxy's securityContext")
        own_ports = ",".join(map(str, sidecar.own_ports))
    inbound_exclusions = ",".join(part for part in (own_ports, excluded_with_status) if part)
    entries: list[tuple[str, str, str]] = [
        *listeners,
        ("-u", *uid),
        ("-m", mode, mode_origin),
        ("-i", *pick(INCLUDE_OUTBOUND_IP_RANGES, "global.proxy.includeIPRanges")),
        ("-x", *pick(EXCLUDE_OUTBOUND_IP_RANGES, "global.proxy.excludeIPRanges")),
        ("-b", *pick(INCLUDE_INBOUND_PORTS, "global.proxy.includeInboundPorts")),
        ("-d", inbound_exclusions, f"{status_origin} with {excluded_origin}"),
    ]
    for flag, annotation, path in (
        ("-q", INCLUDE_OUTBOUND_PORTS, "global.proxy.includeOutboundPorts"),
        ("-o", EXCLUDE_OUTBOUND_PORTS, "global.proxy.excludeOutboundPorts"),
    ):
        if annotation in annotations or settings.text(path):
            entries.append((flag, *pick(annotation, path)))
    # istio.io/reroute-virtual-interfaces is the newer name of kubevirtInterfaces and wins over it.
    for annotation in (REROUTE_VIRTUAL_INTERFACES, KUBEVIRT_INTERFACES):
        if annotation in annotations:
            entries.append(("-k", annotations[annotation], f"annotation '{annotation}'"))
            break
    if EXCLUDE_INTERFACES in annotations:
        entries.append(("-c", annotations[EXCLUDE_INTERFACES], f"annotation '{EXCLUDE_INTERFACES}'"))
    entries.append(("--log_output_level", *pick(AGENT_LOG_LEVEL, "global.logging.level")))

    args = []
    for flag, value, _ in entries:
        args += [f"{flag}={value}"] if flag.startswith("--") else [flag, value]
    if settings.value("global.logAsJson") is True:
        args.append("--log_as_json")
    args += mode_flags
    if settings.value("global.nativeNftables") is True:
        args.append("--native-nftables")
    try:
        parse_capture_args(args)
    except ConfigError as error:
        # Only now each value on its own, to name where the refused one came from (the exclusions before
        # the -d they are part of); one parse of the whole argv is the common, quick case.
        _checked("-d", excluded, excluded_origin)
        for flag, value, origin in entries:
            _checked(flag, value, origin)
        raise InjectionError(str(error)) from None
    return args


def _proxy_uid(annotations: Mapping[str, str], proxy_uid: int | None) -> tuple[str, str]:
    # The recorded UID is the argv's -u, quirks applied (the injector ignores one in its input).
    if RECORDED_PROXY_UID in annotations:
        return annotations[RECORDED_PROXY_UID], f"annotation '{RECORDED_PROXY_UID}'"
    # Istio's template writes "1337" when the pod's own annotation asks for TPROXY; a mesh-wide TPROXY
    # default does not trigger it (the goldens keep this quirk: proxy-override-runas.tproxy has -u 1234).
    if annotations.get(INTERCEPTION_MODE) == "TPROXY" or not proxy_uid:
        return str(DEFAULT_PROXY_UID), "the proxy UID"
    return str(proxy_uid), "the istio-proxy container's securityContext.runAsUser"


def _checked(flag: str, value: str, origin: str) -> None:
    """The value through the CLI's own parser for ``flag``; InjectionError naming its origin if refused."""
    try:
        configuration.load({_KEY_OF_FLAG[flag]: value}, {})
    except ConfigError as error:
        raise InjectionError(f"invalid value '{configuration.shown(value)}' for {origin}: {error}") from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
