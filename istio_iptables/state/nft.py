"""Our nftables tables read back from ``nft -j list ruleset`` into the model, and the way from them to a plan.

Pure: the backend (``backends/nft.py``) runs ``nft``; this module reads its JSON and writes its scripts.

Everything in ``inet istio-proxy-nat``, ``-mangle`` and ``-raw`` is ours (the table names say so), so there
is no ownership question as on the iptables side; what matters is whether it is exactly what the plan says.
Each nft rule is parsed into the same typed ``Rule`` as an iptables rule, with the model's chain names
(``istio-output`` is ``ISTIO_OUTPUT``, ``prerouting`` is ``PREROUTING``), and with the families it applies to:
an ``inet`` table holds both, so a rule with an ``ip`` address (or ``tproxy ip``) is IPv4's, one with ``ip6``
IPv6's, and one without either is both families'. ``family_tables`` gives one family's view as the iptables
parser does (``TableState``), which is what the tracer walks. A rule the model cannot express (another
statement, a set of addresses, a masked mark...) keeps its nft text, with ``rule`` None.

Comparison works on layouts (``state.Layout``): per table, per chain, the canonical nft text of each rule in
kernel order, and a first line with the hook of a base chain. nft lists a rule the way it keeps it, not the
way it was written (``meta l4proto tcp tcp dport 80`` comes back as ``tcp dport 80``, ``ip daddr
10.0.0.1/32`` as ``ip daddr 10.0.0.1``, set elements sorted), so both sides are put through the same
canonical form: the parsed rule is rendered again with ``render.nft.rule_expression``, and so is the
planned rule.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping

from istio_iptables.capture.model import (
    BUILTIN_CHAINS,
    ISTIO_CHAINS,
    NFT_TABLE_NAMES,
    AddressSet,
    Connmark,
    ConntrackState,
    CtState,
    CtZone,
    Destination,
    DestinationPort,
    DestinationPorts,
    Family,
    GidOwner,
    InInterface,
    InSet,
    IPNet,
    Jump,
    Mark,
    Match,
    OutInterface,
    Plan,
    PortSet,
    Proto,
    Protocol,
    Redirect,
    RestoreMark,
    Rule,
    SaveMark,
    SetMark,
    Source,
    SourcePort,
    Table,
    Target,
    Tproxy,
    UidOwner,
    Verdict,
)
from istio_iptables.records import field, mutable_record, record, replace
from istio_iptables.render.nft import (
    BASE_CHAINS,
    CHAIN_ORDER,
    chain_name,
    insert_index,
    merge_families,
    render_nft,
    set_name,
)
from istio_iptables.render.nft import rule_expression as nft_rule_expression
from istio_iptables.state import Layout, SavedRule, TableState, canonical

TYPE_CHECKING = False  # typing is not imported at run time (records.py says why)
if TYPE_CHECKING:
    from typing import Any

FAMILY = "inet"
OWN_TABLES: dict[str, Table] = {name: table for table, name in NFT_TABLE_NAMES.items()}
"""Our nftables tables by name, each standing in for the iptables table of the same role."""

_MODEL_CHAINS = {chain_name(chain): chain for chain in (*BUILTIN_CHAINS, *ISTIO_CHAINS)}
_BOTH = frozenset(Family)
_IPTABLES_TABLES = frozenset({"nat", "mangle", "raw", "filter"})
_NFT_FAMILIES = {"ip": Family.V4, "ip6": Family.V6}


class UnparsedNftRuleError(ValueError):
    """A rule using something the model does not describe."""


@record
class NftRule:
    """One rule of one of our tables, as read."""

    chain: str
    """The nft chain name (``istio-output``)."""
    families: frozenset[Family]
    """The families whose packets it can match."""
    text: str
    """nft's spelling: the canonical rendering when the rule was understood, else a rendering of its JSON."""
    rule: Rule | None
    """Its meaning, with the model's chain names; None when the model cannot express it."""
    handle: int | None = field(default=None, compare=False)
    """The kernel's handle, read from a listing: what ``render_deletes`` names."""


