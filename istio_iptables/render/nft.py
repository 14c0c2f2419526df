"""The plan as one nft transaction in the form of Istio's ``--native-nftables`` (reference section 8).

Istio writes its nft rules as hand-made text and hands them to knftables, whose transaction dump is one
operation per line. This renderer writes the same lines from the Plan's typed rules; it holds no capture
logic of its own. Three things set the nft form apart from the iptables payloads:

- Each iptables table becomes one ``inet`` table holding both families, so the Plan's two rule lists are
  merged into one (``merge_families``), in the order Istio's builder appends them.
- A clause's place in a rule is fixed by its kind (``_CLAUSE_RANK``), not by the iptables order.
- A few spellings depend on where Istio wrote the rule: ``meta l4proto tcp`` is left out of two rule shapes
  (``_BARE_PORT_SHAPES``), raw-table owners are ``meta skuid``, the invalid-packet drop is TCP only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from istio_iptables.capture.model import (
    ISTIO_DIVERT,
    ISTIO_DROP,
    ISTIO_IN_REDIRECT,
    ISTIO_INBOUND,
    ISTIO_OUTPUT,
    ISTIO_OUTPUT_DNS,
    ISTIO_REDIRECT,
    ISTIO_TPROXY,
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
from istio_iptables.capture.plan import LOOPBACK_V6, PASSTHROUGH_V6
from istio_iptables.records import record

PREROUTING, OUTPUT = "PREROUTING", "OUTPUT"
NAT, MANGLE, RAW = Table.NAT, Table.MANGLE, Table.RAW

BASE_CHAINS: dict[Table, dict[str, str]] = {
    NAT: {
        PREROUTING: "type nat hook prerouting priority -100",
        OUTPUT: "type nat hook output priority -100",
    },
    MANGLE: {
        PREROUTING: "type filter hook prerouting priority -150",
        OUTPUT: "type route hook output priority -150",
    },
    RAW: {
        PREROUTING: "type filter hook prerouting priority -300",
        OUTPUT: "type filter hook output priority -300",
    },
}
"""The hooked chains that stand in for iptables' built-in ones: type, hook and priority of each."""

CHAIN_ORDER: dict[Table, tuple[str, ...]] = {
    NAT: (PREROUTING, OUTPUT, ISTIO_INBOUND, ISTIO_REDIRECT, ISTIO_IN_REDIRECT, ISTIO_OUTPUT, ISTIO_OUTPUT_DNS),
    MANGLE: (PREROUTING, OUTPUT, ISTIO_DIVERT, ISTIO_TPROXY, ISTIO_INBOUND, ISTIO_DROP),
    RAW: (PREROUTING, OUTPUT, ISTIO_INBOUND, ISTIO_OUTPUT_DNS),
}
"""Istio declares each table's chains in this fixed order, and only those that hold a rule."""

# Where a clause goes in a rule, by its kind: Istio's nft rules follow one fixed order in nat and mangle
# (interface, protocol, conntrack state, address, port, owner, mark), whatever the iptables order of the same
# rule. Its raw-table rules (the DNS conntrack zones) were written port first, so raw has its own column.
# Columns: rank in nat and mangle, rank in raw.
_CLAUSE_RANK: dict[type[Match], tuple[int, int]] = {
    InInterface: (0, 8),
    OutInterface: (1, 9),
    Protocol: (2, 0),
    ConntrackState: (3, 10),
    Source: (4, 4),
    Destination: (5, 5),
    DestinationPort: (6, 1),
    DestinationPorts: (7, 2),
    SourcePort: (8, 3),
    UidOwner: (9, 6),
    GidOwner: (10, 7),
    Mark: (11, 11),
    Connmark: (12, 12),
    # --match-sets (not Istio's): where the address or port it replaces would stand.
    InSet: (6, 1),
}

