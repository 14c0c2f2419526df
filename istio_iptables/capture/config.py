"""Flags and environment variables: the one table that binds them, and strict parsing into a ``Config``.

Precedence is Istio's: command line, then the extra environment variable, then the primary one, then the
default. Unlike Istio, which pastes values into rules unchecked, every value is parsed here; a bad one raises
``ConfigError`` naming the flag (or variable) and the value, before anything is built or touched.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Mapping

from istio_iptables.capture.model import IPAddress, IPNet
from istio_iptables.errors import PROG, ConfigError
from istio_iptables.log import LogLevel, LogOptions
from istio_iptables.records import record

TYPE_CHECKING = False  # typing is not imported at run time (records.py says why)
if TYPE_CHECKING:
    from typing import TypeVar

    T = TypeVar("T")
    E = TypeVar("E", bound=enum.Enum)


class All(enum.Enum):
    """``*``: every port, every CIDR, every group."""

    ALL = "*"


ALL = All.ALL
WILDCARD = ALL.value


@record
class Setting:
    key: str
    """Name of the value passed from the command line, e.g. ``inbound_capture_port``."""
    flags: tuple[str, ...]
    """Long flag first, then the short one; empty for settings that only come from the environment."""
    envvars: tuple[str, ...] = ()
    """Primary variable first; each later one overrides those before it."""
    default: str = ""
    help: str = ""
    switch: bool = False
    """A flag without a value (``--dry-run``)."""
    negation: str = ""
    """For a switch that can be turned off, e.g. ``--no-reconcile``."""
    metavar: str = "VALUE"

    @property
    def off(self) -> str:
        """A switch's ``--no-...`` form, so a command line can turn off what the environment turned on."""
        return self.negation or f"--no-{self.flags[0][2:]}"

    @property
    def label(self) -> str:
        names = [*reversed(self.flags)] if len(self.flags) > 1 else list(self.flags)
        return "/".join(names) or self.envvars[0]