@mutable_record
class NftTable:
    chains: dict[str, str | None] = field(default_factory=dict)
    """Chains in order, by nft name: a base chain with its hook (``type nat hook output priority -100 policy
    accept``), a regular one with None."""
    rules: list[NftRule] = field(default_factory=list)
    """Rules in kernel order (chain by chain)."""
    sets: dict[str, str] = field(default_factory=dict)
    """Named sets (``--match-sets``) by nft name: type, flags and elements, canonical (``set_text``)."""


@record
class NftState:
    """What ``nft -j list ruleset`` showed of interest to us."""

    version: str
    """The nft binary's version (from the listing's metainfo)."""
    tables: dict[Table, NftTable]
    """Our tables that exist, each under the iptables table it stands in for."""
    objects: tuple[dict[str, Any], ...] = ()
    """The JSON objects of our tables (tables, chains, rules, sets...), as listed: what a rollback restores."""
    iptables_nft: frozenset[Family] = frozenset()
    """Families whose iptables-nft tables (``ip nat``, ``ip6 mangle``...) hold a rule or an ``ISTIO_*`` chain:
    where an iptables copy of our rules may be."""
    base_chains: tuple[BaseChain, ...] = ()
    """Every other table's hooked chains: what packets meet beside ours."""
    sets: tuple[AddressSet | PortSet, ...] = ()
    """The members of our named sets, with the model's names: what the tracer looks ``InSet`` up in."""

    @property
    def unparsed(self) -> list[tuple[Table, NftRule]]:
        return [(table, rule) for table, state in self.tables.items() for rule in state.rules if rule.rule is None]

    def layout(self, group_id: Callable[[int | str], int | str]) -> Layout:
        """Per table and chain, the canonical text of every rule in order (see the module's docstring)."""
        layout: Layout = {}
        for table, state in self.tables.items():
            chains = layout.setdefault(table, {})
            for name, hook in state.chains.items():
                chains[name] = [] if hook is None else [hook]
            for entry in state.rules:
                chains.setdefault(entry.chain, []).append(_canonical_text(entry, group_id))
            chains.update({f"@{name}": [text] for name, text in state.sets.items()})
        return layout

    def family_tables(self, family: Family) -> dict[Table, TableState]:
        """One family's view, as ``state.parse_tables`` gives it for iptables: model chain names, built-in
        chains with their policy, only the rules that can match this family's packets."""
        tables: dict[Table, TableState] = {}
        for table, state in self.tables.items():
            view = tables.setdefault(table, TableState())
            for name, hook in state.chains.items():
                policy = hook.rsplit(" ", 1)[-1].upper() if hook else None
                view.chains[model_chain(name)] = policy
            for entry in state.rules:
                if family in entry.families:
                    view.entries.append(SavedRule(model_chain(entry.chain), entry.text, entry.rule))
        return tables


@record
class BaseChain:
    """A hooked chain of a table not ours (iptables-nft's ``ip nat OUTPUT``, a firewall's...)."""

    family: str
    table: str
    chain: str
    hook: str
    priority: int
    rules: int


def model_chain(name: str) -> str:
    """``istio-output`` -> ``ISTIO_OUTPUT``; a chain we never create keeps its nft name."""
    return _MODEL_CHAINS.get(name, name)


# ---- reading -----------------------------------------------------------------------------------------------