_BARE_PORT_SHAPES: frozenset[tuple[Table, str, frozenset[type[Match]]]] = frozenset(
    {
        # Outbound ports excluded (-o) and included (-q): "tcp dport 3306".
        (NAT, ISTIO_OUTPUT, frozenset({Protocol, DestinationPort})),
        # DNS to a listed server: "ip daddr 10.96.0.10/32 tcp dport 53".
        (NAT, ISTIO_OUTPUT_DNS, frozenset({Protocol, DestinationPort, Destination})),
    }
)
"""TCP rule shapes Istio writes with the port match alone: everywhere else a TCP rule starts its protocol
part with ``meta l4proto tcp`` (even beside ``tcp dport``). UDP never gets ``meta l4proto``: all of Istio's UDP
rules have a ``udp dport`` or ``udp sport``, which says it."""

_VERSIONED_V6 = frozenset({LOOPBACK_V6, PASSTHROUGH_V6})
"""The IPv6 side of Istio's versioned values (``::1/128``, ``::6/128``; neither is configurable): a rule
holding one is the IPv6 twin of an IPv4 rule of the same shape (reference 3.2, ``[ver]``)."""


def chain_name(chain: str) -> str:
    """``ISTIO_IN_REDIRECT`` -> ``istio-in-redirect``, ``PREROUTING`` -> ``prerouting``."""
    return chain.lower().replace("_", "-")


def render_nft(plan: Plan) -> str:
    """The transaction: per table that has rules, ``add table``, ``flush table``, its chains, its rules."""
    tables = {rule.table for ruleset in plan.rulesets for rule in ruleset.rules}
    unsupported = sorted(table.value for table in tables - NFT_TABLE_NAMES.keys())
    if unsupported:
        raise ValueError(f"no nftables form for the table(s) {', '.join(unsupported)}")
    lines: list[str] = []
    for table, table_name in NFT_TABLE_NAMES.items():
        rules = merge_families(plan, table)
        if not rules:
            continue
        where = f"inet {table_name}"
        lines += [f"add table {where}", f"flush table {where}"]
        for chain in _chains(table, [rule for _, rule in rules]):
            hook = BASE_CHAINS[table].get(chain)
            lines.append(f"add chain {where} {chain_name(chain)}" + (f" {{ {hook} ; }}" if hook else ""))
        used = {clause.name for _, rule in rules for clause in rule.clauses if isinstance(clause, InSet)}
        lines += [line for ipset in plan.sets if ipset.name in used for line in _set_lines(where, ipset)]
        counts: dict[str, int] = {}
        for family, rule in rules:
            index = insert_index(rule, counts.get(rule.chain, 0))
            position = "" if index is None else f" index {index}"
            verb = "add" if index is None else "insert"
            lines.append(f"{verb} rule {where} {chain_name(rule.chain)}{position} {rule_expression(rule, family)}")
            counts[rule.chain] = counts.get(rule.chain, 0) + 1
    return "".join(line + "\n" for line in lines)


def set_name(name: str) -> str:
    """ISTIO_EXCLUDE_CIDR4 -> istio-exclude-cidr4, as the chains are named."""
    return name.lower().replace("_", "-")


def _set_lines(where: str, ipset: AddressSet | PortSet) -> list[str]:
    """A --match-sets set in the table that looks it up: declared, then filled in one statement."""
    if isinstance(ipset, AddressSet):
        kind = "ipv4_addr" if ipset.family is Family.V4 else "ipv6_addr"
        declaration = f"{{ type {kind} ; flags interval ; auto-merge ; }}"
        members = [str(network.network) for network in ipset.networks]
    else:
        declaration, members = "{ type inet_service ; }", [str(port) for port in ipset.ports]
    name = set_name(ipset.name)
    return [f"add set {where} {name} {declaration}", f"add element {where} {name} {{ {', '.join(members)} }}"]


def insert_index(rule: Rule, rules_in_chain: int) -> int | None:
    """The 0-based nft index of an iptables insert (``-I CHAIN 1`` is index 0), or None for an append.

    nft refuses an insert into an empty chain or at an index the chain does not have yet, so, as Istio does
    for knftables, those become appends; ``rules_in_chain`` counts the chain's rules written so far.
    """
    if rule.position is None:
        return None
    index = rule.position - 1
    return None if rules_in_chain == 0 or index >= rules_in_chain else index


