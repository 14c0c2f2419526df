"""Rules read back from text: iptables-restore payloads and ``iptables-save`` output, into the model.

Both spellings are understood: Istio's (``--to-ports 15001``, ``--mark 1337``) and the kernel's as
iptables-save prints it (``-m tcp --dport``, ``--mark 0x539``, ``--set-xmark 0x53a/0xffffffff``).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable, Iterable, Iterator
from functools import cache

from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import (
    BUILTIN_CHAINS,
    COMMENT_PREFIX,
    ISTIO_CHAINS,
    Connmark,
    ConntrackState,
    CtState,
    CtZone,
    Destination,
    DestinationPort,
    DestinationPorts,
    GidOwner,
    InInterface,
    InSet,
    Jump,
    Mark,
    Match,
    OutInterface,
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
    declared_chains,
)
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.records import field, mutable_record, record, replace
from istio_iptables.render.iptables import rule_text, save_text

TYPE_CHECKING = False  # typing is not imported at run time (records.py says why)
if TYPE_CHECKING:
    from typing import Any

FULL_MASK = 0xFFFFFFFF
# Targets that take no option and so could be mistaken for a jump to a chain of that name.
_EXTENSION_TARGETS = frozenset(
    {
        *("MASQUERADE", "REJECT", "NOTRACK", "LOG", "NFLOG", "QUEUE", "NFQUEUE", "TRACE", "CHECKSUM", "TCPMSS"),
        *("AUDIT", "DNAT", "SNAT", "REDIRECT", "TPROXY", "MARK", "CONNMARK", "CT"),
    }
)


_TABLE_NAMES = frozenset(table.value for table in Table)


class UnparsedRuleError(ValueError):
    """A rule using something this model does not describe (a foreign rule, usually)."""


_UNREAD: Any = object()


class SavedRule:
    """One rule line as read, with its meaning when the model can express it (else ``rule`` is None).

    Read from a save, the line is parsed on first use: an unchanged re-run compares the text of our
    chains' 10,000 rules without parsing one of them."""

    __slots__ = ("_rule", "chain", "table", "text")

    def __init__(self, chain: str, text: str, rule: Rule | None = _UNREAD, table: Table | None = None) -> None:
        self.chain, self.text, self._rule, self.table = chain, text, rule, table

    @property
    def rule(self) -> Rule | None:
        if self._rule is _UNREAD:
            self._rule = _parse_line(self.table, self.text) if self.table else None
        rule: Rule | None = self._rule
        return rule

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SavedRule) and (self.chain, self.text) == (other.chain, other.text)

    def __hash__(self) -> int:
        return hash((self.chain, self.text))

    def __repr__(self) -> str:
        return f"SavedRule({self.chain!r}, {self.text!r})"


def _parse_line(table: Table, line: str) -> Rule | None:
    try:
        # shlex only where save quoted something (a comment); it is slow on 10,000 rules.
        return parse_rule(table, shlex.split(line) if '"' in line or "'" in line else line.split())
    except (UnparsedRuleError, ValueError, StopIteration):
        return None


@mutable_record
class TableState:
    chains: dict[str, str | None] = field(default_factory=dict)
    """Declared chains in order: built-in ones with their policy, user chains with None."""
    entries: list[SavedRule] = field(default_factory=list)
    """Rule lines in order."""
    places: dict[str, list[Rule]] = field(default_factory=dict)
    """Where the plan of this run puts our rules in the built-in chains (``locate``): what tells ours apart."""

    @property
    def rules(self) -> list[Rule]:
        return [entry.rule for entry in self.entries if entry.rule is not None]

    @property
    def unparsed(self) -> list[str]:
        """Rule lines the model cannot express, kept verbatim."""
        return [entry.text for entry in self.entries if entry.rule is None]


