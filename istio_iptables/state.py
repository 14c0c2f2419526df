"""Rules read back from text: iptables-restore payloads and ``iptables-save`` output, into the model.

Both spellings are understood: Istio's (``--to-ports 15001``, ``--mark 1337``) and the kernel's as
iptables-save prints it (``-m tcp --dport``, ``--mark 0x539``, ``--set-xmark 0x53a/0xffffffff``).
"""

from __future__ import annotations

import ipaddress
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field

from .model import (
    Connmark,
    ConntrackState,
    CtState,
    CtZone,
    Destination,
    DestinationPort,
    DestinationPorts,
    GidOwner,
    InInterface,
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
)

FULL_MASK = 0xFFFFFFFF
# Targets that take no option and so could be mistaken for a jump to a chain of that name.
_EXTENSION_TARGETS = frozenset(
    {
        "MASQUERADE",
        "REJECT",
        "NOTRACK",
        "LOG",
        "NFLOG",
        "QUEUE",
        "NFQUEUE",
        "TRACE",
        "CHECKSUM",
        "TCPMSS",
        "AUDIT",
    }
)


_TABLE_NAMES = frozenset(table.value for table in Table)


class UnparsedRuleError(ValueError):
    """A rule using something this model does not describe (a foreign rule, usually)."""


@dataclass
class TableState:
    chains: dict[str, str | None] = field(default_factory=dict)
    """Declared chains in order: built-in ones with their policy, user chains with None."""
    rules: list[Rule] = field(default_factory=list)
    unparsed: list[str] = field(default_factory=list)
    """Rule lines the model cannot express, kept verbatim."""


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
            try:
                current.rules.append(parse_rule(table, shlex.split(line)))
            except (UnparsedRuleError, ValueError):
                current.unparsed.append(line)
        else:
            raise ValueError(f"line {number}: not iptables-restore syntax: {line}")
    return tables


def parse_rule(table: Table, tokens: list[str]) -> Rule:
    """``-A CHAIN args...`` or ``-I CHAIN [N] args...`` as a Rule."""
    command, chain, *arguments = tokens
    position = None
    if command == "-I":
        position = int(arguments.pop(0)) if arguments and arguments[0].isdigit() else 1
    clauses, target = parse_arguments(arguments)
    return Rule(table, chain, clauses, target, position)


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
    options = dict(_options(arguments))
    if name in Verdict.__members__ and not options:
        return Verdict(name)
    if name == "REDIRECT":
        return Redirect(int(options.get("--to-ports") or options["--to-port"]))
    if name == "TPROXY" and options.get("--on-ip", "0.0.0.0") in ("0.0.0.0", "::"):
        mark, _, mask = options["--tproxy-mark"].partition("/")
        return Tproxy(int(options["--on-port"]), int(mark, 0), int(mask or str(FULL_MASK), 0))
    if name == "MARK":
        return SetMark(_full_mask_value(options.get("--set-mark") or options["--set-xmark"]))
    if name == "CONNMARK" and _full_masks(options, "--nfmask", "--ctmask"):
        if set(options) - {"--nfmask", "--ctmask"} == {"--save-mark"}:
            return SaveMark()
        if set(options) - {"--nfmask", "--ctmask"} == {"--restore-mark"}:
            return RestoreMark()
    if name == "CT" and set(options) == {"--zone"}:
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