def parse_ruleset(text: str) -> NftState:
    """``nft -j list ruleset`` (or ``list table``) output as our tables; other tables are only glanced at."""
    document = json.loads(text) if text.strip() else {"nftables": []}
    items = document.get("nftables", []) if isinstance(document, dict) else []
    version = ""
    tables: dict[Table, NftTable] = {}
    objects: list[dict[str, Any]] = []
    iptables_nft: set[Family] = set()
    sets: list[AddressSet | PortSet] = []
    foreign_chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    foreign_rules: dict[tuple[str, str, str], int] = {}
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((kind, body),) = item.items()
        if kind == "metainfo":
            version = str(body.get("version", ""))
            continue
        if not isinstance(body, dict):
            continue
        family = body.get("family")
        table_name = body.get("name") if kind == "table" else body.get("table")
        ours = family == FAMILY and table_name in OWN_TABLES
        if not ours:
            _glance(kind, body, iptables_nft, foreign_chains, foreign_rules)
            continue
        objects.append(item)
        table = tables.setdefault(OWN_TABLES[str(table_name)], NftTable())
        if kind == "chain":
            table.chains[str(body["name"])] = _hook(body)
        elif kind == "rule":
            rule = parse_rule(OWN_TABLES[str(table_name)], str(body["chain"]), body.get("expr", []))
            table.rules.append(replace(rule, handle=body.get("handle")))
        elif kind == "set":
            model = parse_set(body)
            if model is not None:
                sets.append(model)
            table.sets[str(body["name"])] = set_text(model) if model else _set_description(body)
    base_chains = tuple(
        BaseChain(family, table_name, name, str(body["hook"]), int(body.get("prio", 0)), foreign_rules.get(key, 0))
        for key, body in foreign_chains.items()
        for family, table_name, name in [key]
    )
    return NftState(version, tables, tuple(objects), frozenset(iptables_nft), base_chains, tuple(sets))


def _glance(
    kind: str,
    body: dict[str, Any],
    iptables_nft: set[Family],
    chains: dict[tuple[str, str, str], dict[str, Any]],
    rules: dict[tuple[str, str, str], int],
) -> None:
    family, table = str(body.get("family")), str(body.get("table"))
    iptables_family = _NFT_FAMILIES.get(family) if table in _IPTABLES_TABLES else None
    if kind == "chain":
        if "hook" in body:
            chains[(family, table, str(body["name"]))] = body
        if iptables_family and str(body.get("name", "")).startswith("ISTIO_"):
            iptables_nft.add(iptables_family)
    elif kind == "rule":
        key = (family, table, str(body.get("chain")))
        rules[key] = rules.get(key, 0) + 1
        if iptables_family:
            iptables_nft.add(iptables_family)


def _hook(chain: Mapping[str, Any]) -> str | None:
    if "hook" not in chain:
        return None
    return f"type {chain.get('type')} hook {chain['hook']} priority {chain.get('prio')} policy {chain.get('policy')}"


def parse_rule(table: Table, chain: str, expressions: list[Any]) -> NftRule:
    """One rule's expressions as an NftRule: understood, or kept as text."""
    try:
        families, clauses, target = _parse_expressions(expressions)
    except (UnparsedNftRuleError, ValueError, KeyError, TypeError, AttributeError):
        families = _families_of(expressions)
        return NftRule(chain, families, " ".join(_expression_text(e) for e in expressions), None)
    rule = Rule(table, model_chain(chain), tuple(clauses), target)
    return NftRule(chain, families, rule_text(rule, families), rule)


def _parse_expressions(expressions: list[Any]) -> tuple[frozenset[Family], list[Match], Target]:
    families = set(_BOTH)
    clauses: list[Match] = []
    statements: list[tuple[str, Any]] = []
    protocols: set[Proto] = set()
    for expression in expressions:
        ((kind, body),) = expression.items()
        if kind == "match":
            if statements:
                raise UnparsedNftRuleError("a match after a statement")
            clause, family = _match(body)
            if family is not None:
                families &= {family}
            if isinstance(clause, Protocol):
                if not clause.negated and clause.protocol in protocols:
                    continue
                protocols.add(clause.protocol)
            if clause is not None:
                clauses.append(clause)
            if isinstance(clause, (DestinationPort, SourcePort, DestinationPorts, InSet)):
                implied = _port_protocol(body)
                if implied is not None and implied not in protocols:
                    # "tcp dport" carries an implicit "meta l4proto tcp"; nft lists the two as one.
                    protocols.add(implied)
                    clauses.append(Protocol(implied))
        elif kind != "counter":
            statements.append((kind, body))
    target, family = _target(statements)
    if family is not None:
        families &= {family}
    # A Protocol added for a port match goes before it, as an iptables rule has it (-p tcp --dport).
    clauses.sort(key=lambda clause: 0 if isinstance(clause, Protocol) else 1)
    return frozenset(families), clauses, target