def parse_tables(text: str) -> dict[Table, TableState]:
    """Parse restore or save text. Tables this program never uses (security, ...) are skipped."""
    tables: dict[Table, TableState] = {}
    table: Table | None = None
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            name = line[1:].strip()
            table = Table(name) if name in _TABLE_NAMES else None
            if table is not None:
                tables.setdefault(table, TableState())
            continue
        if line == "COMMIT":
            table = None
            continue
        if table is None:
            continue
        current = tables[table]
        if line.startswith(":"):
            chain, policy = [*line[1:].split(), "-"][:2]
            current.chains[chain] = None if policy == "-" else policy
        elif line.startswith("-N "):
            current.chains[line[3:].strip()] = None
        elif line.startswith(("-A ", "-I ")):
            chain = line.split(maxsplit=2)[1] if len(line.split(maxsplit=2)) > 1 else ""
            current.entries.append(SavedRule(chain, line, table=table))
        else:
            raise ValueError(f"line {number}: not iptables-restore syntax: {line}")
    return tables


def parse_rule(table: Table, tokens: list[str]) -> Rule:
    """``-A CHAIN args...`` or ``-I CHAIN [N] args...`` as a Rule."""
    command, chain, *arguments = tokens
    position = None
    if command == "-I":
        position = int(arguments.pop(0)) if arguments and arguments[0].isdigit() else 1
    comment = None
    if "--comment" in arguments:
        at = arguments.index("--comment")
        if at < 2 or arguments[at - 2 : at] != ["-m", "comment"] or at + 1 >= len(arguments):
            raise UnparsedRuleError("comment without its match")
        comment = arguments[at + 1]
        del arguments[at - 2 : at + 2]
    clauses, target = parse_arguments(arguments)
    return Rule(table, chain, clauses, target, position, comment)


def parse_arguments(arguments: list[str]) -> tuple[tuple[Match, ...], Target]:
    clauses: list[Match] = []
    tokens = iter(arguments)
    negated = False
    module = ""
    for token in tokens:
        if token == "!":
            negated = True
            continue
        if token == "-j":
            return tuple(clauses), _target(next(tokens), list(tokens))
        if token == "-m":
            module = next(tokens)
            continue
        if token == "--match-set" and module == "set":
            name, direction = next(tokens), next(tokens)
            if direction != "dst":
                raise UnparsedRuleError(f"a set match on {direction}")
            clauses.append(InSet(name, negated))
        else:
            clauses.append(_clause(token, next(tokens), negated, module))
        negated = False
    raise UnparsedRuleError("rule without a target")


def _clause(option: str, value: str, negated: bool, module: str) -> Match:
    if option in ("-p", "--protocol"):
        return Protocol(Proto(value), negated)
    if option in ("-s", "--source"):
        return Source(_network(value), negated)
    if option in ("-d", "--destination"):
        return Destination(_network(value), negated)
    if option in ("-i", "--in-interface"):
        return InInterface(value, negated)
    if option in ("-o", "--out-interface"):
        return OutInterface(value, negated)
    if option in ("--dport", "--destination-port") and module != "multiport":
        return DestinationPort(int(value), negated)
    if option in ("--sport", "--source-port") and module != "multiport":
        return SourcePort(int(value), negated)
    if option in ("--dports", "--destination-ports"):
        return DestinationPorts(tuple(int(port) for port in value.split(",")), negated)
    if option == "--uid-owner":
        return UidOwner(int(value), negated)
    if option == "--gid-owner":
        return GidOwner(int(value) if value.isdigit() else value, negated)
    if option == "--mark" and module in ("mark", "connmark"):
        return (Mark if module == "mark" else Connmark)(_full_mask_value(value), negated)
    if option == "--ctstate":
        return ConntrackState(tuple(CtState(state) for state in value.split(",")), negated)
    raise UnparsedRuleError(f"unknown match option {option}")


