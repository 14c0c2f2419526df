"""The capture algorithm: ``build_plan(config, facts)``, pure, and the only copy of it.

It follows Istio's ``capture/run.go`` step by step (the step numbers below are those of the reference,
section 3.3), so the rules, their order and their spelling are Istio's. The steps are run once per address
family; a step marked "both" in Istio simply runs in each family, a versioned value is looked up per family.
"""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network, ip_interface

from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import (
    COMMENT_PREFIX,
    ISTIO_DIVERT,
    ISTIO_DROP,
    ISTIO_IN_REDIRECT,
    ISTIO_INBOUND,
    ISTIO_OUTPUT,
    ISTIO_OUTPUT_DNS,
    ISTIO_REDIRECT,
    ISTIO_SETS,
    ISTIO_TPROXY,
    SET_EXCLUDE_CIDRS,
    SET_INBOUND_EXCLUDE_PORTS,
    SET_INBOUND_PORTS,
    SET_INCLUDE_CIDRS,
    SET_OUTBOUND_EXCLUDE_PORTS,
    SET_OUTBOUND_PORTS,
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
    IPAddress,
    IPNet,
    Jump,
    Mark,
    Match,
    OutInterface,
    Plan,
    PolicyRoute,
    PortSet,
    Proto,
    Protocol,
    Redirect,
    RestoreMark,
    Rule,
    RuleSet,
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
from istio_iptables.errors import NoAddressError
from istio_iptables.records import record, replace

DEFAULT_PROXY_UID = 1337
DNS_PORT = 53
DNS_PROXY_PORT = 15053
OUTBOUND_MARK = 1338
"""Mark of the proxy's own connections over ``lo`` in TPROXY mode, so they are not intercepted again."""
LOOPBACK_V6 = IPv6Interface("::1/128")
PASSTHROUGH_V6 = IPv6Interface("::6/128")
PASSTHROUGH_SOURCE: dict[Family, IPNet] = {
    Family.V4: IPv4Interface("127.0.0.6/32"),
    Family.V6: PASSTHROUGH_V6,
}
"""The proxy sends inbound passthrough traffic from this address; it must reach the app uncaptured."""
DNS_ZONE_QUERIES, DNS_ZONE_ANSWERS = 1, 2
"""Conntrack zones that keep the app's DNS flow and the agent's upstream flow apart."""

TCP = Protocol(Proto.TCP)
UDP = Protocol(Proto.UDP)
LO = "lo"
PREROUTING, OUTPUT = "PREROUTING", "OUTPUT"
NAT, MANGLE, RAW = Table.NAT, Table.MANGLE, Table.RAW
RETURN = Verdict.RETURN


@record
class HostFacts:
    addresses: tuple[IPAddress, ...] = ()
    """The host's interface addresses, in the kernel's dump order (all IPv4 first), as Go lists them."""
    nameservers: tuple[IPAddress, ...] = ()
    envoy_uid: int | None = None


@record
class Decisions:
    """What the configuration and the host facts mean, decided once for both families."""

    families: tuple[Family, ...]
    owners: tuple[UidOwner | GidOwner, ...]
    """Proxy UIDs, then proxy GIDs: their traffic is the proxy's own."""
    redirect_dns: bool
    dns_servers: dict[Family, tuple[IPNet, ...]]
    include_cidr_is_loopback: bool


def build_plan(config: Config, facts: HostFacts) -> Plan:
    decisions = decide(config, facts)
    rulesets = tuple(RuleSet(family, tuple(family_rules(family, config, decisions))) for family in decisions.families)
    tproxy_inbound = config.mode is Mode.TPROXY and bool(config.inbound_ports)
    used = {clause.name for rs in rulesets for rule in rs.rules for clause in rule.clauses if isinstance(clause, InSet)}
    return Plan(
        rulesets=rulesets,
        sets=tuple(_set(name, config) for name in ISTIO_SETS if name in used),
        routes=tuple(
            PolicyRoute(family, config.tproxy_mark, config.tproxy_route_table) for family in decisions.families
        )
        if tproxy_inbound
        else (),
        loopback_addresses=(PASSTHROUGH_V6,) if Family.V6 in decisions.families else (),
    )


def _set(name: str, config: Config) -> AddressSet | PortSet:
    """The members of one --match-sets set, from the list it replaces."""
    include = () if config.service_cidrs is ALL else config.service_cidrs
    ports = {
        SET_INBOUND_PORTS: () if config.inbound_ports is ALL else config.inbound_ports,
        SET_INBOUND_EXCLUDE_PORTS: config.local_exclude_ports,
        SET_OUTBOUND_PORTS: config.outbound_ports,
        SET_OUTBOUND_EXCLUDE_PORTS: config.local_outbound_ports_exclude,
    }
    if name in ports:
        return PortSet(name, tuple(dict.fromkeys(ports[name])))
    family = Family.V4 if name.endswith("4") else Family.V6
    cidrs = config.service_exclude_cidrs if name in SET_EXCLUDE_CIDRS.values() else include
    return AddressSet(name, family, tuple(dict.fromkeys(cidr for cidr in cidrs if Family.of(cidr) is family)))


def decide(config: Config, facts: HostFacts) -> Decisions:
    uids = config.proxy_uids or (facts.envoy_uid if facts.envoy_uid is not None else DEFAULT_PROXY_UID,)
    gids = config.proxy_gids or uids
    servers: tuple[IPAddress, ...] = ()
    if config.redirect_dns and not config.capture_all_dns:
        servers = config.dns_servers if config.dns_servers is not None else facts.nameservers
    include = () if config.service_cidrs is ALL else config.service_cidrs
    return Decisions(
        families=(Family.V4, Family.V6) if ipv6_enabled(config, facts) else (Family.V4,),
        owners=(*(UidOwner(uid) for uid in uids), *(GidOwner(gid) for gid in gids)),
        # Istio quietly turns DNS capture off when there is nothing to capture.
        redirect_dns=config.redirect_dns and (config.capture_all_dns or bool(servers)),
        dns_servers={
            family: tuple(
                ip_interface(f"{server}/{family.host_prefix}") for server in servers if Family.of(server) is family
            )
            for family in Family
        },
        include_cidr_is_loopback=any(cidr.ip.is_loopback for cidr in include),
    )


def proxy_identity(config: Config, facts: HostFacts) -> tuple[int, int]:
    """The proxy's first UID and GID: the identity validation connects as."""
    owners = decide(config, facts).owners
    uid = next(owner.uid for owner in owners if isinstance(owner, UidOwner))
    gid = next(owner.group for owner in owners if isinstance(owner, GidOwner))
    return uid, int(gid)


def ipv6_enabled(config: Config, facts: HostFacts) -> bool:
    """``--ipv6``/``--no-ipv6`` when given; otherwise IPv6 is captured whenever the namespace has a usable IPv6
    address, wherever the kernel lists it. Istio looks only at the first usable address unless
    ``--dual-stack`` is set, and the kernel lists IPv4 first: a dual-stack pod would get IPv4 rules only and
    its IPv6 connections would bypass the proxy. Here detection is always what ``--dual-stack`` asks."""
    if config.ipv6 is not None:
        return config.ipv6
    if not any(_usable(_unwrap(address)) for address in facts.addresses):
        raise NoAddressError("no valid local IP address found; pass --ipv6 or --no-ipv6 to choose without detection")
    return bool(usable_ipv6(facts.addresses))


def usable_ipv6(addresses: tuple[IPAddress, ...]) -> tuple[IPv6Address, ...]:
    """The IPv6 addresses whose traffic capture is about: not loopback, link-local or IPv4-mapped, and not
    the ``::6`` an earlier IPv6 apply put on ``lo`` for the proxy's passthrough."""
    return tuple(
        unwrapped
        for address in addresses
        if isinstance(unwrapped := _unwrap(address), IPv6Address)
        and _usable(unwrapped)
        and unwrapped != PASSTHROUGH_V6.ip
    )


_LINK_LOCAL_MULTICAST = (IPv4Network("224.0.0.0/24"), IPv6Network("ff02::/16"))


def _unwrap(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address is the IPv4 address, as Go's netip.Addr.Unmap has it."""
    return address.ipv4_mapped or address if isinstance(address, IPv6Address) else address


def _usable(address: IPAddress) -> bool:
    """Go's rule: not loopback, not link-local unicast, not link-local multicast."""
    link_local_multicast = any(
        address in network for network in _LINK_LOCAL_MULTICAST if network.version == address.version
    )
    return not (address.is_loopback or address.is_link_local or link_local_multicast)


def loopback(family: Family, config: Config) -> IPNet:
    return config.ipv4_loopback_cidr if family is Family.V4 else LOOPBACK_V6


def family_rules(family: Family, config: Config, decisions: Decisions) -> list[Rule]:
    """Every rule of one family, in Istio's emission order."""
    rules: list[Rule] = []
    purpose = ""

    def why(text: str) -> None:
        """What the rules that follow are for (their --rule-comments text)."""
        nonlocal purpose
        purpose = text

    def add(table: Table, chain: str, *clauses: Match, target: Target, position: int | None = None) -> None:
        comment = COMMENT_PREFIX + purpose if config.rule_comments else None
        rules.append(Rule(table, chain, clauses, target, position, comment))

    def ports(values: tuple[int, ...], set_name: str) -> list[Match]:
        """One match per port, or with --match-sets one lookup in the set of them all."""
        if config.match_sets and values:
            return [InSet(set_name)]
        return [DestinationPort(port) for port in values]

    def cidrs(values: tuple[IPNet, ...], set_names: dict[int, str]) -> list[Match]:
        """One match per CIDR of this family, or with --match-sets one lookup."""
        mine = [cidr for cidr in values if Family.of(cidr) is family]
        if config.match_sets and mine:
            return [InSet(set_names[family.value])]
        return [Destination(cidr) for cidr in mine]

    tproxy = config.mode is Mode.TPROXY
    lo_net = loopback(family, config)
    not_lo_net = Destination(lo_net, negated=True)
    passthrough = PASSTHROUGH_SOURCE[family]
    tunnel = config.inbound_tunnel_port
    servers = decisions.dns_servers[family]

    # 1. Excluded interfaces: nothing in or out of them is captured.
    why("excluded interface, never captured")
    for nic in config.exclude_interfaces:
        add(NAT, PREROUTING, InInterface(nic), target=RETURN)
        add(NAT, OUTPUT, OutInterface(nic), target=RETURN)
    if tproxy:
        for nic in config.exclude_interfaces:
            add(MANGLE, PREROUTING, InInterface(nic), target=RETURN)
            add(MANGLE, OUTPUT, OutInterface(nic), target=RETURN)

    # 2. KubeVirt interfaces skip inbound capture; step 18 sends them to the outbound listener instead.
    why("KubeVirt interface, not captured as inbound")
    for nic in config.kube_virt_interfaces:
        add(NAT, PREROUTING, InInterface(nic), target=RETURN, position=1)

    # 3. ISTIO_DROP: packets conntrack cannot place would otherwise slip past NAT uncaptured.
    why("drop packets conntrack sees as invalid")
    if config.drop_invalid:
        add(MANGLE, PREROUTING, ConntrackState((CtState.INVALID,)), target=Jump(ISTIO_DROP))
        add(MANGLE, ISTIO_DROP, target=Verdict.DROP)

    # 4-6. ISTIO_INBOUND never captures the HBONE tunnel; ISTIO_REDIRECT and ISTIO_IN_REDIRECT are the two
    # listeners: tcp ⤸ ISTIO_REDIRECT ⤸ REDIRECT :15001, tcp ⤸ ISTIO_IN_REDIRECT ⤸ REDIRECT :15006.
    why("HBONE tunnel port, never captured inbound")
    add(NAT, ISTIO_INBOUND, TCP, DestinationPort(tunnel), target=RETURN)
    why("to the outbound listener of the proxy")
    add(NAT, ISTIO_REDIRECT, TCP, target=Redirect(config.proxy_port))
    why("to the inbound listener of the proxy")
    add(NAT, ISTIO_IN_REDIRECT, TCP, target=Redirect(config.inbound_capture_port))

    # 7. Inbound: tcp to :8080 ⤸ PREROUTING ⤸ ISTIO_INBOUND ⤸ ISTIO_IN_REDIRECT (nat), or, in TPROXY mode,
    # ⤸ ISTIO_TPROXY (mangle), with established flows marked by ISTIO_DIVERT and accepted.
    if config.inbound_ports:
        inbound = MANGLE if tproxy else NAT
        if tproxy:
            why("inbound capture: an established connection keeps the TPROXY mark")
            add(MANGLE, ISTIO_DIVERT, target=SetMark(config.tproxy_mark))
            add(MANGLE, ISTIO_DIVERT, target=Verdict.ACCEPT)
            why("inbound capture: TPROXY to the inbound listener of the proxy")
            add(
                MANGLE,
                ISTIO_TPROXY,
                not_lo_net,
                TCP,
                target=Tproxy(config.inbound_capture_port, config.tproxy_mark),
            )
        why("inbound capture: TCP arriving at the pod")
        add(inbound, PREROUTING, TCP, target=Jump(ISTIO_INBOUND))
        established = ConntrackState((CtState.RELATED, CtState.ESTABLISHED))
        if config.inbound_ports is ALL:
            why("inbound exclusion (-d), never captured")
            for port in ports(config.local_exclude_ports, SET_INBOUND_EXCLUDE_PORTS):
                add(inbound, ISTIO_INBOUND, TCP, port, target=RETURN)
            why("inbound capture")
            if tproxy:
                add(MANGLE, ISTIO_INBOUND, TCP, established, target=Jump(ISTIO_DIVERT))
                add(MANGLE, ISTIO_INBOUND, TCP, target=Jump(ISTIO_TPROXY))
            else:
                add(NAT, ISTIO_INBOUND, TCP, target=Jump(ISTIO_IN_REDIRECT))
        else:
            why("inbound capture")
            for port in ports(config.inbound_ports, SET_INBOUND_PORTS):
                if tproxy:
                    add(MANGLE, ISTIO_INBOUND, TCP, port, established, target=Jump(ISTIO_DIVERT))
                    add(MANGLE, ISTIO_INBOUND, TCP, port, target=Jump(ISTIO_TPROXY))
                else:
                    add(NAT, ISTIO_INBOUND, TCP, port, target=Jump(ISTIO_IN_REDIRECT))

    # 8. Outbound: every locally generated packet ⤸ OUTPUT ⤸ ISTIO_OUTPUT, which decides in order below.
    why("outbound capture: every packet the pod sends")
    add(NAT, OUTPUT, target=Jump(ISTIO_OUTPUT))

    # 9. Excluded outbound ports, TCP and UDP.
    why("excluded outbound port")
    for port in ports(config.local_outbound_ports_exclude, SET_OUTBOUND_EXCLUDE_PORTS):
        add(NAT, ISTIO_OUTPUT, TCP, port, target=RETURN)
        add(NAT, ISTIO_OUTPUT, UDP, port, target=RETURN)

    # 10. The proxy's inbound passthrough (from 127.0.0.6 over lo) reaches the app as it is.
    why("inbound passthrough of the proxy from 127.0.0.6")
    add(NAT, ISTIO_OUTPUT, OutInterface(LO), Source(passthrough), target=RETURN)

    # 11-12. Per proxy UID, then GID: the proxy calling its own pod address over lo goes to the inbound
    # listener; other traffic over lo is the app talking to itself and stays; the proxy's own traffic leaves.
    for owner in decisions.owners:
        if decisions.redirect_dns and isinstance(owner, UidOwner):
            not_special: tuple[Match, ...] = (TCP, DestinationPorts((DNS_PORT, tunnel), negated=True))
        else:
            # Istio's GID rule has no DNS form (reference 3.9).
            not_special = (TCP, DestinationPort(tunnel, negated=True))
        why("the proxy calling the pod itself over lo, to the inbound listener")
        add(
            NAT,
            ISTIO_OUTPUT,
            OutInterface(LO),
            not_lo_net,
            *not_special,
            owner,
            target=Jump(ISTIO_IN_REDIRECT),
        )
        if not decisions.include_cidr_is_loopback:
            not_dns: tuple[Match, ...] = (
                (TCP, DestinationPort(DNS_PORT, negated=True)) if decisions.redirect_dns else ()
            )
            why("the app talking to itself over lo, not captured")
            add(NAT, ISTIO_OUTPUT, OutInterface(LO), *not_dns, _negate(owner), target=RETURN)
        why("traffic of the proxy itself, not captured")
        add(NAT, ISTIO_OUTPUT, owner, target=RETURN)

    # 13. Owner groups: capture only the listed groups, or all but the excluded ones.
    why("owner group not captured")
    if config.owner_groups_include is ALL:
        for group in config.owner_groups_exclude:
            add(NAT, ISTIO_OUTPUT, GidOwner(group), target=RETURN)
    else:
        add(
            NAT,
            ISTIO_OUTPUT,
            *(GidOwner(group, negated=True) for group in config.owner_groups_include),
            target=RETURN,
        )

    # 14. DNS: udp/tcp :53 ⤸ ISTIO_OUTPUT_DNS ⤸ REDIRECT :15053, with conntrack zones (raw) keeping the
    # app's query and the agent's upstream query to the same server from colliding.
    if decisions.redirect_dns:
        why("DNS: conntrack zones")
        add(RAW, OUTPUT, target=Jump(ISTIO_OUTPUT_DNS))
        why("DNS capture")
        if config.capture_all_dns or servers:
            add(NAT, ISTIO_OUTPUT, target=Jump(ISTIO_OUTPUT_DNS))
        for protocol in (TCP, UDP):
            if config.capture_all_dns:
                add(
                    NAT,
                    ISTIO_OUTPUT_DNS,
                    protocol,
                    DestinationPort(DNS_PORT),
                    target=Redirect(DNS_PROXY_PORT),
                )
            else:
                for server in servers:
                    add(
                        NAT,
                        ISTIO_OUTPUT_DNS,
                        protocol,
                        DestinationPort(DNS_PORT),
                        Destination(server),
                        target=Redirect(DNS_PROXY_PORT),
                    )
        why("DNS: conntrack zones")
        for owner in decisions.owners:
            add(RAW, ISTIO_OUTPUT_DNS, UDP, DestinationPort(DNS_PORT), owner, target=CtZone(DNS_ZONE_QUERIES))
            add(RAW, ISTIO_OUTPUT_DNS, UDP, SourcePort(DNS_PROXY_PORT), owner, target=CtZone(DNS_ZONE_ANSWERS))
        if config.capture_all_dns:
            add(RAW, PREROUTING, target=Jump(ISTIO_INBOUND))
            add(RAW, ISTIO_OUTPUT_DNS, UDP, DestinationPort(DNS_PORT), target=CtZone(DNS_ZONE_ANSWERS))
            add(RAW, ISTIO_INBOUND, UDP, SourcePort(DNS_PORT), target=CtZone(DNS_ZONE_QUERIES))
        elif servers:
            add(RAW, PREROUTING, target=Jump(ISTIO_INBOUND))
            for server in servers:
                add(
                    RAW,
                    ISTIO_OUTPUT_DNS,
                    UDP,
                    DestinationPort(DNS_PORT),
                    Destination(server),
                    target=CtZone(DNS_ZONE_ANSWERS),
                )
                add(
                    RAW,
                    ISTIO_INBOUND,
                    UDP,
                    SourcePort(DNS_PORT),
                    Source(server),
                    target=CtZone(DNS_ZONE_QUERIES),
                )

    # 15-16. Loopback and excluded CIDRs are never captured.
    why("loopback destination, never captured")
    add(NAT, ISTIO_OUTPUT, Destination(lo_net), target=RETURN)
    why("excluded CIDR (-x), never captured")
    for cidr in cidrs(config.service_exclude_cidrs, SET_EXCLUDE_CIDRS):
        add(NAT, ISTIO_OUTPUT, cidr, target=RETURN)

    # 17. Outbound ports captured whatever the destination.
    why("outbound port always captured")
    for port in ports(config.outbound_ports, SET_OUTBOUND_PORTS):
        add(NAT, ISTIO_OUTPUT, TCP, port, target=Jump(ISTIO_REDIRECT))

    # 18. Captured CIDRs (or all): ISTIO_OUTPUT ⤸ ISTIO_REDIRECT; KubeVirt traffic from PREROUTING too.
    if config.service_cidrs is ALL:
        why("outbound capture, every destination (-i *)")
        add(NAT, ISTIO_OUTPUT, target=Jump(ISTIO_REDIRECT))
        why("KubeVirt interface, captured as outbound")
        for nic in config.kube_virt_interfaces:
            add(NAT, PREROUTING, InInterface(nic), target=Jump(ISTIO_REDIRECT), position=1)
    else:
        for cidr in cidrs(config.service_cidrs, SET_INCLUDE_CIDRS):
            why("KubeVirt interface, captured as outbound")
            for nic in config.kube_virt_interfaces:
                add(NAT, PREROUTING, InInterface(nic), cidr, target=Jump(ISTIO_REDIRECT), position=1)
            why("captured CIDR (-i)")
            add(NAT, ISTIO_OUTPUT, cidr, target=Jump(ISTIO_REDIRECT))

    # 19. TPROXY: the mark of intercepted connections is kept on the connection so the proxy's replies
    # route back through lo; the proxy's own traffic over lo is marked 1338 and not intercepted again.
    if tproxy:
        mark = config.tproxy_mark
        why("TPROXY: keep the mark on the connection, so replies route back over lo")
        add(MANGLE, PREROUTING, TCP, Mark(mark), target=SaveMark())
        why("TPROXY: marked traffic over lo is not marked again")
        add(MANGLE, OUTPUT, TCP, OutInterface(LO), Mark(mark), target=RETURN)
        why("TPROXY: the proxy calling the pod over lo, marked not to be intercepted again")
        for owner in decisions.owners:
            add(MANGLE, OUTPUT, not_lo_net, TCP, OutInterface(LO), owner, target=SetMark(OUTBOUND_MARK))
        why("TPROXY: replies of intercepted connections get their mark back")
        add(MANGLE, OUTPUT, TCP, Connmark(mark), target=RestoreMark())
        why("TPROXY: already intercepted, not captured again")
        add(MANGLE, ISTIO_INBOUND, TCP, Mark(mark), target=RETURN, position=1)
        why("inbound passthrough of the proxy from 127.0.0.6")
        add(MANGLE, ISTIO_INBOUND, TCP, Source(passthrough), InInterface(LO), target=RETURN, position=2)
        why("TPROXY: traffic over lo not marked by the proxy, not captured")
        add(
            MANGLE,
            ISTIO_INBOUND,
            TCP,
            InInterface(LO),
            Mark(OUTBOUND_MARK, negated=True),
            target=RETURN,
            position=3,
        )

    return rules


def _negate(owner: UidOwner | GidOwner) -> UidOwner | GidOwner:
    return replace(owner, negated=not owner.negated)