def _match(body: Mapping[str, Any]) -> tuple[Match | None, Family | None]:
    """A match as a clause (None for a match on the family only) and the family it restricts to."""
    op, left, right = body["op"], body["left"], body["right"]
    if op not in ("==", "!=", "in"):
        raise UnparsedNftRuleError(f"operator {op}")
    negated = op == "!="
    ((kind, selector),) = left.items()
    if kind == "meta":
        key = selector["key"]
        if key == "l4proto":
            return Protocol(Proto(right), negated), None
        if key == "nfproto" and not negated:
            return None, {"ipv4": Family.V4, "ipv6": Family.V6}[right]
        if key in ("iifname", "oifname") and isinstance(right, str):
            return (InInterface if key == "iifname" else OutInterface)(right, negated), None
        if key == "skuid":
            return UidOwner(_integer(right), negated), None
        if key == "skgid":
            return GidOwner(right if isinstance(right, str) else _integer(right), negated), None
        if key == "mark":
            return Mark(_integer(right), negated), None
    elif kind == "ct":
        if selector["key"] == "state":
            return ConntrackState(_states(right), negated), None
        if selector["key"] == "mark":
            return Connmark(_integer(right), negated), None
    elif kind == "payload":
        protocol, name = selector["protocol"], selector["field"]
        if isinstance(right, str) and right.startswith("@"):
            return _set_lookup(protocol, name, right[1:], negated)
        if protocol in _NFT_FAMILIES and name in ("saddr", "daddr"):
            network = _network(right, protocol)
            return (Source if name == "saddr" else Destination)(network, negated), _NFT_FAMILIES[protocol]
        if protocol in ("ip", "ip6") and name in ("protocol", "nexthdr") and not negated:
            return Protocol(Proto(right)), _NFT_FAMILIES[protocol]
        if protocol in ("tcp", "udp", "th") and name in ("dport", "sport"):
            if isinstance(right, int):
                port: Match = (DestinationPort if name == "dport" else SourcePort)(right, negated)
                return port, None
            if name == "dport":
                return DestinationPorts(tuple(sorted(_integer(p) for p in _elements(right))), negated), None
    raise UnparsedNftRuleError(f"match {json.dumps(left)}")


def _set_lookup(protocol: str, name: str, nft_set: str, negated: bool) -> tuple[Match, Family | None]:
    """``ip daddr @istio-exclude-cidr4``, ``tcp dport @istio-inbound-ports``: the model's InSet, which looks
    up destinations only."""
    if protocol in _NFT_FAMILIES and name == "daddr":
        return InSet(model_set(nft_set), negated), _NFT_FAMILIES[protocol]
    if protocol in ("tcp", "udp", "th") and name == "dport":
        return InSet(model_set(nft_set), negated), None
    raise UnparsedNftRuleError(f"set lookup {protocol} {name}")


def model_set(name: str) -> str:
    """``istio-exclude-cidr4`` -> ``ISTIO_EXCLUDE_CIDR4`` (``render.nft.set_name`` the other way)."""
    return name.upper().replace("-", "_")


def parse_set(body: Mapping[str, Any]) -> AddressSet | PortSet | None:
    """A named set as the model's, when it has the form ``render_nft`` gives one: an interval set of one
    family's addresses, or a plain set of ports."""
    kind, flags, elements = body.get("type"), body.get("flags", []), body.get("elem", [])
    if not isinstance(elements, list):
        return None
    try:
        if kind in ("ipv4_addr", "ipv6_addr") and flags == ["interval"]:
            family = Family.V4 if kind == "ipv4_addr" else Family.V6
            protocol = "ip" if family is Family.V4 else "ip6"
            networks = [network for element in elements for network in _set_networks(element, protocol)]
            return AddressSet(model_set(str(body["name"])), family, tuple(networks))
        if kind == "inet_service" and not flags:
            return PortSet(model_set(str(body["name"])), tuple(_integer(element) for element in elements))
    except (UnparsedNftRuleError, ValueError, KeyError, TypeError):
        return None
    return None


def _set_networks(element: Any, protocol: str) -> list[IPNet]:
    if isinstance(element, dict) and set(element) == {"range"}:
        first, last = (ipaddress.ip_address(bound) for bound in element["range"])
        summary = ipaddress.summarize_address_range(first, last)
        return [ipaddress.ip_interface(network) for network in summary]
    return [_network(element, protocol)]