def _target(name: str, arguments: list[str]) -> Target:
    """A target, only when every option it carries is one the model keeps; anything more is foreign."""
    options = dict(_options(arguments))
    keys = set(options)
    if name in Verdict.__members__ and not options:
        return Verdict(name)
    if name == "REDIRECT" and len(keys) == 1 and keys <= {"--to-ports", "--to-port"}:
        return Redirect(int(options.popitem()[1]))
    on_ip = options.get("--on-ip", "0.0.0.0")
    if name == "TPROXY" and keys - {"--on-ip"} == {"--on-port", "--tproxy-mark"} and on_ip in ("0.0.0.0", "::"):
        mark, _, mask = options["--tproxy-mark"].partition("/")
        return Tproxy(int(options["--on-port"]), int(mark, 0), int(mask or str(FULL_MASK), 0))
    if name == "MARK" and len(keys) == 1 and keys <= {"--set-mark", "--set-xmark"}:
        return SetMark(_full_mask_value(options.popitem()[1]))
    if name == "CONNMARK" and _full_masks(options, "--nfmask", "--ctmask"):
        if keys - {"--nfmask", "--ctmask"} == {"--save-mark"}:
            return SaveMark()
        if keys - {"--nfmask", "--ctmask"} == {"--restore-mark"}:
            return RestoreMark()
    if name == "CT" and keys == {"--zone"}:
        return CtZone(int(options["--zone"]))
    if not options and name not in _EXTENSION_TARGETS:
        return Jump(name)
    raise UnparsedRuleError(f"unknown target {name} {' '.join(arguments)}".strip())


def _options(arguments: list[str]) -> Iterator[tuple[str, str]]:
    """``--flag [value]`` pairs; a flag followed by another flag has no value."""
    index = 0
    while index < len(arguments):
        option = arguments[index]
        has_value = index + 1 < len(arguments) and not arguments[index + 1].startswith("--")
        yield option, arguments[index + 1] if has_value else ""
        index += 2 if has_value else 1


def _full_masks(options: dict[str, str], *names: str) -> bool:
    return all(int(options.get(name, str(FULL_MASK)), 0) == FULL_MASK for name in names)


def _full_mask_value(text: str) -> int:
    value, _, mask = text.partition("/")
    if mask and int(mask, 0) != FULL_MASK:
        raise UnparsedRuleError(f"masked mark {text}")
    return int(value, 0)


