"""Rules read back from text: iptables-restore payloads and ``iptables-save`` output, into the model.

Both spellings are understood: Istio's (``--to-ports 15001``, ``--mark 1337``) and the kernel's as
iptables-save prints it (``-m tcp --dport``, ``--mark 0x539``, ``--set-xmark 0x53a/0xffffffff``).
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Callable, Iterable, Iterator
from functools import cache

from .config import ALL, Config, Mode
from .hostfacts import HostFacts
from .model import (
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
from .plan import build_plan
from .records import field, mutable_record, record, replace
from .render.iptables import rule_text, save_text

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
    position), each rule written by ``spell`` (Istio's spelling unless told otherwise)."""
    tables: dict[Table, TableState] = {}
    rules = list(rules)
    for table, chains in declared_chains(rules).items():
        tables.setdefault(table, TableState()).chains.update(dict.fromkeys(chains))
    for rule in rules:
        state = tables.setdefault(rule.table, TableState())
        saved = replace(rule, position=None)
        entry = SavedRule(rule.chain, spell(saved), saved)
        if rule.position is None:
            state.entries.append(entry)
        else:
            chain_entries = [index for index, entry in enumerate(state.entries) if entry.chain == rule.chain]
            at = chain_entries[rule.position - 1] if rule.position <= len(chain_entries) else len(state.entries)
            state.entries.insert(at, entry)
    return tables


# ---- ownership: which live rules this program wrote ----------------------------------------------------

OWN_CHAINS = frozenset(ISTIO_CHAINS)


def _signature(rule: Rule) -> tuple[Table, str, tuple[tuple[str, bool], ...], str]:
    """A rule's shape without its values: what kind of rule it is, not which port or interface."""
    clauses = tuple(sorted((type(clause).__name__, clause.negated) for clause in rule.clauses))
    target = rule.target.value if isinstance(rule.target, Verdict) else type(rule.target).__name__
    return rule.table, rule.chain, clauses, target


@cache
def _builtin_chain_signatures() -> frozenset[tuple[Table, str, tuple[tuple[str, bool], ...], str]]:
    """The shapes of every rule any configuration of this program puts in a built-in chain, taken from the
    plan itself with every feature turned on (REDIRECT and TPROXY), so the two can never disagree."""
    everything = Config(
        inbound_ports=ALL,
        exclude_interfaces=("eth0",),
        kube_virt_interfaces=("eth1",),
        drop_invalid=True,
        redirect_dns=True,
        capture_all_dns=True,
        ipv6=True,
    )
    signatures: set[tuple[Table, str, tuple[tuple[str, bool], ...], str]] = set()
    for config in (
        replace(everything, service_cidrs=ALL),
        replace(everything, service_cidrs=(ipaddress.ip_interface("10.0.0.0/8"),), mode=Mode.TPROXY),
    ):
        for ruleset in build_plan(config, HostFacts()).rulesets:
            signatures.update(_signature(rule) for rule in ruleset.rules if rule.chain in BUILTIN_CHAINS)
    return frozenset(signatures)


def own_entries(state: TableState) -> list[SavedRule]:
    """The rules of a table that this program wrote, in order: everything in our chains, jumps to them, and
    rules in built-in chains shaped like ours. An interface RETURN (``-i X -j RETURN``) is a common shape, so
    it counts as ours only beside its partner: excluded interfaces always come as a PREROUTING ``-i X`` and
    an OUTPUT ``-o X`` pair; a KubeVirt ``-i X`` comes alone, in nat, only where our chains are."""
    returns = {(entry.chain, name) for entry in state.entries if (name := _interface_return(entry))}
    ours_here = any(chain in OWN_CHAINS for chain in state.chains)

    def is_own(entry: SavedRule) -> bool:
        if entry.chain in OWN_CHAINS or f'--comment "{COMMENT_PREFIX}' in entry.text:
            return True
        rule = entry.rule
        if rule is None or entry.chain not in BUILTIN_CHAINS:
            return False
        if isinstance(rule.target, Jump):
            return rule.target.chain in OWN_CHAINS
        name = _interface_return(entry)
        if name is None:
            return _signature(rule) in _builtin_chain_signatures()
        partner = ("OUTPUT", name) if entry.chain == "PREROUTING" else ("PREROUTING", name)
        kube_virt = rule.table is Table.NAT and entry.chain == "PREROUTING" and ours_here
        return partner in returns or kube_virt

    return [entry for entry in state.entries if is_own(entry)]


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


def holds_own(state: TableState) -> bool:
    return any(chain in OWN_CHAINS for chain in state.chains) or bool(own_entries(state))


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


def planned_layout(rules: Iterable[Rule], group_id: Callable[[int | str], int | str]) -> Layout:
    """Where the plan's rules end up, in the canonical spelling that live rules are compared in."""
    return live_layout(tables_holding(rules), group_id)


def live_layout(tables: dict[Table, TableState], group_id: Callable[[int | str], int | str] | None) -> Layout:
    """Our chains and our rules per chain, canonically spelled; with ``group_id`` None, as the text reads
    (for comparing a save with the plan spelled as iptables-save prints it, without parsing)."""
    layout: Layout = {}
    for table, state in tables.items():
        for chain in state.chains:
            if chain in OWN_CHAINS:
                layout.setdefault(table, {}).setdefault(chain, [])
        for entry in own_entries(state):
            rule = None if group_id is None else entry.rule
            text = entry.text if rule is None or group_id is None else rule_text(canonical(rule, group_id))
            layout.setdefault(table, {}).setdefault(entry.chain, []).append(text)
    return layout


def saved_as_planned(rules: Iterable[Rule], group_id: Callable[[int | str], int | str]) -> Layout:
    """The plan's rules as iptables-save prints them, to compare with a save's text as it reads."""
    return live_layout(tables_holding(rules, lambda rule: save_text(canonical(rule, group_id))), None)


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