SETTINGS: tuple[Setting, ...] = (
    # ---- Istio's flags, with Istio's names, defaults and environment variables -----------------------
    Setting(
        "envoy_port",
        ("--envoy-port", "-p"),
        (),
        "15001",
        "Port to which all outbound TCP traffic is redirected (the proxy's outbound listener).",
        metavar="PORT",
    ),
    Setting(
        "inbound_capture_port",
        ("--inbound-capture-port", "-z"),
        ("INBOUND_CAPTURE_PORT",),
        "15006",
        "Port to which all inbound TCP traffic is redirected.",
        metavar="PORT",
    ),
    Setting(
        "inbound_tunnel_port",
        ("--inbound-tunnel-port", "-e"),
        ("INBOUND_TUNNEL_PORT",),
        "15008",
        "HBONE tunnel port; never redirected.",
        metavar="PORT",
    ),
    Setting(
        "proxy_uid",
        ("--proxy-uid", "-u"),
        ("PROXY_UID",),
        "",
        "Comma list of UIDs whose traffic is not redirected. Default: the UID of $ENVOY_USER, else 1337.",
        metavar="UIDS",
    ),
    Setting(
        "proxy_gid",
        ("--proxy-gid", "-g"),
        ("PROXY_GID",),
        "",
        "Comma list of GIDs whose traffic is not redirected. Default: the proxy UIDs.",
        metavar="GIDS",
    ),
    Setting(
        "inbound_interception_mode",
        ("--istio-inbound-interception-mode", "-m"),
        ("ISTIO_INBOUND_INTERCEPTION_MODE",),
        "",
        "Inbound interception mode: REDIRECT or TPROXY (empty means REDIRECT).",
        metavar="MODE",
    ),
    Setting(
        "inbound_ports",
        ("--istio-inbound-ports", "-b"),
        ("ISTIO_INBOUND_PORTS",),
        "",
        "Comma list of inbound ports to capture, or '*' for all; empty disables inbound capture.",
        metavar="PORTS|*",
    ),
    Setting(
        "local_exclude_ports",
        ("--istio-local-exclude-ports", "-d"),
        ("ISTIO_LOCAL_EXCLUDE_PORTS",),
        "",
        "Comma list of inbound ports to exclude; only applies when -b is '*'.",
        metavar="PORTS",
    ),
    Setting(
        "exclude_interfaces",
        ("--istio-exclude-interfaces", "-c"),
        ("ISTIO_EXCLUDE_INTERFACES",),
        "",
        "Comma list of interfaces whose traffic is never captured.",
        metavar="NICS",
    ),
    Setting(
        "service_cidr",
        ("--istio-service-cidr", "-i"),
        ("ISTIO_SERVICE_CIDR",),
        "",
        "Comma list of outbound CIDRs to capture, or '*' for all; empty disables outbound CIDR capture.",
        metavar="CIDRS|*",
    ),
    Setting(
        "service_exclude_cidr",
        ("--istio-service-exclude-cidr", "-x"),
        ("ISTIO_SERVICE_EXCLUDE_CIDR",),
        "",
        "Comma list of outbound CIDRs never captured (checked before -i and -q).",
        metavar="CIDRS",
    ),
    Setting(
        "outbound_ports",
        ("--istio-outbound-ports", "-q"),
        ("ISTIO_OUTBOUND_PORTS",),
        "",
        "Comma list of outbound TCP ports always captured, whatever the destination.",
        metavar="PORTS",
    ),
    Setting(
        "local_outbound_ports_exclude",
        ("--istio-local-outbound-ports-exclude", "-o"),
        ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",),
        "",
        "Comma list of outbound ports (TCP and UDP) never captured.",
        metavar="PORTS",
    ),
    Setting(
        "kube_virt_interfaces",
        ("--kube-virt-interfaces", "-k"),
        ("KUBE_VIRT_INTERFACES",),
        "",
        "Comma list of virtual interfaces whose inbound traffic is treated as outbound.",
        metavar="NICS",
    ),
    Setting(
        "inbound_tproxy_mark",
        ("--istio-inbound-tproxy-mark", "-t"),
        ("ISTIO_INBOUND_TPROXY_MARK",),
        "1337",
        "Packet mark of TPROXY-intercepted traffic (decimal).",
        metavar="MARK",
    ),
    Setting(
        "inbound_tproxy_route_table",
        ("--istio-inbound-tproxy-route-table", "-r"),
        ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE",),
        "133",
        "Routing table of TPROXY-marked packets (decimal).",
        metavar="TABLE",
    ),
    Setting(
        "dry_run",
        ("--dry-run", "-n"),
        ("DRY_RUN",),
        "false",
        "Print the rules instead of applying them; needs neither root nor iptables.",
        switch=True,
    ),
    Setting(
        "iptables_probe_port",
        ("--iptables-probe-port",),
        ("IPTABLES_PROBE_PORT",),
        "15002",
        "Original destination port the validation probe connects to.",
        metavar="PORT",
    ),
    Setting(
        "probe_timeout",
        ("--probe-timeout",),
        ("PROBE_TIMEOUT",),
        "5s",
        "Overall timeout of the validation probe (Go duration, e.g. 5s, 1m30s).",
        metavar="DURATION",
    ),
    Setting(
        "skip_rule_apply",
        ("--skip-rule-apply",),
        ("SKIP_RULE_APPLY",),
        "false",
        "Apply no rules and no routes (e.g. to run only the validation).",
        switch=True,
    ),
    Setting(
        "run_validation",
        ("--run-validation",),
        ("RUN_VALIDATION",),
        "false",
        "Check that the rules redirect a probe connection; exit 126 if they do not.",
        switch=True,
    ),
    Setting(
        "redirect_dns",
        ("--redirect-dns",),
        ("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"),
        "false",
        "Redirect DNS (TCP and UDP port 53) to the agent on 15053.",
        switch=True,
    ),
    Setting(
        "drop_invalid",
        ("--drop-invalid",),
        ("DROP_INVALID", "INVALID_DROP"),
        "false",
        "Drop packets conntrack sees as INVALID.",
        switch=True,
    ),
    Setting(
        "dual_stack",
        ("--dual-stack",),
        ("DUAL_STACK", "ISTIO_DUAL_STACK"),
        "false",
        "Istio: detect IPv6 from any address, not only the first. Here detection always does (see --ipv6).",
        switch=True,
    ),
    Setting(
        "capture_all_dns",
        ("--capture-all-dns",),
        ("CAPTURE_ALL_DNS",),
        "false",
        "With --redirect-dns, capture DNS to every server, not only the resolv.conf ones.",
        switch=True,
    ),
    Setting(
        "network_namespace",
        ("--network-namespace",),
        ("NETWORK_NAMESPACE",),
        "",
        "Network namespace to work in: a name under /var/run/netns or a path.",
        metavar="NAME|PATH",
    ),
    Setting(
        "cni_mode",
        ("--cni-mode",),
        ("CNI_MODE",),
        "false",
        "Run as the istio-cni plugin does (pod-scoped xtables lock).",
        switch=True,
    ),
    Setting(
        "reconcile",
        ("--reconcile",),
        ("RECONCILE",),
        "true",
        "Repair drifted rules atomically; --no-reconcile fails on drift instead, as Istio does.",
        switch=True,
        negation="--no-reconcile",
    ),
    Setting(
        "cleanup_only",
        ("--cleanup-only",),
        ("CLEANUP_ONLY",),
        "false",
        "Remove every rule, chain and route this program may have created, and apply nothing.",
        switch=True,
    ),
    Setting(
        "force_apply",
        ("--force-apply",),
        ("FORCE_APPLY",),
        "false",
        "Apply even when the live rules already match.",
        switch=True,
    ),
    Setting(
        "native_nftables",
        ("--native-nftables",),
        ("NATIVE_NFTABLES",),
        "false",
        "Use native nftables instead of iptables.",
        switch=True,
    ),
    Setting(
        "force_iptables_binary",
        ("--force-iptables-binary",),
        ("FORCE_IPTABLES_BINARY",),
        "",
        "Use iptables-legacy ('legacy') or iptables-nft ('nft') without detection.",
        metavar="legacy|nft",
    ),
    Setting(
        "allow_host_namespace",
        ("--allow-host-namespace",),
        ("ALLOW_HOST_NAMESPACE",),
        "false",
        "Allow changing the network namespace of PID 1 outside Kubernetes (a VM); refused otherwise, since "
        "that is the host's own network.",
        switch=True,
    ),
    # ---- Istio's environment-only settings, with flags of their own here --------------------------------
    Setting(
        "outbound_owner_groups",
        ("--outbound-owner-groups",),
        ("ISTIO_OUTBOUND_OWNER_GROUPS",),
        "*",
        "Comma list of groups (names or GIDs) whose outbound traffic is captured, or '*' for all.",
        metavar="GROUPS|*",
    ),
    Setting(
        "outbound_owner_groups_exclude",
        ("--outbound-owner-groups-exclude",),
        ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",),
        "",
        "Comma list of groups whose outbound traffic is not captured (only with groups '*').",
        metavar="GROUPS",
    ),
    Setting(
        "host_ipv4_loopback_cidr",
        ("--host-ipv4-loopback-cidr",),
        ("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",),
        "127.0.0.1/32",
        "IPv4 loopback CIDR of the pod (loopback, /8 to /32).",
        metavar="CIDR",
    ),
    Setting("envoy_user", (), ("ENVOY_USER",), "istio-proxy", "User whose UID is the default --proxy-uid."),
    Setting("dry_run_file_path", (), ("DRY_RUN_FILE_PATH",), "", "Dry run: also write Istio's command log here."),
    # ---- host inputs Istio reads implicitly, as flags so every output is reproducible ------------------
    Setting(
        "ipv6",
        ("--ipv6",),
        (),
        "detect",
        "Program IPv6 rules (--no-ipv6: IPv4 only). Default: when the namespace has a non-link-local IPv6 address.",
        switch=True,
        negation="--no-ipv6",
    ),
    Setting(
        "dns_servers",
        ("--dns-servers",),
        (),
        "",
        "Comma list of DNS server addresses to capture; overrides the nameservers of --resolv-conf.",
        metavar="ADDRESSES",
    ),
    Setting(
        "resolv_conf",
        ("--resolv-conf",),
        (),
        "/etc/resolv.conf",
        "Where DNS servers are read from.",
        metavar="PATH",
    ),
    # ---- output and backend choices of this implementation -------------------------------------------
    Setting(
        "match_sets",
        ("--match-sets",),
        (),
        "false",
        "Match port and CIDR lists with one set lookup each (ipset; nft sets) instead of a rule per entry.",
        switch=True,
    ),
    Setting(
        "rule_comments",
        ("--rule-comments",),
        (),
        "false",
        "Give every rule a comment saying what it is for (-m comment; nft comment). Off: Istio's exact rules.",
        switch=True,
    ),
    Setting(
        "dry_run_format",
        ("--dry-run-format",),
        (),
        "restore",
        "Dry-run output: restore (iptables-restore payloads), commands, or json.",
        metavar="restore|commands|json",
    ),
    Setting(
        "backend",
        ("--backend",),
        (),
        "restore",
        "How rules are applied: restore (iptables-restore) or libiptc (python-iptables, legacy only).",
        metavar="restore|libiptc",
    ),
    # ---- Istio's logging flags, as the sidecar injector passes them -----------------------------------
    Setting(
        "log_output_level",
        ("--log_output_level",),
        (),
        "default:info",
        "Log level, as scope:level[,scope:level]; levels debug, info, warn, error, fatal, none.",
        metavar="LEVELS",
    ),
    Setting("log_as_json", ("--log_as_json",), (), "false", "Write logs as JSON lines.", switch=True),
    Setting(
        "log_target",
        ("--log_target",),
        (),
        "stderr",
        "Comma list of log destinations: stderr or paths.",
        metavar="TARGETS",
    ),
    Setting(
        "log_caller",
        ("--log_caller",),
        (),
        "",
        "Scopes whose log lines name the calling function.",
        metavar="SCOPES",
    ),
    Setting(
        "log_stacktrace_level",
        ("--log_stacktrace_level",),
        (),
        "default:none",
        "Lowest level whose log lines carry a stack trace, as scope:level.",
        metavar="LEVELS",
    ),
)

SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}


class Mode(enum.Enum):
    REDIRECT = "REDIRECT"
    TPROXY = "TPROXY"


class DryRunFormat(enum.Enum):
    RESTORE = "restore"
    COMMANDS = "commands"
    JSON = "json"


class Backend(enum.Enum):
    RESTORE = "restore"
    LIBIPTC = "libiptc"


class IptablesVariant(enum.Enum):
    LEGACY = "legacy"
    NFT = "nft"


@record
class Config:
    proxy_port: int = 15001
    inbound_capture_port: int = 15006
    inbound_tunnel_port: int = 15008
    proxy_uids: tuple[int, ...] | None = None
    """None: the UID of ``envoy_user`` on the host, else 1337."""
    proxy_gids: tuple[int, ...] | None = None
    """None: the same as the proxy UIDs."""
    mode: Mode = Mode.REDIRECT
    inbound_ports: tuple[int, ...] | All = ()
    local_exclude_ports: tuple[int, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    service_cidrs: tuple[IPNet, ...] | All = ()
    service_exclude_cidrs: tuple[IPNet, ...] = ()
    outbound_ports: tuple[int, ...] = ()
    local_outbound_ports_exclude: tuple[int, ...] = ()
    kube_virt_interfaces: tuple[str, ...] = ()
    tproxy_mark: int = 1337
    tproxy_route_table: int = 133
    dry_run: bool = False
    probe_port: int = 15002
    probe_timeout: float = 5.0
    skip_rule_apply: bool = False
    run_validation: bool = False
    redirect_dns: bool = False
    drop_invalid: bool = False
    dual_stack: bool = False
    capture_all_dns: bool = False
    network_namespace: str = ""
    cni_mode: bool = False
    reconcile: bool = True
    cleanup_only: bool = False
    force_apply: bool = False
    native_nftables: bool = False
    allow_host_namespace: bool = False
    force_iptables_binary: IptablesVariant | None = None
    owner_groups_include: tuple[int | str, ...] | All = ALL
    owner_groups_exclude: tuple[int | str, ...] = ()
    ipv4_loopback_cidr: ipaddress.IPv4Interface = ipaddress.IPv4Interface("127.0.0.1/32")
    envoy_user: str = "istio-proxy"
    dry_run_file_path: str = ""
    ipv6: bool | None = None
    """None: detect from the host's addresses."""
    dns_servers: tuple[IPAddress, ...] | None = None
    """None: the nameservers of ``resolv_conf``."""
    resolv_conf: str = "/etc/resolv.conf"
    rule_comments: bool = False
    match_sets: bool = False
    dry_run_format: DryRunFormat = DryRunFormat.RESTORE
    backend: Backend = Backend.RESTORE
    log: LogOptions = LogOptions()


# ---- value parsers: each takes the text and raises ValueError with the reason -------------------------

MAX_OWNER_GROUPS = 64
# Patterns compiled at first use (re caches them): most runs never check an interface or group name.
_INTERFACE = r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,14}"
_GROUP_NAME = r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?"
_NETNS_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}"
_DURATION_PART = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)"
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