def set_text(ipset: AddressSet | PortSet) -> str:
    """A set as nft keeps it: an interval set merges what overlaps or touches (``auto-merge``), elements are
    listed in order."""
    if isinstance(ipset, AddressSet):
        kind = "ipv4_addr" if ipset.family is Family.V4 else "ipv6_addr"
        return f"type {kind} flags interval elements {{ {', '.join(collapsed(ipset.networks))} }}"
    return f"type inet_service elements {{ {', '.join(map(str, sorted(set(ipset.ports))))} }}"


def collapsed(networks: Iterable[IPNet]) -> list[str]:
    """Networks masked, merged where they overlap or touch, in order (each family apart)."""
    networks = list(networks)
    v4 = [network.network for network in networks if isinstance(network, ipaddress.IPv4Interface)]
    v6 = [network.network for network in networks if isinstance(network, ipaddress.IPv6Interface)]
    return [str(network) for network in [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]]


def _set_description(body: Mapping[str, Any]) -> str:
    """A set of another form, for the diff (it differs from every planned set)."""
    flags = body.get("flags", [])
    return f"type {body.get('type')} flags {','.join(map(str, flags)) if isinstance(flags, list) else flags} " + (
        f"elements {_value_text({'set': body.get('elem', [])})}"
    )


def _port_protocol(body: Mapping[str, Any]) -> Proto | None:
    protocol = body["left"]["payload"]["protocol"]
    return Proto(protocol) if protocol in ("tcp", "udp") else None


def _target(statements: list[tuple[str, Any]]) -> tuple[Target, Family | None]:
    kinds = [kind for kind, _ in statements]
    if kinds == ["tproxy", "mangle", "accept"]:
        tproxy, mark = statements[0][1], statements[1][1]
        if set(tproxy) != {"family", "port"} or _key(mark["key"]) != "meta mark" or not isinstance(mark["value"], int):
            raise UnparsedNftRuleError("tproxy")
        return Tproxy(_integer(tproxy["port"]), mark["value"]), _NFT_FAMILIES[tproxy["family"]]
    if len(statements) != 1:
        raise UnparsedNftRuleError(f"statements {kinds}")
    kind, body = statements[0]
    if kind in ("accept", "drop", "return"):
        return Verdict(kind.upper()), None
    if kind == "jump":
        return Jump(model_chain(body["target"])), None
    if kind == "redirect" and set(body) == {"port"}:
        return Redirect(_integer(body["port"])), None
    if kind == "mangle":
        key, value = _key(body["key"]), body["value"]
        if key == "meta mark" and isinstance(value, int):
            return SetMark(value), None
        if key == "meta mark" and _key(value) == "ct mark":
            return RestoreMark(), None
        if key == "ct mark" and _key(value) == "meta mark":
            return SaveMark(), None
        if key == "ct zone" and isinstance(value, int):
            return CtZone(value), None
    raise UnparsedNftRuleError(f"statement {kind}")


def _key(selector: Any) -> str:
    if isinstance(selector, dict) and len(selector) == 1:
        ((kind, body),) = selector.items()
        if kind in ("meta", "ct") and isinstance(body, dict) and set(body) == {"key"}:
            return f"{kind} {body['key']}"
    return ""


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnparsedNftRuleError(f"not a number: {value!r}")
    return value


def _elements(value: Any) -> list[Any]:
    if isinstance(value, dict) and set(value) == {"set"}:
        value = value["set"]
    return list(value) if isinstance(value, list) else [value]


def _states(value: Any) -> tuple[CtState, ...]:
    return tuple(CtState(str(state).upper()) for state in _elements(value))


def _network(value: Any, protocol: str) -> IPNet:
    if isinstance(value, dict) and set(value) == {"prefix"}:
        address, length = value["prefix"]["addr"], value["prefix"]["len"]
    elif isinstance(value, str):
        address, length = value, 32 if protocol == "ip" else 128
    else:
        raise UnparsedNftRuleError(f"address {value!r}")
    network = ipaddress.ip_interface(f"{address}/{length}")
    if (network.version == 4) != (protocol == "ip"):
        raise UnparsedNftRuleError(f"{protocol} address {value!r}")
    return network


