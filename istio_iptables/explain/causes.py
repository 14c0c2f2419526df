"""Why a traced flow ends as it does, in the words of the flags: "10.96.0.0/12 is excluded by -x".

Pure. A verdict names the rule that decided; these functions read that rule's shape (its chain, clauses and
target, with a glance at its neighbours where two steps of the capture algorithm write the same shape) and
say which step of ``plan.py`` wrote it and for which flag. They read rules, not comments or the flags given,
so a plan and the live rules it produced are explained alike. A rule of no known shape (someone else's)
gets no cause (""), and the verdict falls back on the rule's location and text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from istio_iptables.capture.model import (
    ISTIO_DIVERT,
    ISTIO_IN_REDIRECT,
    ISTIO_INBOUND,
    ISTIO_OUTPUT,
    ISTIO_OUTPUT_DNS,
    ISTIO_REDIRECT,
    ISTIO_TPROXY,
    SET_EXCLUDE_CIDRS,
    SET_INBOUND_EXCLUDE_PORTS,
    SET_OUTBOUND_EXCLUDE_PORTS,
    Destination,
    DestinationPort,
    GidOwner,
    InInterface,
    InSet,
    IPAddress,
    Jump,
    Mark,
    OutInterface,
    Proto,
    Protocol,
    Rule,
    Source,
    Table,
    UidOwner,
    Verdict,
)

RulesOf = Callable[[Table, str], Sequence[Rule]]
"""The rules of one chain (those the model understood), in kernel order."""


def capture_cause(jump: Rule | None, terminal: Rule, destination: IPAddress, port: int) -> str:
    """What sent the flow to the proxy: the rule that jumped to the capturing chain (``jump``; None when the
    capture rule was reached without one), or the capture rule itself."""
    if terminal.chain == ISTIO_OUTPUT_DNS:
        server = next((c.network for c in terminal.clauses if isinstance(c, Destination) and not c.negated), None)
        if server is None:
            return "DNS to any server (--capture-all-dns)"
        return f"DNS to {destination}, a DNS server of the pod (resolv.conf, or --dns-servers)"
    if jump is None:
        return ""
    target = jump.target.chain if isinstance(jump.target, Jump) else ""
    kinds = {type(clause) for clause in jump.clauses}
    if jump.chain in ("PREROUTING",) and target == ISTIO_REDIRECT:
        nic = next((c.name for c in jump.clauses if isinstance(c, InInterface)), "")
        return f"traffic in from {nic}, a KubeVirt interface (-k), goes to the outbound listener"
    if jump.chain == ISTIO_OUTPUT and target == ISTIO_REDIRECT:
        if not jump.clauses:
            return "outbound TCP to any destination (-i '*')"
        if Destination in kinds:
            cidr = next(c.network for c in jump.clauses if isinstance(c, Destination))
            return f"{destination} is in {cidr.network} of -i"
        if DestinationPort in kinds:
            return f"port {port} is captured whatever the destination (-q)"
        if InSet in kinds:
            name = next(c.name for c in jump.clauses if isinstance(c, InSet))
            flag = "-i" if name[-1] in "46" else "-q"
            return f"{destination if flag == '-i' else f'port {port}'} is in set {name} ({flag})"
    if jump.chain == ISTIO_OUTPUT and target == ISTIO_IN_REDIRECT:
        owner = _owner(jump)
        return f"the proxy ({owner}) calling the pod's own address over lo goes to the inbound listener"
    if jump.chain == ISTIO_INBOUND and target in (ISTIO_IN_REDIRECT, ISTIO_TPROXY):
        if DestinationPort in kinds or InSet in kinds:
            return f"inbound port {port} (listed in -b)"
        return f"inbound port {port} (-b '*')"
    return ""


def return_cause(
    rule: Rule, number: int, rules_of: RulesOf, *, destination: IPAddress, port: int, gid: int | None
) -> str:
    """Why the RETURN (or the excluded-interface rule) ``rule``, number ``number`` of its chain, let the flow
    go uncaptured."""
    clauses = [clause for clause in rule.clauses if not isinstance(clause, Protocol)]
    kinds = [type(clause) for clause in clauses]  # a save orders clauses its own way: compare as sets
    table, chain = rule.table, rule.chain
    if rule.target is not Verdict.RETURN:
        return ""
    if chain == "OUTPUT" and kinds == [OutInterface]:
        return f"{_name(clauses[0])} is excluded by -c: nothing in or out of it is captured"
    if chain == "PREROUTING" and kinds == [InInterface]:
        nic = _name(clauses[0])
        partner = any(
            [type(c) for c in other.clauses] == [OutInterface] and _name(other.clauses[0]) == nic
            for other in rules_of(Table.NAT, "OUTPUT")
        )
        if partner or table is Table.MANGLE:
            return f"{nic} is excluded by -c: nothing in or out of it is captured"
        return f"{nic} is a KubeVirt interface (-k): not captured as inbound"
    if chain == ISTIO_INBOUND:
        return _inbound_return(rule, clauses, number)
    if chain != ISTIO_OUTPUT:
        return ""
    if kinds == [DestinationPort]:
        return f"port {port} is excluded by -o"
    if kinds == [InSet]:
        name = _set(clauses[0])
        if name == SET_OUTBOUND_EXCLUDE_PORTS:
            return f"port {port} is excluded by -o (set {name})"
        if name in SET_EXCLUDE_CIDRS.values():
            return f"{destination} is excluded by -x (set {name})"
        return ""
    if set(kinds) == {OutInterface, Source}:
        return "the proxy's inbound passthrough (from 127.0.0.6 over lo) reaches the app uncaptured"
    if OutInterface in kinds and any(isinstance(c, UidOwner | GidOwner) and c.negated for c in clauses):
        return "the app's traffic over loopback is never captured"
    if kinds in ([UidOwner], [GidOwner]) and not clauses[0].negated:
        owner = clauses[0]
        proxy = isinstance(owner, UidOwner) or any(
            owner in other.clauses and other.target == Jump(ISTIO_IN_REDIRECT)
            for other in rules_of(Table.NAT, ISTIO_OUTPUT)
        )
        if proxy:
            return f"the proxy's own traffic ({_owner(rule)}) is never captured"
        return f"group {gid} is excluded by --outbound-owner-groups-exclude"
    if kinds and all(isinstance(c, GidOwner) and c.negated for c in clauses):
        groups = ",".join(str(c.group) for c in clauses if isinstance(c, GidOwner))
        return f"group {gid} is not in --outbound-owner-groups ({groups})"
    if not clauses:
        return "--outbound-owner-groups is empty: no outbound traffic is captured"
    if kinds == [Destination]:
        network = clauses[0].network if isinstance(clauses[0], Destination) else None
        if network is not None and network.ip.is_loopback:
            return f"{destination} is a loopback address ({network.network}): never captured"
        if network is not None:
            return f"{network.network} is excluded by -x"
    return ""


def _inbound_return(rule: Rule, clauses: Sequence[object], number: int) -> str:
    kinds = [type(clause) for clause in clauses]
    if kinds == [DestinationPort]:
        port = clauses[0].port if isinstance(clauses[0], DestinationPort) else 0
        if rule.table is Table.NAT and number == 1:
            return f"port {port} is the HBONE tunnel port (-e), never captured inbound"
        return f"port {port} is excluded by -d"
    if kinds == [InSet] and _set(clauses[0]) == SET_INBOUND_EXCLUDE_PORTS:
        return f"the port is excluded by -d (set {SET_INBOUND_EXCLUDE_PORTS})"
    if kinds == [Mark] and isinstance(clauses[0], Mark) and not clauses[0].negated:
        return f"the packet already has the TPROXY mark {clauses[0].mark}: a connection the proxy handles"
    if set(kinds) == {Source, InInterface}:
        return "the proxy's inbound passthrough (from 127.0.0.6 over lo) reaches the app uncaptured"
    if set(kinds) == {InInterface, Mark}:
        return "traffic over lo the proxy did not mark is the pod talking to itself, never captured"
    return ""


def unmatched_cause(
    table: Table,
    walked: set[str],
    rules_of: RulesOf,
    *,
    protocol: Proto,
    destination: IPAddress,
    port: int,
) -> str:
    """Why no rule captured a flow that came out of the end of a chain without meeting a decision
    (``walked``: every chain the walk entered in that table)."""
    if table is Table.RAW:
        return ""
    if ISTIO_OUTPUT in walked:
        if protocol is Proto.UDP:
            if port == 53 and ISTIO_OUTPUT_DNS in walked:
                return (
                    f"UDP 53 to {destination} is not a DNS server of the pod (resolv.conf, or --dns-servers; "
                    "--capture-all-dns captures all)"
                )
            if port == 53:
                return "DNS is captured only with --redirect-dns"
            return "UDP is never captured, DNS aside (--redirect-dns)"
        included = [
            rule
            for rule in rules_of(table, ISTIO_OUTPUT)
            if rule.target == Jump(ISTIO_REDIRECT) and any(isinstance(c, Destination | InSet) for c in rule.clauses)
        ]
        if not included:
            return "-i is empty, so no outbound CIDR is captured"
        return f"{destination} is in none of the CIDRs of -i"
    if ISTIO_INBOUND in walked:
        return f"inbound port {port} is not listed in -b"
    return ""


def no_inbound_cause(rules_of: RulesOf, protocol: Proto) -> str:
    """Why an inbound flow met no capture at all: nothing in PREROUTING sends it to ISTIO_INBOUND."""
    sends = any(
        rule.target == Jump(ISTIO_INBOUND)
        for table in (Table.NAT, Table.MANGLE)
        for rule in rules_of(table, "PREROUTING")
    )
    if not sends:
        return "-b is empty, so no inbound port is captured"
    if protocol is not Proto.TCP:
        return f"inbound {protocol.value.upper()} is never captured, only TCP"
    return ""


def divert_cause(jump: Rule | None) -> str:
    """An ESTABLISHED inbound packet accepted in TPROXY mode."""
    if jump is not None and jump.target == Jump(ISTIO_DIVERT):
        return "an inbound connection the proxy already holds"
    return ""


def _owner(rule: Rule) -> str:
    owner = next((c for c in rule.clauses if isinstance(c, UidOwner | GidOwner) and not c.negated), None)
    if isinstance(owner, UidOwner):
        return f"uid {owner.uid}, -u"
    if isinstance(owner, GidOwner):
        return f"gid {owner.group}, -g"
    return "the proxy"


def _name(clause: object) -> str:
    return clause.name if isinstance(clause, InInterface | OutInterface) else ""


def _set(clause: object) -> str:
    return clause.name if isinstance(clause, InSet) else ""
