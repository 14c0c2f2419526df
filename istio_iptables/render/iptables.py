"""Rules as iptables arguments, spelled exactly as Istio writes them (shared by restore and commands)."""

from __future__ import annotations

from collections.abc import Sequence

from istio_iptables.capture.model import (
    AddressSet,
    Connmark,
    ConntrackState,
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
    return arguments + comment_arguments(rule) + target_arguments(rule.target, _protocol(rule))


def comment_arguments(rule: Rule) -> list[str]:
    """The comment goes last among the matches; it holds no quote, so double quotes suffice."""
    return ["-m", "comment", "--comment", f'"{rule.comment}"'] if rule.comment else []


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
    if isinstance(clause, InSet):
        return ["-m", "set", *bang, "--match-set", clause.name, "dst"]
    assert isinstance(clause, Connmark)
    return ["-m", "connmark", *bang, "--mark", str(clause.mark)]


def ipset_payload(sets: Sequence[AddressSet | PortSet]) -> str:
    """``ipset restore`` input creating and filling the sets (each as ``ipset save`` prints it)."""
    lines = []
    for ipset in sets:
        if isinstance(ipset, AddressSet):
            family = "inet" if ipset.family is Family.V4 else "inet6"
            lines.append(f"create {ipset.name} hash:net family {family} hashsize 1024 maxelem {_capacity(ipset)}")
            lines += [f"add {ipset.name} {network.network}" for network in ipset.networks]
        else:
            lines.append(f"create {ipset.name} bitmap:port range 0-65535")
            lines += [f"add {ipset.name} {port}" for port in ipset.ports]
    return "".join(line + "\n" for line in lines)


def _capacity(ipset: AddressSet) -> int:
    # hash:net refuses members past maxelem (65536 by default).
    return max(65536, 2 * len(ipset.networks))


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


def save_text(rule: Rule) -> str:
    """A canonical rule (``state.canonical``) as iptables-save prints it: the implicit ``-m tcp`` before a
    port, marks in hex, MARK, CONNMARK and TPROXY with their masks. Only ever compared with a save's text
    as a shortcut: when they differ, the rules are compared parsed."""
    protocol = _protocol(rule)
    tokens = ["-A", rule.chain]
    module_done = False
    for clause in rule.clauses:
        if isinstance(clause, DestinationPort | SourcePort) and not module_done and protocol:
            tokens += ["-m", protocol.value]
            module_done = True
        if isinstance(clause, Mark | Connmark):
            bang = ["!"] if clause.negated else []
            tokens += ["-m", "mark" if isinstance(clause, Mark) else "connmark", *bang, "--mark", f"{clause.mark:#x}"]
        else:
            tokens += match_arguments(clause)
    tokens += comment_arguments(rule)
    target = rule.target
    if isinstance(target, Redirect):
        tokens += ["-j", "REDIRECT", "--to-ports", str(target.port)]
    elif isinstance(target, Tproxy):
        ipv6 = any(isinstance(clause, Source | Destination) and clause.network.version == 6 for clause in rule.clauses)
        any_address = "::" if ipv6 else "0.0.0.0"
        tokens += ["-j", "TPROXY", "--on-port", str(target.port), "--on-ip", any_address]
        tokens += ["--tproxy-mark", f"{target.mark:#x}/{target.mask:#x}"]
    elif isinstance(target, SetMark):
        tokens += ["-j", "MARK", "--set-xmark", f"{target.mark:#x}/0xffffffff"]
    elif isinstance(target, SaveMark | RestoreMark):
        action = "--save-mark" if isinstance(target, SaveMark) else "--restore-mark"
        tokens += ["-j", "CONNMARK", action, "--nfmask", "0xffffffff", "--ctmask", "0xffffffff"]
    else:
        tokens += target_arguments(target)
    return " ".join(tokens)