def split_list(text: str) -> list[str]:
    """Istio's list syntax: comma-separated, empty elements dropped (``"6000,7000,"`` is two ports)."""
    return [item for item in text.split(",") if item]


def parse_decimal(text: str, low: int, high: int, what: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"not a {what} (a decimal number {low}-{high})")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{what} out of range ({low}-{high})")
    return value


def parse_port(text: str) -> int:
    return parse_decimal(text, 1, 65535, "port")


def parse_ports(text: str) -> tuple[int, ...]:
    return tuple(_each(split_list(text), parse_port))


def parse_port_selection(text: str) -> tuple[int, ...] | All:
    return ALL if text == WILDCARD else _no_wildcard(text, parse_ports)


def parse_id(text: str) -> int:
    # 2^32-1 is the kernel's "no id" value, never a real owner.
    return parse_decimal(text, 0, 0xFFFFFFFE, "numeric id")


def parse_ids(text: str) -> tuple[int, ...] | None:
    ids = tuple(_each(split_list(text), parse_id))
    return ids or None


def parse_mark(text: str) -> int:
    # Mark 0 would match every unmarked packet.
    return parse_decimal(text, 1, 0xFFFFFFFF, "mark")


def parse_route_table(text: str) -> int:
    table = parse_decimal(text, 1, 0xFFFFFFFF, "route table")
    if table in (253, 254, 255):
        raise ValueError("tables 253-255 are the kernel's default, main and local tables")
    return table