def _chains(table: Table, rules: Sequence[Rule]) -> list[str]:
    used = list(dict.fromkeys(rule.chain for rule in rules))
    known = [chain for chain in CHAIN_ORDER[table] if chain in used]
    return known + [chain for chain in used if chain not in known]


# ---- one rule -------------------------------------------------------------------------------------------


def rule_expression(rule: Rule, family: Family = Family.V4) -> str:
    """The rule as Istio writes it after the chain name: matches, ``counter``, then the statement.

    ``family`` matters only for a TPROXY rule without an address (``tproxy ip to`` or ``tproxy ip6 to``).
    """
    clauses = _istio_clauses(rule)
    protocol = next((clause.protocol for clause in clauses if isinstance(clause, Protocol)), None)
    tokens = [token for clause in clauses for token in _match(clause, rule, protocol)]
    if isinstance(rule.target, Tproxy):
        # Istio's TPROXY rule sets the mark itself and accepts; its counter sits just before the verdict.
        tokens += [*_tproxy(rule.target, _address_family(rule) or family), "counter", "accept"]
    else:
        tokens += ["counter", _statement(rule.target)]
    if rule.comment:
        tokens += ["comment", f'"{rule.comment}"']
    return " ".join(tokens)


def _istio_clauses(rule: Rule) -> list[Match]:
    clauses = list(rule.clauses)
    invalid = any(isinstance(clause, ConntrackState) and CtState.INVALID in clause.states for clause in clauses)
    if invalid and not any(isinstance(clause, Protocol) for clause in clauses):
        # Istio's nft invalid-packet drop matches TCP only ("meta l4proto tcp ct state invalid"), where its
        # iptables rule matches every protocol.
        clauses.append(Protocol(Proto.TCP))
    column = 1 if rule.table is RAW else 0
    return sorted(clauses, key=lambda clause: _CLAUSE_RANK[type(clause)][column])


def match_text(clause: Match, rule: Rule) -> str:
    """One clause of ``rule`` as nft spells it there (``oifname lo``, ``tcp dport 53``)."""
    protocol = next((c.protocol for c in rule.clauses if isinstance(c, Protocol) and not c.negated), None)
    if isinstance(clause, Protocol):
        return " ".join(["meta", "l4proto", *(["!="] if clause.negated else []), clause.protocol.value])
    return " ".join(_match(clause, rule, protocol))


def _match(clause: Match, rule: Rule, protocol: Proto | None) -> list[str]:
    ne = ["!="] if clause.negated else []
    if isinstance(clause, Protocol):
        return ["meta", "l4proto", *ne, clause.protocol.value] if _writes_l4proto(rule, clause) else []
    if isinstance(clause, (Source, Destination)):
        ip = "ip" if clause.network.version == 4 else "ip6"
        return [ip, "saddr" if isinstance(clause, Source) else "daddr", *ne, str(clause.network)]
    if isinstance(clause, InInterface):
        return ["iifname", *ne, clause.name]
    if isinstance(clause, OutInterface):
        return ["oifname", *ne, clause.name]
    l4 = protocol.value if protocol else "th"
    if isinstance(clause, DestinationPort):
        return [l4, "dport", *ne, str(clause.port)]
    if isinstance(clause, SourcePort):
        return [l4, "sport", *ne, str(clause.port)]
    if isinstance(clause, DestinationPorts):
        return [l4, "dport", *ne, "{ " + ", ".join(map(str, clause.ports)) + " }"]
    if isinstance(clause, InSet):
        field = {"4": ["ip", "daddr"], "6": ["ip6", "daddr"]}.get(clause.name[-1], [l4, "dport"])
        return [*field, *ne, f"@{set_name(clause.name)}"]
    meta = ["meta"] if rule.table is RAW else []
    if isinstance(clause, UidOwner):
        return [*meta, "skuid", *ne, str(clause.uid)]
    if isinstance(clause, GidOwner):
        return [*meta, "skgid", *ne, str(clause.group)]
    if isinstance(clause, Mark):
        return ["mark", *ne, str(clause.mark)]
    if isinstance(clause, ConntrackState):
        return ["ct", "state", *ne, ",".join(state.value.lower() for state in clause.states)]
    assert isinstance(clause, Connmark)
    return ["ct", "mark", *ne, str(clause.mark)]