def _families_of(expressions: list[Any]) -> frozenset[Family]:
    text = json.dumps(expressions)
    found = {family for name, family in _NFT_FAMILIES.items() if f'"protocol": "{name}"' in text}
    found |= {family for name, family in _NFT_FAMILIES.items() if f'"family": "{name}"' in text}
    return frozenset(found) if len(found) == 1 else _BOTH


def _expression_text(expression: Any) -> str:
    """An nft-like spelling of one expression, for rules the model cannot express (shown, never parsed)."""
    if not isinstance(expression, dict) or len(expression) != 1:
        return json.dumps(expression, separators=(",", ":"))
    ((kind, body),) = expression.items()
    if kind == "match" and isinstance(body, dict):
        op = "" if body.get("op") in ("==", "in") else f" {body.get('op')}"
        return f"{_value_text(body.get('left'))}{op} {_value_text(body.get('right'))}"
    if kind == "counter":
        return "counter"
    if kind in ("accept", "drop", "return", "continue"):
        return str(kind)
    if kind in ("jump", "goto") and isinstance(body, dict):
        return f"{kind} {body.get('target')}"
    if kind == "mangle" and isinstance(body, dict):
        return f"{_value_text(body.get('key'))} set {_value_text(body.get('value'))}"
    return f"{kind} {json.dumps(body, separators=(',', ':'))}"