def parse_cidr(text: str) -> IPNet:
    address, slash, length = text.partition("/")
    if not slash:
        raise ValueError("not a CIDR (address/prefix-length)")
    if not length.isascii() or not length.isdigit():
        raise ValueError("not a CIDR (the prefix length must be a number)")
    ip = parse_address(address)
    if int(length) > ip.max_prefixlen:
        raise ValueError(f"prefix length {int(length)} is over {ip.max_prefixlen}")
    return ipaddress.ip_interface((ip, int(length)))


def parse_cidrs(text: str) -> tuple[IPNet, ...]:
    return tuple(_each(split_list(text), parse_cidr))


def parse_cidr_selection(text: str) -> tuple[IPNet, ...] | All:
    return ALL if text == WILDCARD else _no_wildcard(text, parse_cidrs)


def parse_address(text: str) -> IPAddress:
    if "%" in text:
        raise ValueError("not an IP address (zone ids are not allowed)")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        # ipaddress's own reasons ("Octet 256 (> 255) not permitted in '10.0.0.256'") are Python's wording.
        raise ValueError("not an IPv4 or IPv6 address") from None


def parse_addresses(text: str) -> tuple[IPAddress, ...] | None:
    return tuple(_each(split_list(text), parse_address)) or None


def parse_interface(text: str) -> str:
    if not re.fullmatch(_INTERFACE, text):
        raise ValueError("not an interface name (1-15 of A-Z a-z 0-9 _ . + -, not starting with . + or -)")
    return text