def _network(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    return ipaddress.ip_interface(text)


def tables_holding(rules: Iterable[Rule], spell: Callable[[Rule], str] = rule_text) -> dict[Table, TableState]:
    """The tables of a namespace holding exactly these rules, in the kernel's order (each insert at its
    position), each rule written by ``spell`` (Istio's spelling unless told otherwise); all of them ours."""
    tables: dict[Table, TableState] = {}
    rules = list(rules)
    for table, declared in declared_chains(rules).items():
        tables.setdefault(table, TableState()).chains.update(dict.fromkeys(declared))
    in_chains: dict[Table, dict[str, list[SavedRule]]] = {}
    for rule in rules:
        tables.setdefault(rule.table, TableState())
        saved = replace(rule, position=None)
        chain = in_chains.setdefault(rule.table, {}).setdefault(rule.chain, [])
        entry = SavedRule(rule.chain, spell(saved), saved)
        if rule.position is None or rule.position > len(chain):
            chain.append(entry)
        else:
            chain.insert(rule.position - 1, entry)
    for table, chains in in_chains.items():
        state = tables[table]
        state.entries = [entry for entries in chains.values() for entry in entries]
        state.places = {
            chain: [canonical(entry.rule, _as_stored) for entry in entries if entry.rule is not None]
            for chain, entries in chains.items()
            if chain in BUILTIN_CHAINS
        }
    return tables


# ---- ownership: which live rules this program wrote ----------------------------------------------------

OWN_CHAINS = frozenset(ISTIO_CHAINS)
_COMMENT_MARK = f'--comment "{COMMENT_PREFIX}'

Places = dict[Table, dict[str, list[Rule]]]
"""Where a plan puts our rules in built-in chains: per table and chain, the rules as the kernel keeps them
(``canonical``, group names as ids), in the kernel's order."""


def plan_places(rules: Iterable[Rule], group_id: Callable[[int | str], int | str]) -> Places:
    places: Places = {}
    for table, state in tables_holding(rule for rule in rules if rule.chain in BUILTIN_CHAINS).items():
        chains = places.setdefault(table, {})
        for entry in state.entries:
            rule = entry.rule
            assert rule is not None  # tables_holding keeps the rules it is given
            chains.setdefault(entry.chain, []).append(canonical(rule, group_id))
    return places


def locate(tables: dict[Table, TableState], places: Places) -> dict[Table, TableState]:
    """The tables, each told where the plan puts our rules in its built-in chains (what ownership needs)."""
    for table, state in tables.items():
        state.places = places.get(table, {})
    return tables


def own_entries(state: TableState) -> list[SavedRule]:
    """The rules of a table that this program wrote, in order (``ownership`` says which)."""
    return [entry for entry, own in zip(state.entries, ownership(state), strict=True) if own]


def foreign_entries(state: TableState) -> list[SavedRule]:
    """The rules of a table that someone else wrote, in order (what status lists apart and nothing touches)."""
    return [entry for entry, own in zip(state.entries, ownership(state), strict=True) if not own]


def holds_own(state: TableState) -> bool:
    """Whether a table holds a chain or a rule of ours."""
    return any(chain in OWN_CHAINS for chain in state.chains) or any(ownership(state))


def ownership(state: TableState) -> list[bool]:
    """Per rule of the table, whether this program wrote it. Ours: every rule in our chains (``ISTIO_*``),
    every jump to them, every rule with our ``--rule-comments`` comment, and in built-in chains otherwise
    only rules standing where the plan puts them (``state.places``: the same rule, on the same side of each
    of our jumps around it). A rule an earlier configuration left there is ours only where our chains and
    jumps vouch for it (``_vouched``); once the table holds our comments, the comments alone decide."""
    entries = state.entries
    owned = [entry.chain in OWN_CHAINS or _COMMENT_MARK in entry.text for entry in entries]
    exact = any(_COMMENT_MARK in entry.text for entry in entries)
    chains: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        if entry.chain in BUILTIN_CHAINS:
            chains.setdefault(entry.chain, []).append(index)
    ours_here = any(chain in OWN_CHAINS for chain in state.chains)
    for chain, indexes in chains.items():
        rules = [entries[index].rule for index in indexes]
        for at, rule in enumerate(rules):
            if rule is not None and _jumps_to_ours(rule):
                owned[indexes[at]] = True
        # Where no chain of ours is, nothing stands where the plan put it: a rule like ours is someone else's.
        for at in _at_planned_places(rules, state.places.get(chain, []) if ours_here else []):
            owned[indexes[at]] = True
    if not exact:
        for index in _vouched(state, chains, owned):
            owned[index] = True
    return owned


def _jumps_to_ours(rule: Rule) -> bool:
    return isinstance(rule.target, Jump) and rule.target.chain in OWN_CHAINS


def _as_stored(group: int | str) -> int | str:
    """Live rules hold group ids already (iptables resolved the names when it read them)."""
    return group


def _at_planned_places(rules: list[Rule | None], planned: list[Rule]) -> list[int]:
    """Which of a built-in chain's live rules (by index) stand where the plan puts a rule: the same rule, after
    each of our jumps the plan puts before it and before each one it puts after it (among those the chain
    holds). Each planned rule claims at most one live rule, in order. Linear in the two lengths."""
    if not planned:
        return []
    live = [canonical(rule, _as_stored) if rule is not None else None for rule in rules]
    first: dict[Rule, int] = {}
    last: dict[Rule, int] = {}
    spots: dict[Rule, list[int]] = {}
    for index, rule in enumerate(live):
        if rule is None:
            continue
        if _jumps_to_ours(rule):
            first.setdefault(rule, index)
            last[rule] = index
        else:
            spots.setdefault(rule, []).append(index)
    after = [-1] * len(planned)  # the index a live rule must come after
    bound = -1
    for at, rule in enumerate(planned):
        after[at] = bound
        bound = max(bound, first.get(rule, -1))
    before = [len(live)] * len(planned)  # the index it must come before
    bound = len(live)
    for at in range(len(planned) - 1, -1, -1):
        before[at] = bound
        bound = min(bound, last.get(planned[at], len(live)))
    claimed: list[int] = []
    cursor: dict[Rule, int] = {}
    for at, rule in enumerate(planned):
        candidates = spots.get(rule)
        if not candidates:
            continue
        next_one = cursor.get(rule, 0)
        while next_one < len(candidates) and candidates[next_one] <= after[at]:
            next_one += 1
        if next_one < len(candidates) and candidates[next_one] < before[at]:
            claimed.append(candidates[next_one])
            next_one += 1
        cursor[rule] = next_one
    return claimed


Signature = tuple[Table, str, tuple[tuple[str, bool], ...], str]


def _signature(rule: Rule) -> Signature:
    """A rule's shape without its values: what kind of rule it is, not which port or interface."""
    clauses = tuple(sorted((type(clause).__name__, clause.negated) for clause in rule.clauses))
    target = rule.target.value if isinstance(rule.target, Verdict) else type(rule.target).__name__
    return rule.table, rule.chain, clauses, target


@record
class _Sides:
    """Where one shape of rule stands in its built-in chain: before or after our jumps to which chains. A chain
    found on both sides in some configurations constrains nothing."""

    before: frozenset[str] = frozenset()
    after: frozenset[str] = frozenset()

    def beside(self, before: Iterable[str], after: Iterable[str]) -> _Sides:
        """These sides joined with those of one more occurrence."""
        seen_before, seen_after = self.before | set(before), self.after | set(after)
        return _Sides(seen_before - seen_after, seen_after - seen_before)


@cache
def _builtin_shapes() -> dict[Signature, _Sides]:
    """Every shape of rule (other than a jump to our chains) that any configuration of this program puts in a
    built-in chain, with its sides among our jumps, taken from the plan itself with every feature turned on
    (REDIRECT and TPROXY), so the two can never disagree."""
    everything = Config(
        inbound_ports=ALL,
        exclude_interfaces=("eth0",),
        kube_virt_interfaces=("eth1",),
        drop_invalid=True,
        redirect_dns=True,
        capture_all_dns=True,
        ipv6=True,
    )
    shapes: dict[Signature, _Sides] = {}
    for config in (
        replace(everything, service_cidrs=ALL),
        replace(everything, service_cidrs=(ipaddress.ip_interface("10.0.0.0/8"),), mode=Mode.TPROXY),
    ):
        for ruleset in build_plan(config, HostFacts()).rulesets:
            for chains in plan_places(ruleset.rules, _as_stored).values():
                for rules in chains.values():
                    targets = [rule.target.chain if isinstance(rule.target, Jump) else "" for rule in rules]
                    for at, rule in enumerate(rules):
                        if not targets[at]:
                            sides = shapes.get(_signature(rule), _Sides())
                            shapes[_signature(rule)] = sides.beside(
                                filter(None, targets[:at]), filter(None, targets[at + 1 :])
                            )
    return shapes


def _vouched(state: TableState, chains: dict[str, list[int]], owned: list[bool]) -> list[int]:
    """Rules in built-in chains that an earlier configuration of this program put there (the plan of this run
    does not have them), told from foreign rules of the same shape by what our chains and jumps show: a shape
    some configuration writes, standing on its side of each of our jumps; an interface RETURN only beside its
    partner (an excluded interface is a PREROUTING ``-i X`` and OUTPUT ``-o X`` pair; a KubeVirt ``-i X`` comes
    with its jump ``-i X ... -j ISTIO_REDIRECT``); in mangle only where TPROXY's chains are, with their marks."""
    if not any(chain in OWN_CHAINS for chain in state.chains):
        return []
    entries = state.entries
    unowned = [index for indexes in chains.values() for index in indexes if not owned[index]]
    if not unowned:
        return []  # the common case (our rules where the plan puts them): no need to derive the shapes
    shapes = _builtin_shapes()
    candidates: dict[int, Rule] = {}
    for index in unowned:
        rule = entries[index].rule
        if rule is not None and _signature(rule) in shapes:
            candidates[index] = rule
    if not candidates:
        return []
    jumps: dict[str, list[tuple[int, str]]] = {}
    kube_virt = set()
    for chain, indexes in chains.items():
        for index in indexes:
            rule = entries[index].rule
            if rule is not None and isinstance(rule.target, Jump) and rule.target.chain in OWN_CHAINS:
                jumps.setdefault(chain, []).append((index, rule.target.chain))
                if rule.target.chain == "ISTIO_REDIRECT":
                    kube_virt |= {clause.name for clause in rule.clauses if isinstance(clause, InInterface)}
    # On its side of each of our jumps: the plan puts it before (or after) our jumps to some chains.
    placed = {
        index: rule
        for index, rule in candidates.items()
        if not any(
            (target in shapes[_signature(rule)].after and at < index)
            or (target in shapes[_signature(rule)].before and at > index)
            for at, target in jumps.get(entries[index].chain, [])
        )
    }
    returns = {(entries[index].chain, name) for index in placed if (name := _interface_return(entries[index]))}
    tproxy_marks = _marks_of_our_chains(state) if "ISTIO_INBOUND" in state.chains else None
    # A configuration writes each of these rules once: a second copy is someone else's.
    present = {
        (entries[index].chain, canonical(rule, _as_stored))
        for indexes in chains.values()
        for index in indexes
        if owned[index] and (rule := entries[index].rule) is not None
    }
    vouched = []
    for index, rule in placed.items():
        chain = entries[index].chain
        if (chain, canonical(rule, _as_stored)) in present:
            continue
        name = _interface_return(entries[index])
        partner = ("OUTPUT", name) if chain == "PREROUTING" else ("PREROUTING", name)
        if name is not None and not (
            partner in returns or (rule.table is Table.NAT and chain == "PREROUTING" and name in kube_virt)
        ):
            continue
        if rule.table is Table.MANGLE and (tproxy_marks is None or not _marks_of(rule) <= tproxy_marks):
            continue
        vouched.append(index)
        present.add((chain, canonical(rule, _as_stored)))
    return vouched


def _interface_return(entry: SavedRule) -> str | None:
    rule = entry.rule
    if rule is None or rule.target is not Verdict.RETURN or len(rule.clauses) != 1:
        return None
    clause = rule.clauses[0]
    if entry.chain == "PREROUTING" and isinstance(clause, InInterface) and not clause.negated:
        return clause.name
    if entry.chain == "OUTPUT" and isinstance(clause, OutInterface) and not clause.negated:
        return clause.name
    return None


_MARK_OPTION = re.compile(r"--(?:mark|set-xmark|set-mark|tproxy-mark) (\S+)")


def _marks_of_our_chains(state: TableState) -> set[int]:
    """The marks our chains of a table match and set (read from the text: they may hold 10,000 rules)."""
    return {
        int(value.split("/")[0], 0)
        for entry in state.entries
        if entry.chain in OWN_CHAINS
        for value in _MARK_OPTION.findall(entry.text)
    }


def _marks_of(rule: Rule) -> set[int]:
    marks = {clause.mark for clause in rule.clauses if isinstance(clause, Mark | Connmark)}
    return marks | ({rule.target.mark} if isinstance(rule.target, SetMark) else set())


# ---- layout: our rules per table and chain, in kernel order, comparable between plan and live ---------

Layout = dict[Table, dict[str, list[str]]]
"""Per table, per chain (ours, and built-in chains holding ours), the canonical text of our rules in order."""


# iptables-save's clause order: addresses and interfaces, protocol, then the extension matches.
_CLAUSE_ORDER = (
    Source,
    Destination,
    InInterface,
    OutInterface,
    Protocol,
    SourcePort,
    DestinationPort,
    DestinationPorts,
)


def canonical(rule: Rule, group_id: Callable[[int | str], int | str]) -> Rule:
    """The rule as the kernel keeps it: clauses in iptables-save's order, networks masked, group names as ids."""

    def order(clause: Match) -> int:
        # A stable sort: clauses of one kind keep their order, as iptables-save keeps it.
        kind = type(clause)
        return _CLAUSE_ORDER.index(kind) if kind in _CLAUSE_ORDER else len(_CLAUSE_ORDER)

    def kernel_form(clause: Match) -> Match:
        if isinstance(clause, Source | Destination) and clause.network.ip != clause.network.network.network_address:
            return replace(clause, network=ipaddress.ip_interface(clause.network.network))
        if isinstance(clause, GidOwner):
            return replace(clause, group=group_id(clause.group))
        return clause

    clauses = [kernel_form(clause) for clause in rule.clauses]
    return Rule(rule.table, rule.chain, tuple(sorted(clauses, key=order)), rule.target, comment=rule.comment)


Chains = set[tuple[Table, str]]


def planned_layout(
    rules: Iterable[Rule], group_id: Callable[[int | str], int | str], only: Chains | None = None
) -> Layout:
    """Where the plan's rules end up, in the canonical spelling that live rules are compared in."""
    rules = [rule for rule in rules if only is None or (rule.table, rule.chain) in only]
    return live_layout(tables_holding(rules), group_id, only)


def live_layout(
    tables: dict[Table, TableState], group_id: Callable[[int | str], int | str] | None, only: Chains | None = None
) -> Layout:
    """Our chains and our rules per chain (``only`` some of them, if given), canonically spelled; with
    ``group_id`` None, as the text reads (for comparing a save with the plan spelled as iptables-save prints
    it, without parsing)."""
    layout: Layout = {}
    for table, state in tables.items():
        for chain in state.chains:
            if chain in OWN_CHAINS and (only is None or (table, chain) in only):
                layout.setdefault(table, {}).setdefault(chain, [])
        for entry in own_entries(state):
            if only is not None and (table, entry.chain) not in only:
                continue
            rule = None if group_id is None else entry.rule
            text = entry.text if rule is None or group_id is None else rule_text(canonical(rule, group_id))
            layout.setdefault(table, {}).setdefault(entry.chain, []).append(text)
    return layout


def saved_as_planned(rules: Iterable[Rule], group_id: Callable[[int | str], int | str]) -> Layout:
    """The plan's rules as iptables-save prints them, to compare with a save's text as it reads."""
    return live_layout(tables_holding(rules, lambda rule: save_text(canonical(rule, group_id))), None)


def differing_chains(expected: Layout, live: Layout) -> Chains:
    return {
        (table, chain)
        for table in expected.keys() | live.keys()
        for chain in expected.get(table, {}).keys() | live.get(table, {}).keys()
        if expected.get(table, {}).get(chain) != live.get(table, {}).get(chain)
    }


def layout_lines(layout: Layout) -> list[str]:
    """A layout as lines for a readable diff, tables and chains in a stable order."""
    lines = []
    for table in sorted(layout, key=lambda table: table.value):
        for chain in sorted(layout[table]):
            lines.append(f"*{table.value} {chain}")
            lines.extend(f"  {text}" for text in layout[table][chain])
    return lines


def drift(expected: Layout, live: Layout) -> list[str]:
    """A unified diff of expected against live; empty when in sync."""
    import difflib  # noqa: PLC0415 (only drift needs it; start-up is a feature)

    return list(difflib.unified_diff(layout_lines(expected), layout_lines(live), "expected", "live", n=1, lineterm=""))


@record
class LayoutDiff:
    """Our rules that the plan has and the live tables lack, that the live tables have in excess, and that
    differ in place (expected, live). Each rule is (table, chain, text)."""

    missing: list[tuple[Table, str, str]]
    extra: list[tuple[Table, str, str]]
    changed: list[tuple[tuple[Table, str, str], tuple[Table, str, str]]]


def compare(expected: Layout, live: Layout) -> LayoutDiff:
    import difflib  # noqa: PLC0415 (only drift needs it; start-up is a feature)

    missing, extra, changed = [], [], []
    for table in sorted(set(expected) | set(live), key=lambda table: table.value):
        chains = set(expected.get(table, {})) | set(live.get(table, {}))
        for chain in sorted(chains):
            want, have = expected.get(table, {}).get(chain, []), live.get(table, {}).get(chain, [])
            if want == have:
                continue
            for operation, w1, w2, h1, h2 in difflib.SequenceMatcher(a=want, b=have, autojunk=False).get_opcodes():
                wanted = [(table, chain, text) for text in want[w1:w2]]
                found = [(table, chain, text) for text in have[h1:h2]]
                if operation == "replace":
                    changed += list(zip(wanted, found, strict=False))
                    missing += wanted[len(found) :]
                    extra += found[len(wanted) :]
                elif operation == "delete":
                    missing += wanted
                elif operation == "insert":
                    extra += found
    return LayoutDiff(missing, extra, changed)