def _writes_l4proto(rule: Rule, clause: Protocol) -> bool:
    has_port = any(isinstance(c, (DestinationPort, DestinationPorts, SourcePort)) for c in rule.clauses)
    if not has_port:
        return True
    if clause.protocol is Proto.UDP:
        return False
    return (rule.table, rule.chain, frozenset(type(c) for c in rule.clauses)) not in _BARE_PORT_SHAPES


def _statement(target: Target) -> str:
    if isinstance(target, Verdict):
        return target.value.lower()
    if isinstance(target, Jump):
        return f"jump {chain_name(target.chain)}"
    if isinstance(target, Redirect):
        return f"redirect to :{target.port}"
    if isinstance(target, SetMark):
        return f"meta mark set {target.mark}"
    if isinstance(target, SaveMark):
        return "ct mark set mark"
    if isinstance(target, RestoreMark):
        return "meta mark set ct mark"
    if isinstance(target, CtZone):
        return f"ct zone set {target.zone}"
    raise ValueError(f"no nftables statement for {target!r}")


def _tproxy(target: Tproxy, family: Family) -> list[str]:
    if target.mask != 0xFFFFFFFF:
        # Istio's nft rule sets the whole mark; a partial mask has no form in its output.
        raise ValueError(f"TPROXY mark mask {target.mask:#x}: the nftables form sets the whole mark")
    ip = "ip" if family is Family.V4 else "ip6"
    return ["tproxy", ip, "to", f":{target.port}", "meta", "mark", "set", str(target.mark)]


def _address_family(rule: Rule) -> Family | None:
    return next(
        (Family.of(clause.network) for clause in rule.clauses if isinstance(clause, (Source, Destination))), None
    )


# ---- the two families in one inet table -------------------------------------------------------------------

Entry = tuple[Family, Rule]


def merge_families(plan: Plan, table: Table) -> list[Entry]:
    """One table's rules of both families as one list, in the order Istio's nft builder appends them.

    Istio runs its algorithm once for an ``inet`` table: a rule without an address is appended once for both
    families; a versioned rule is appended for IPv4 and at once again for IPv6 (``AppendRule`` then
    ``AppendV6RuleIfSupported``); a per-family list (DNS servers, CIDRs) is looped over for IPv4, then for
    IPv6. The Plan holds the two families' rules as two lists in the same step order, so:

    1. rules equal in both lists (no address) are lined up (longest common subsequence) and written once;
    2. between two of those, an IPv6 rule holding a versioned value pairs with the first IPv4 rule of the same
       shape; the pair is written IPv4 then IPv6;
    3. what is left between two such points are per-family lists, ordered by ``_FAMILY_LOOPS``, IPv4 first.
    """
    v4 = plan.ruleset(Family.V4)
    v6 = plan.ruleset(Family.V6)
    first = v4.in_table(table) if v4 else []
    second = v6.in_table(table) if v6 else []
    merged: list[Entry] = []
    start4 = start6 = 0
    for i, j in [*_common(first, second), (len(first), len(second))]:
        merged += _merge_versioned(first[start4:i], second[start6:j])
        if i < len(first):
            merged.append((Family.V4, first[i]))
        start4, start6 = i + 1, j + 1
    return merged