def parse_interfaces(text: str) -> tuple[str, ...]:
    return tuple(_each(split_list(text), parse_interface))


def parse_group(text: str) -> int | str:
    if text.isascii() and text.isdigit():
        return parse_id(text)
    if not re.fullmatch(_GROUP_NAME, text):
        raise ValueError("not a group name or GID")
    return text


def parse_groups_include(text: str) -> tuple[int | str, ...] | All:
    if text == WILDCARD:
        return ALL
    groups = _no_wildcard(text, lambda value: tuple(_each(split_list(value), parse_group)))
    if len(groups) > MAX_OWNER_GROUPS:
        raise ValueError(f"at most {MAX_OWNER_GROUPS} groups can be captured, got {len(groups)}")
    return groups


def parse_groups(text: str) -> tuple[int | str, ...]:
    return tuple(_each(split_list(text), parse_group))


def parse_mode(text: str) -> Mode:
    if text == "":
        return Mode.REDIRECT
    try:
        # isascii: str.upper() maps some non-ASCII letters (the dotless i) onto ASCII ones.
        return Mode(text.upper() if text.isascii() else text)
    except ValueError:
        raise ValueError("must be REDIRECT or TPROXY") from None


def parse_loopback_cidr(text: str) -> ipaddress.IPv4Interface:
    cidr = parse_cidr(text)
    if not isinstance(cidr, ipaddress.IPv4Interface) or not cidr.ip.is_loopback:
        raise ValueError("must be an IPv4 loopback CIDR (in 127.0.0.0/8)")
    if not 8 <= cidr.network.prefixlen <= 32:
        raise ValueError("prefix length must be 8 to 32")
    return cidr


def parse_duration(text: str) -> float:
    """A Go duration (``5s``, ``+1m30s``, ``500ms``), in seconds; must be positive."""
    position, seconds = (1 if text.startswith("+") else 0), 0.0
    while position < len(text):
        part = re.compile(_DURATION_PART).match(text, position)
        if part is None:
            raise ValueError("not a duration (e.g. 5s, 500ms, 1m30s)")
        seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()
    if seconds <= 0:
        raise ValueError("not a positive duration (e.g. 5s, 500ms, 1m30s)")
    return seconds


def parse_go_bool(text: str) -> bool:
    """Go's ``strconv.ParseBool``, as Istio reads its switches from the environment."""
    try:
        return _GO_BOOLS[text]
    except KeyError:
        raise ValueError("not a boolean (true or false)") from None


def parse_netns(text: str) -> str:
    if text and "/" not in text and (not re.fullmatch(_NETNS_NAME, text) or text in {".", ".."}):
        raise ValueError("not a namespace name (letters, digits, _ . -) nor a path")
    return text


def parse_log_level(text: str, level: LogLevel) -> LogLevel:
    """Istio's ``scope:level[,scope:level]``: the ``default`` scope (or a bare level) replaces ``level``."""
    for item in split_list(text):
        scope, _, name = item.rpartition(":")
        try:
            parsed = LogLevel[name.upper()]
        except KeyError:
            raise ValueError(f"unknown level '{name}' (debug, info, warn, error, fatal, none)") from None
        if scope in ("", "default"):
            level = parsed
    return level


def parse_caller(text: str) -> bool:
    scopes = split_list(text)
    return "default" in scopes or "all" in scopes


def _enum_parser(kind: type[E]) -> Callable[[str], E]:
    choices = ", ".join(str(member.value) for member in kind)

    def parse(text: str) -> E:
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"must be one of: {choices}") from None

    return parse


def parse_force_binary(text: str) -> IptablesVariant | None:
    return _enum_parser(IptablesVariant)(text) if text else None


def _each(items: list[str], parse: Callable[[str], T]) -> list[T]:
    parsed = []
    for item in items:
        try:
            parsed.append(parse(item))
        except ValueError as error:
            # In a list, say which element is wrong.
            raise ValueError(f"'{shown(item)}': {error}" if len(items) > 1 else str(error)) from None
    return parsed


def shown(text: str) -> str:
    """A value as it can appear in a one-line message: control characters escaped, length bounded."""
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return text if len(text) <= 200 else text[:200] + "..."


