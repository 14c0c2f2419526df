"""Rules as iptables arguments, spelled exactly as Istio writes them (shared by restore and commands)."""

from __future__ import annotations

from ..model import (
    Connmark,
    ConntrackState,
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
    Target,
    Tproxy,
    UidOwner,
    Verdict,
)


def rule_text(rule: Rule) -> str:
    """``-A CHAIN args`` or ``-I CHAIN N args``."""
    head = ["-A", rule.chain] if rule.position is None else ["-I", rule.chain, str(rule.position)]
    return " ".join(head + rule_arguments(rule))


def rule_arguments(rule: Rule) -> list[str]:
    arguments = [token for clause in rule.clauses for token in match_arguments(clause)]
    return arguments + target_arguments(rule.target, _protocol(rule))


def match_arguments(clause: Match) -> list[str]:
    bang = ["!"] if clause.negated else []
    if isinstance(clause, Protocol):
        return [*bang, "-p", clause.protocol.value]
    if isinstance(clause, Source):
        return [*bang, "-s", str(clause.network)]
    if isinstance(clause, Destination):
        return [*bang, "-d", str(clause.network)]
    if isinstance(clause, InInterface):
        return [*bang, "-i", clause.name]
    if isinstance(clause, OutInterface):
        return [*bang, "-o", clause.name]
    if isinstance(clause, DestinationPort):
        return [*bang, "--dport", str(clause.port)]
    if isinstance(clause, SourcePort):
        return [*bang, "--sport", str(clause.port)]
    if isinstance(clause, DestinationPorts):
        return ["-m", "multiport", *bang, "--dports", ",".join(map(str, clause.ports))]
    if isinstance(clause, UidOwner):
        return ["-m", "owner", *bang, "--uid-owner", str(clause.uid)]
    if isinstance(clause, GidOwner):
        return ["-m", "owner", *bang, "--gid-owner", str(clause.group)]
    if isinstance(clause, Mark):
        return ["-m", "mark", *bang, "--mark", str(clause.mark)]
    if isinstance(clause, ConntrackState):
        return ["-m", "conntrack", *bang, "--ctstate", ",".join(state.value for state in clause.states)]
    assert isinstance(clause, Connmark)
    return ["-m", "connmark", *bang, "--mark", str(clause.mark)]


def target_arguments(target: Target, protocol: Proto | None = None) -> list[str]:
    if isinstance(target, Verdict):
        return ["-j", target.value]
    if isinstance(target, Jump):
        return ["-j", target.chain]
    if isinstance(target, Redirect):
        # Istio spells the UDP (DNS) redirect --to-port and the TCP ones --to-ports; iptables takes both.
        return ["-j", "REDIRECT", "--to-port" if protocol is Proto.UDP else "--to-ports", str(target.port)]
    if isinstance(target, Tproxy):
        return [
            "-j",
            "TPROXY",
            "--tproxy-mark",
            f"{target.mark}/{target.mask:#x}",
            "--on-port",
            str(target.port),
        ]
    if isinstance(target, SetMark):
        return ["-j", "MARK", "--set-mark", str(target.mark)]
    if isinstance(target, SaveMark):
        return ["-j", "CONNMARK", "--save-mark"]
    if isinstance(target, RestoreMark):
        return ["-j", "CONNMARK", "--restore-mark"]
    assert isinstance(target, CtZone)
    return ["-j", "CT", "--zone", str(target.zone)]


def _protocol(rule: Rule) -> Proto | None:
    return next((clause.protocol for clause in rule.clauses if isinstance(clause, Protocol)), None)