def _common(first: Sequence[Rule], second: Sequence[Rule]) -> list[tuple[int, int]]:
    """Index pairs of a longest common subsequence of equal rules."""
    n, m = len(first), len(second)
    length = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            if first[i] == second[j]:
                length[i][j] = length[i + 1][j + 1] + 1
            else:
                length[i][j] = max(length[i + 1][j], length[i][j + 1])
    pairs: list[tuple[int, int]] = []
    i = j = 0
    while i < n and j < m:
        if first[i] == second[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif length[i + 1][j] >= length[i][j + 1]:
            i += 1
        else:
            j += 1
    return pairs


def _merge_versioned(first: Sequence[Rule], second: Sequence[Rule]) -> list[Entry]:
    merged: list[Entry] = []
    start4 = start6 = 0
    for j, rule6 in enumerate(second):
        if not _is_versioned(rule6):
            continue
        twin = next((i for i in range(start4, len(first)) if _shape(first[i]) == _shape(rule6)), None)
        if twin is None:
            continue
        merged += _merge_lists(first[start4:twin], second[start6:j])
        merged += [(Family.V4, first[twin]), (Family.V6, rule6)]
        start4, start6 = twin + 1, j + 1
    return merged + _merge_lists(first[start4:], second[start6:])


def _is_versioned(rule: Rule) -> bool:
    loop = _loop(rule)
    # A DNS server or an included CIDR may be ::1/128 too; those rules are per-family lists, never twins.
    # (An excluded CIDR written as ::1/128 or ::6/128 would still be taken for the loopback twin.)
    if loop is not None and not _FAMILY_LOOPS[loop].has_versioned_lookalike:
        return False
    return any(isinstance(clause, (Source, Destination)) and clause.network in _VERSIONED_V6 for clause in rule.clauses)


def _shape(rule: Rule) -> tuple[object, ...]:
    """The rule with its addresses left out: equal for the two families' versions of a versioned rule."""
    clauses = tuple(
        (type(clause), clause.negated) if isinstance(clause, (Source, Destination)) else clause
        for clause in rule.clauses
    )
    return (rule.table, rule.chain, rule.position, clauses, rule.target)


@record
class _Loop:
    what: str
    holds: Callable[[Rule], bool]
    has_versioned_lookalike: bool = False
    """Whether a versioned rule has the same shape (the loopback RETURN looks like an excluded CIDR)."""


def _dns_server_rule(protocol: Proto) -> Callable[[Rule], bool]:
    return lambda rule: (
        rule.table is NAT
        and rule.chain == ISTIO_OUTPUT_DNS
        and any(isinstance(clause, Protocol) and clause.protocol is protocol for clause in rule.clauses)
    )


_FAMILY_LOOPS = (
    _Loop("DNS servers, TCP redirect", _dns_server_rule(Proto.TCP)),
    _Loop("DNS servers, UDP redirect", _dns_server_rule(Proto.UDP)),
    _Loop("excluded CIDRs", lambda rule: rule.table is NAT and rule.target is Verdict.RETURN, True),
    _Loop("included CIDRs (ISTIO_OUTPUT, and KubeVirt PREROUTING)", lambda rule: rule.target == Jump(ISTIO_REDIRECT)),
    _Loop("DNS servers, conntrack zones", lambda rule: rule.table is RAW),
)
"""Istio's per-family loops, in the order its builder runs them; each loop runs for IPv4, then for IPv6."""


def _loop(rule: Rule) -> int | None:
    return next((rank for rank, loop in enumerate(_FAMILY_LOOPS) if loop.holds(rule)), None)


def _merge_lists(first: Sequence[Rule], second: Sequence[Rule]) -> list[Entry]:
    entries = [(Family.V4, rule) for rule in first] + [(Family.V6, rule) for rule in second]
    if not first or not second:
        return entries
    ranks: list[int] = []
    for rules in (first, second):
        rank = -1  # a rule of no loop (the jump to the DNS chain) stays with the rules before it
        for rule in rules:
            loop = _loop(rule)
            rank = rank if loop is None else loop
            ranks.append(rank)
    # Stable: by loop, then IPv4 before IPv6, then each family's own order.
    order = sorted(range(len(entries)), key=lambda k: (ranks[k], entries[k][0].value))
    return [entries[k] for k in order]