def _no_wildcard(text: str, parse: Callable[[str], T]) -> T:
    if WILDCARD in split_list(text):
        raise ValueError("'*' must stand alone")
    return parse(text)


# ---- resolution ---------------------------------------------------------------------------------------

Given = Mapping[str, "str | bool | None"]


@record
class _Raw:
    value: str | bool
    origin: str
    """What to name in an error: the flag, or the environment variable the value came from."""


def _raw(setting: Setting, given: Given, environ: Mapping[str, str]) -> _Raw:
    value = given.get(setting.key)
    if value is not None:
        return _Raw(value, setting.label)
    for name in reversed(setting.envvars):
        env_value = environ.get(name)
        # An empty variable is "set" for a value (Istio's owner-groups edge case relies on it) but carries
        # nothing for a switch.
        if env_value is not None and not (setting.switch and env_value == ""):
            return _Raw(env_value, f"{name} (environment of {setting.label})")
    return _Raw(setting.default, setting.label)


def load(given: Given, environ: Mapping[str, str]) -> Config:
    """Build the Config from command-line values (None = not given) and the environment."""

    def get(key: str, parse: Callable[[str], T]) -> T:
        raw = _raw(SETTINGS_BY_KEY[key], given, environ)
        text = raw.value if isinstance(raw.value, str) else str(raw.value).lower()
        try:
            return parse(text)
        except ValueError as error:
            raise ConfigError(f"invalid value for {raw.origin}: '{shown(text)}': {error}") from None

    def switch(key: str) -> bool:
        return get(key, parse_go_bool)

    def ipv6(text: str) -> bool | None:
        return None if text == "detect" else parse_go_bool(text)

    config = Config(
        proxy_port=get("envoy_port", parse_port),
        inbound_capture_port=get("inbound_capture_port", parse_port),
        inbound_tunnel_port=get("inbound_tunnel_port", parse_port),
        proxy_uids=get("proxy_uid", parse_ids),
        proxy_gids=get("proxy_gid", parse_ids),
        mode=get("inbound_interception_mode", parse_mode),
        inbound_ports=get("inbound_ports", parse_port_selection),
        local_exclude_ports=get("local_exclude_ports", parse_ports),
        exclude_interfaces=get("exclude_interfaces", parse_interfaces),
        service_cidrs=get("service_cidr", parse_cidr_selection),
        service_exclude_cidrs=get("service_exclude_cidr", parse_cidrs),
        outbound_ports=get("outbound_ports", parse_ports),
        local_outbound_ports_exclude=get("local_outbound_ports_exclude", parse_ports),
        kube_virt_interfaces=get("kube_virt_interfaces", parse_interfaces),
        tproxy_mark=get("inbound_tproxy_mark", parse_mark),
        tproxy_route_table=get("inbound_tproxy_route_table", parse_route_table),
        dry_run=switch("dry_run"),
        probe_port=get("iptables_probe_port", parse_port),
        probe_timeout=get("probe_timeout", parse_duration),
        skip_rule_apply=switch("skip_rule_apply"),
        run_validation=switch("run_validation"),
        redirect_dns=switch("redirect_dns"),
        drop_invalid=switch("drop_invalid"),
        dual_stack=switch("dual_stack"),
        capture_all_dns=switch("capture_all_dns"),
        network_namespace=get("network_namespace", parse_netns),
        cni_mode=switch("cni_mode"),
        reconcile=switch("reconcile"),
        cleanup_only=switch("cleanup_only"),
        force_apply=switch("force_apply"),
        native_nftables=switch("native_nftables"),
        allow_host_namespace=switch("allow_host_namespace"),
        force_iptables_binary=get("force_iptables_binary", parse_force_binary),
        owner_groups_include=get("outbound_owner_groups", parse_groups_include),
        owner_groups_exclude=get("outbound_owner_groups_exclude", parse_groups),
        ipv4_loopback_cidr=get("host_ipv4_loopback_cidr", parse_loopback_cidr),
        envoy_user=get("envoy_user", _nonempty),
        dry_run_file_path=get("dry_run_file_path", str),
        ipv6=get("ipv6", ipv6),
        dns_servers=get("dns_servers", parse_addresses),
        resolv_conf=get("resolv_conf", _nonempty),
        rule_comments=switch("rule_comments"),
        match_sets=switch("match_sets"),
        dry_run_format=get("dry_run_format", _enum_parser(DryRunFormat)),
        backend=get("backend", _enum_parser(Backend)),
        log=LogOptions(
            level=get("log_output_level", lambda text: parse_log_level(text, LogLevel.INFO)),
            as_json=switch("log_as_json"),
            targets=get("log_target", lambda text: tuple(split_list(text)) or ("stderr",)),
            caller=get("log_caller", parse_caller),
            stacktrace_level=get("log_stacktrace_level", lambda text: parse_log_level(text, LogLevel.NONE)),
        ),
    )
    if config.native_nftables and config.dry_run and config.dry_run_format is not DryRunFormat.RESTORE:
        raise ConfigError(
            f"invalid value for --dry-run-format: '{config.dry_run_format.value}': with --native-nftables the dry "
            "run prints the nft transaction (nft -f input), the only format it supports; json and commands "
            "describe iptables rules"
        )
    return config


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


