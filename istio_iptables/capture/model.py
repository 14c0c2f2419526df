"""The capture plan as typed data: families, tables, match clauses, targets, rules and routes.

Strings exist only at the edges (renderers write them, parsers read them back); everything between works
on these values, so every renderer, backend, diff and trace sees the same rules.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from istio_iptables.records import field, record

IPNet = IPv4Interface | IPv6Interface
"""An address with its prefix length, kept as written (Istio keeps host bits, e.g. ``10.0.0.1/8``)."""
IPAddress = IPv4Address | IPv6Address


class Family(enum.Enum):
    V4 = 4
    V6 = 6

    @property
    def label(self) -> str:
        return f"ipv{self.value}"

    @property
    def host_prefix(self) -> int:
        return 32 if self is Family.V4 else 128

    @staticmethod
    def of(address: IPAddress | IPNet) -> Family:
        return Family.V4 if address.version == 4 else Family.V6


class Table(enum.Enum):
    FILTER = "filter"
    MANGLE = "mangle"
    NAT = "nat"
    RAW = "raw"


NFT_TABLE_NAMES = {Table.NAT: "istio-proxy-nat", Table.MANGLE: "istio-proxy-mangle", Table.RAW: "istio-proxy-raw"}
"""Our ``inet`` tables under --native-nftables, each standing in for the iptables table of the same role, in
the order the transaction writes them."""

BUILTIN_CHAINS = frozenset({"INPUT", "OUTPUT", "FORWARD", "PREROUTING", "POSTROUTING"})
COMMENT_PREFIX = "istio-iptables: "
"""Every ``--rule-comments`` comment starts so: a rule carrying it is ours, whatever its shape."""

# The chains this program creates, in every table it uses.
ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
ISTIO_DIVERT = "ISTIO_DIVERT"
ISTIO_TPROXY = "ISTIO_TPROXY"
ISTIO_DROP = "ISTIO_DROP"
# The sets of --match-sets, one per list (and family).
SET_EXCLUDE_CIDRS = {4: "ISTIO_EXCLUDE_CIDR4", 6: "ISTIO_EXCLUDE_CIDR6"}
SET_INCLUDE_CIDRS = {4: "ISTIO_INCLUDE_CIDR4", 6: "ISTIO_INCLUDE_CIDR6"}
SET_INBOUND_PORTS = "ISTIO_INBOUND_PORTS"
SET_INBOUND_EXCLUDE_PORTS = "ISTIO_INBOUND_EXCLUDE_PORTS"
SET_OUTBOUND_PORTS = "ISTIO_OUTBOUND_PORTS"
SET_OUTBOUND_EXCLUDE_PORTS = "ISTIO_OUTBOUND_EXCLUDE_PORTS"
ISTIO_SETS = (
    *SET_EXCLUDE_CIDRS.values(),
    *SET_INCLUDE_CIDRS.values(),
    SET_INBOUND_PORTS,
    SET_INBOUND_EXCLUDE_PORTS,
    SET_OUTBOUND_PORTS,
    SET_OUTBOUND_EXCLUDE_PORTS,
)
ISTIO_CHAINS = (
    ISTIO_INBOUND,
    ISTIO_REDIRECT,
    ISTIO_IN_REDIRECT,
    ISTIO_OUTPUT,
    ISTIO_OUTPUT_DNS,
    ISTIO_DIVERT,
    ISTIO_TPROXY,
    ISTIO_DROP,
)


class Proto(enum.Enum):
    TCP = "tcp"
    UDP = "udp"


class CtState(enum.Enum):
    INVALID = "INVALID"
    NEW = "NEW"
    RELATED = "RELATED"
    ESTABLISHED = "ESTABLISHED"


# ---- match clauses: each one is a single iptables match, negatable --------------------------------------


@record
class Protocol:
    protocol: Proto
    negated: bool = False


@record
class Source:
    network: IPNet
    negated: bool = False


@record
class Destination:
    network: IPNet
    negated: bool = False


@record
class InInterface:
    name: str
    negated: bool = False


@record
class OutInterface:
    name: str
    negated: bool = False


@record
class DestinationPort:
    port: int
    negated: bool = False


@record
class SourcePort:
    port: int
    negated: bool = False


@record
class DestinationPorts:
    """``-m multiport --dports a,b``."""

    ports: tuple[int, ...]
    negated: bool = False


@record
class UidOwner:
    uid: int
    negated: bool = False


@record
class GidOwner:
    """A group id, or a group name that iptables resolves when it reads the rule (Istio's owner groups)."""

    group: int | str
    negated: bool = False


@record
class Mark:
    mark: int
    negated: bool = False


@record
class ConntrackState:
    states: tuple[CtState, ...]
    negated: bool = False


@record
class Connmark:
    mark: int
    negated: bool = False


@record
class InSet:
    """``-m set --match-set NAME dst``: the destination address (or, for a port set, port) is in the set."""

    name: str
    negated: bool = False


Match = (
    Protocol
    | Source
    | Destination
    | InInterface
    | OutInterface
    | DestinationPort
    | SourcePort
    | DestinationPorts
    | UidOwner
    | GidOwner
    | Mark
    | ConntrackState
    | Connmark
    | InSet
)

# ---- targets -------------------------------------------------------------------------------------------


class Verdict(enum.Enum):
    RETURN = "RETURN"
    ACCEPT = "ACCEPT"
    DROP = "DROP"


@record
class Jump:
    chain: str


@record
class Redirect:
    port: int


@record
class Tproxy:
    port: int
    mark: int
    mask: int = 0xFFFFFFFF


@record
class SetMark:
    mark: int


@record
class SaveMark:
    """``CONNMARK --save-mark``: copy the packet mark to the connection."""


@record
class RestoreMark:
    """``CONNMARK --restore-mark``: copy the connection mark back to the packet."""


@record
class CtZone:
    zone: int


Target = Verdict | Jump | Redirect | Tproxy | SetMark | SaveMark | RestoreMark | CtZone


@record
class Rule:
    """One rule: appended to ``chain`` of ``table``, or inserted at ``position`` (1-based) when given."""

    table: Table
    chain: str
    clauses: tuple[Match, ...]
    target: Target
    position: int | None = None
    comment: str | None = None
    """``-m comment`` text (``--rule-comments``): what the rule is for, so a save explains itself."""


@record
class RuleSet:
    """The ordered rules of one address family, in the order they are applied."""

    family: Family
    rules: tuple[Rule, ...]

    def tables(self) -> list[Table]:
        """Tables that hold rules, sorted by name (the order Istio writes them)."""
        return sorted({rule.table for rule in self.rules}, key=lambda table: table.value)

    def in_table(self, table: Table) -> list[Rule]:
        return [rule for rule in self.rules if rule.table is table]


@record
class PolicyRoute:
    """TPROXY routing: ``ip rule add fwmark <mark> lookup <table>`` and
    ``ip route add local default dev lo table <table>``, so marked packets are delivered locally."""

    family: Family
    mark: int
    table: int


@record
class AddressSet:
    """A set of CIDRs of one family (ipset ``hash:net``; an nft interval set)."""

    name: str
    family: Family
    networks: tuple[IPNet, ...]


@record
class PortSet:
    """A set of ports (ipset ``bitmap:port``; an nft ``inet_service`` set), for TCP and UDP alike."""

    name: str
    ports: tuple[int, ...]


@record
class Plan:
    rulesets: tuple[RuleSet, ...]
    routes: tuple[PolicyRoute, ...] = ()
    sets: tuple[AddressSet | PortSet, ...] = ()
    """``--match-sets``: the sets the rules look up, created and filled before them."""
    loopback_addresses: tuple[IPv6Interface, ...] = field(default=())
    """Addresses added to ``lo``: ``::6/128`` for IPv6, which has only ``::1`` by default and which the
    proxy binds for inbound passthrough."""

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(ruleset.family for ruleset in self.rulesets)

    def ruleset(self, family: Family) -> RuleSet | None:
        return next((rs for rs in self.rulesets if rs.family is family), None)


def declared_chains(rules: Iterable[Rule]) -> dict[Table, list[str]]:
    """The non-built-in chains to create, per table, in Istio's order: first every chain that holds a rule,
    in order of first appearance, then any jump target not declared yet."""
    rules = list(rules)
    declared: dict[Table, list[str]] = {}

    def declare(table: Table, chain: str) -> None:
        chains = declared.setdefault(table, [])
        if chain not in BUILTIN_CHAINS and chain not in chains:
            chains.append(chain)

    for rule in rules:
        declare(rule.table, rule.chain)
    for rule in rules:
        if isinstance(rule.target, Jump):
            declare(rule.table, rule.target.chain)
    return declared