def _value_text(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        ((kind, body),) = value.items()
        if kind in ("meta", "ct") and isinstance(body, dict) and "key" in body:
            return f"{kind} {body['key']}"
        if kind == "payload" and isinstance(body, dict) and "protocol" in body:
            return f"{body['protocol']} {body.get('field')}"
        if kind == "prefix" and isinstance(body, dict):
            return f"{body.get('addr')}/{body.get('len')}"
        if kind == "set" and isinstance(body, list):
            return "{ " + ", ".join(_value_text(element) for element in body) + " }"
        if kind == "range" and isinstance(body, list):
            return "-".join(_value_text(element) for element in body)
    if isinstance(value, list):
        return ",".join(_value_text(element) for element in value)
    if isinstance(value, (str, int)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


# ---- canonical text and layouts ------------------------------------------------------------------------------


def rule_text(rule: Rule, families: Iterable[Family]) -> str:
    """The rule as Istio's nft renderer writes it (a TPROXY rule names its family)."""
    family = Family.V6 if set(families) == {Family.V6} else Family.V4
    return nft_rule_expression(rule, family)


def canonical_rule(rule: Rule, group_id: Callable[[int | str], int | str]) -> Rule:
    """The rule as nft keeps it: networks masked, group names as ids, conntrack states and port sets in
    order, no position."""

    def kernel_form(clause: Match) -> Match:
        if isinstance(clause, ConntrackState):
            order = list(CtState)
            return replace(clause, states=tuple(sorted(set(clause.states), key=order.index)))
        if isinstance(clause, DestinationPorts):
            return replace(clause, ports=tuple(sorted(set(clause.ports))))
        return clause

    kept = canonical(rule, group_id)
    return replace(kept, clauses=tuple(kernel_form(clause) for clause in kept.clauses))


def _canonical_text(entry: NftRule, group_id: Callable[[int | str], int | str]) -> str:
    if entry.rule is None:
        return entry.text
    return rule_text(canonical_rule(entry.rule, group_id), entry.families)


def planned_layout(plan: Plan | None, group_id: Callable[[int | str], int | str]) -> Layout:
    """Where the transaction of ``render_nft(plan)`` leaves every rule (None: no tables at all)."""
    layout: Layout = {}
    if plan is None:
        return layout
    for table in NFT_TABLE_NAMES:
        entries = merge_families(plan, table)
        if not entries:
            continue
        chains = layout.setdefault(table, {})
        for name, hook in planned_hooks(plan)[table].items():
            chains[name] = [] if hook is None else [hook]
        used = {clause.name for _, rule in entries for clause in rule.clauses if isinstance(clause, InSet)}
        chains.update({f"@{set_name(ipset.name)}": [set_text(ipset)] for ipset in plan.sets if ipset.name in used})
        for family, rule in entries:
            texts = chains[chain_name(rule.chain)]
            heading = 1 if rule.chain in BASE_CHAINS[table] else 0
            index = insert_index(rule, len(texts) - heading)
            text = rule_text(canonical_rule(rule, group_id), [family])
            if index is None:
                texts.append(text)
            else:
                texts.insert(index + heading, text)
    return layout


def planned_hooks(plan: Plan | None) -> dict[Table, dict[str, str | None]]:
    """The tables ``render_nft`` writes and, in each, the chains it declares (those holding a rule) by nft
    name, with their hook as a live hooked chain shows it (``NftTable.chains``)."""
    hooks: dict[Table, dict[str, str | None]] = {}
    for table in NFT_TABLE_NAMES:
        used = list(dict.fromkeys(rule.chain for _, rule in merge_families(plan, table))) if plan else []
        if not used:
            continue
        known = [chain for chain in CHAIN_ORDER[table] if chain in used]
        hooks[table] = {
            chain_name(chain): f"{BASE_CHAINS[table][chain]} policy accept" if chain in BASE_CHAINS[table] else None
            for chain in known + [chain for chain in used if chain not in known]
        }
    return hooks


# ---- the way to the plan ---------------------------------------------------------------------------------


def render_transition(plan: Plan | None, live: NftState) -> str:
    """One ``nft -f`` transaction from the live tables to the plan (None: to no tables of ours).

    Each of our tables that exists is deleted first, then ``render_nft(plan)`` (Istio's add, flush and refill
    of each planned table) builds the planned ones anew; the kernel commits all of it at once or nothing.
    Deleting rather than only flushing matters twice: nothing of an older configuration survives (a chain,
    a hook at another priority), and nft resolves ``insert rule ... index N`` against the rules it knows,
    which after a flush would still be the flushed ones (the insert would land at the wrong place), while a
    table deleted in the same transaction is known to be empty.
    """
    deletes = "".join(
        f"delete table {FAMILY} {NFT_TABLE_NAMES[table]}\n" for table in NFT_TABLE_NAMES if table in live.tables
    )
    return deletes + (render_nft(plan) if plan is not None else "")


def render_deletes(live: NftState, unwanted: Callable[[Rule], bool]) -> str:
    """One ``nft -f`` transaction deleting, by handle, the rules of our tables that ``unwanted`` picks."""
    return "".join(
        f"delete rule {FAMILY} {NFT_TABLE_NAMES[table]} {entry.chain} handle {entry.handle}\n"
        for table, state in live.tables.items()
        for entry in state.rules
        if entry.rule is not None and entry.handle is not None and unwanted(entry.rule)
    )


def render_appends(plan: Plan, held: Plan) -> str:
    """The rule lines of ``render_nft(plan)`` that ``render_nft(held)`` lacks: one transaction that, on the
    tables ``render_nft(held)`` built, adds ``plan``'s other rules. Right only for rules appended last in
    their chain (``apply.split_save_mark`` checks it)."""
    written = set(render_nft(held).splitlines())
    return "".join(line + "\n" for line in render_nft(plan).splitlines() if line not in written)


def stale_tables(plan: Plan | None, live: NftState) -> list[Table]:
    """Our tables that exist and that the plan does not use."""
    used = planned_hooks(plan)
    return [table for table in live.tables if table not in used]


def restore_document(before: NftState, present: Iterable[Table]) -> str:
    """One ``nft -j -f`` transaction that puts our tables back as ``before`` listed them: every one of ours
    that exists now is deleted, and every one that existed before is created again, whole (chains, sets,
    rules with their counters). Handles are left out: on an ``add rule`` one would mean "after this rule"."""
    commands: list[dict[str, Any]] = [
        {"delete": {"table": {"family": FAMILY, "name": NFT_TABLE_NAMES[table]}}} for table in present
    ]
    for item in before.objects:
        ((kind, body),) = item.items()
        commands.append({"add": {kind: {key: value for key, value in body.items() if key != "handle"}}})
    return json.dumps({"nftables": commands})