# The argv parser of the flag table: the command lines the init container runs, read without Typer. The CLI's
# fast path uses it (a plain run must not pay for importing Typer), kube/ and cni/ read the init container's argv
# with it exactly as the CLI does; the Typer application parses the same table the same way (tests hold them equal).


def without_leading_word(arguments: list[str]) -> list[str]:
    """Istio's injector writes ``istio-iptables`` as the first argument, for its image runs ``pilot-agent``,
    whose subcommand that is; this image runs us directly, so the word is dropped and the rest runs as is."""
    return arguments[1:] if arguments[:1] == [PROG] else arguments


def plain_run(
    arguments: list[str], options: Mapping[str, Setting] | None = None
) -> dict[str, str | bool | None] | None:
    """The options of a command line made only of ``--flag VALUE``, ``--flag=VALUE``, ``-f VALUE`` and
    switches (``--switch``, ``--no-switch``, ``-n``) of ``options`` (default: the main command's), as Typer
    would pass them to the command; None for anything else (help, a subcommand, ``--``, bundled short
    flags, a value that looks like a flag, an unknown flag), which Typer then parses, runs or words the
    usage error for."""
    options = OPTIONS if options is None else options
    given: dict[str, str | bool | None] = {setting.key: None for setting in options.values()}
    remaining = iter(arguments)
    for argument in remaining:
        name, equals, value = argument.partition("=") if argument.startswith("--") else (argument, "", "")
        setting = options.get(name)
        if setting is None or (setting.switch and equals):
            return None
        if setting.switch:
            given[setting.key] = name != setting.off
            continue
        if not equals:
            following = next(remaining, None)
            if following is None or (following.startswith("-") and following != "-"):
                return None
            value = following
        given[setting.key] = value
    return given


OPTIONS = {
    name: setting for setting in SETTINGS for name in (*setting.flags, *((setting.off,) if setting.switch else ()))
}
"""Every option name of the main command, switches' ``--no-`` forms included."""


CLEAN_OPTIONS = {name: setting for name, setting in OPTIONS.items() if setting.key != "cleanup_only"}
"""``istio-clean-iptables``'s: the same without ``--cleanup-only``, which it always is."""


def go_switches(argv: list[str]) -> list[str]:
    """Istio's flag library takes ``--dry-run=true`` and ``--redirect-dns=false``; Click takes the bare flag
    or its ``--no-`` form. Translate, so an Istio command line works as it is."""
    switches = {setting.flags[0]: setting for setting in SETTINGS if setting.switch}
    translated = []
    for argument in argv:
        name, equals, value = argument.partition("=")
        setting = switches.get(name) if equals else None
        if setting is None:
            translated.append(argument)
            continue
        try:
            translated.append(name if parse_go_bool(value) else setting.off)
        except ValueError:
            raise ConfigError(
                f"invalid value for {setting.label}: '{shown(value)}': not a boolean (true or false)"
            ) from None
    return translated
