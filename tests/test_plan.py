"""The capture plan against the reference, section 3.3: each step's rules, spelled exactly, in Istio's order.

Rules are compared as ``<table> <rule text>`` lines (the spelling comes from ``render.iptables.rule_text``,
which the renderer tests pin separately), so a failure shows the whole sequence side by side.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface, ip_address

import pytest

from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import (
    AddressSet,
    Destination,
    DestinationPort,
    Family,
    GidOwner,
    InSet,
    Jump,
    OutInterface,
    Plan,
    PolicyRoute,
    PortSet,
    Proto,
    Protocol,
    Redirect,
    Rule,
    Source,
    Table,
    Tproxy,
    UidOwner,
    Verdict,
    declared_chains,
)
from istio_iptables.capture.plan import HostFacts, build_plan, decide
from istio_iptables.errors import HostError
from istio_iptables.records import replace
from istio_iptables.render.iptables import rule_text
from istio_iptables.render.restore import render_restore

V4, V6 = Family.V4, Family.V6
NO_FACTS = HostFacts()


def cfg(**changes: object) -> Config:
    """Istio's test base: uid 1337 (gid defaults to it), IPv4 only, everything else at its default."""
    settings: dict[str, object] = {"proxy_uids": (1337,), "ipv6": False}
    settings.update(changes)
    return Config(**settings)  # type: ignore[arg-type]


def plan_of(config: Config, facts: HostFacts = NO_FACTS) -> Plan:
    return build_plan(config, facts)


def lines(config: Config, family: Family = V4, facts: HostFacts = NO_FACTS) -> list[str]:
    ruleset = plan_of(config, facts).ruleset(family)
    assert ruleset is not None, f"no {family.label} ruleset"
    return [f"{rule.table.value} {rule_text(rule)}" for rule in ruleset.rules]


def rules(config: Config, family: Family = V4, facts: HostFacts = NO_FACTS) -> tuple[Rule, ...]:
    ruleset = plan_of(config, facts).ruleset(family)
    assert ruleset is not None
    return ruleset.rules


def index(all_lines: list[str], line: str) -> int:
    assert all_lines.count(line) == 1, f"expected exactly one {line!r} in:\n" + "\n".join(all_lines)
    return all_lines.index(line)


def block(all_lines: list[str], first: str, count: int) -> list[str]:
    start = index(all_lines, first)
    return all_lines[start : start + count]


# The rules every configuration has, in order (steps 4-6, 8, 10, 11-12 for uid/gid 1337, 15).
HEAD_V4 = [
    "nat -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
    "nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    "nat -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
]
OUTPUT_V4 = [
    "nat -A OUTPUT -j ISTIO_OUTPUT",
    "nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    "nat -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
    "nat -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
]
LOOPBACK_RETURN_V4 = "nat -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN"


# ---- whole sequences -------------------------------------------------------------------------------


def test_empty_config_is_istios_empty_golden() -> None:
    assert lines(cfg()) == [*HEAD_V4, *OUTPUT_V4, LOOPBACK_RETURN_V4]


def test_default_injection_matches_worked_example() -> None:
    """Reference 3.8: ``-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020``."""
    config = cfg(mode=Mode.REDIRECT, service_cidrs=ALL, inbound_ports=ALL, local_exclude_ports=(15090, 15021, 15020))
    assert lines(config) == [
        *HEAD_V4,
        "nat -A PREROUTING -p tcp -j ISTIO_INBOUND",
        "nat -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "nat -A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "nat -A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "nat -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        *OUTPUT_V4,
        LOOPBACK_RETURN_V4,
        "nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ]


def test_default_injection_ipv6_is_the_same_with_v6_addresses() -> None:
    config = cfg(service_cidrs=ALL, inbound_ports=ALL, local_exclude_ports=(15090,), ipv6=True)
    v4 = lines(config, V4)
    v6 = lines(config, V6)
    assert [line.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128") for line in v4] == v6
    assert "nat -A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN" in v6
    assert "nat -A ISTIO_OUTPUT -d ::1/128 -j RETURN" in v6


KITCHEN_SINK = cfg(
    mode=Mode.TPROXY,
    exclude_interfaces=("eth9",),
    kube_virt_interfaces=("kv0",),
    drop_invalid=True,
    inbound_ports=ALL,
    local_exclude_ports=(15090,),
    local_outbound_ports_exclude=(9999,),
    proxy_uids=(3,),
    proxy_gids=(4,),
    redirect_dns=True,
    dns_servers=(ip_address("10.0.0.10"), ip_address("fd00::10")),
    owner_groups_exclude=(888,),
    service_exclude_cidrs=(IPv4Interface("10.1.0.0/16"), IPv6Interface("fd00:1::/64")),
    outbound_ports=(7777,),
    service_cidrs=(IPv4Interface("10.0.0.0/8"), IPv6Interface("fd00::/8")),
    ipv6=True,
)


def kitchen_sink_expected(lo: str, p6: str, server: str, exclude: str, include: str) -> list[str]:
    return [
        # 1. excluded interfaces, nat then (TPROXY) mangle
        "nat -A PREROUTING -i eth9 -j RETURN",
        "nat -A OUTPUT -o eth9 -j RETURN",
        "mangle -A PREROUTING -i eth9 -j RETURN",
        "mangle -A OUTPUT -o eth9 -j RETURN",
        # 2. kube-virt short-circuit
        "nat -I PREROUTING 1 -i kv0 -j RETURN",
        # 3. drop invalid
        "mangle -A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP",
        "mangle -A ISTIO_DROP -j DROP",
        # 4-6
        *HEAD_V4,
        # 7. TPROXY inbound
        "mangle -A ISTIO_DIVERT -j MARK --set-mark 1337",
        "mangle -A ISTIO_DIVERT -j ACCEPT",
        f"mangle -A ISTIO_TPROXY ! -d {lo} -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
        "mangle -A PREROUTING -p tcp -j ISTIO_INBOUND",
        "mangle -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "mangle -A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "mangle -A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY",
        # 8-10
        "nat -A OUTPUT -j ISTIO_OUTPUT",
        "nat -A ISTIO_OUTPUT -p tcp --dport 9999 -j RETURN",
        "nat -A ISTIO_OUTPUT -p udp --dport 9999 -j RETURN",
        f"nat -A ISTIO_OUTPUT -o lo -s {p6} -j RETURN",
        # 11. uid 3 (DNS form)
        f"nat -A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 3 "
        "-j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 3 -j RETURN",
        "nat -A ISTIO_OUTPUT -m owner --uid-owner 3 -j RETURN",
        # 12. gid 4 (no multiport form)
        f"nat -A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp ! --dport 15008 -m owner --gid-owner 4 -j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --gid-owner 4 -j RETURN",
        "nat -A ISTIO_OUTPUT -m owner --gid-owner 4 -j RETURN",
        # 13. owner groups exclude
        "nat -A ISTIO_OUTPUT -m owner --gid-owner 888 -j RETURN",
        # 14. DNS
        "raw -A OUTPUT -j ISTIO_OUTPUT_DNS",
        "nat -A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS",
        f"nat -A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d {server} -j REDIRECT --to-ports 15053",
        f"nat -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d {server} -j REDIRECT --to-port 15053",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 3 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 3 -j CT --zone 2",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 4 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 4 -j CT --zone 2",
        "raw -A PREROUTING -j ISTIO_INBOUND",
        f"raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d {server} -j CT --zone 2",
        f"raw -A ISTIO_INBOUND -p udp --sport 53 -s {server} -j CT --zone 1",
        # 15-18
        f"nat -A ISTIO_OUTPUT -d {lo} -j RETURN",
        f"nat -A ISTIO_OUTPUT -d {exclude} -j RETURN",
        "nat -A ISTIO_OUTPUT -p tcp --dport 7777 -j ISTIO_REDIRECT",
        f"nat -I PREROUTING 1 -i kv0 -d {include} -j ISTIO_REDIRECT",
        f"nat -A ISTIO_OUTPUT -d {include} -j ISTIO_REDIRECT",
        # 19. TPROXY extras
        "mangle -A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
        "mangle -A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN",
        f"mangle -A OUTPUT ! -d {lo} -p tcp -o lo -m owner --uid-owner 3 -j MARK --set-mark 1338",
        f"mangle -A OUTPUT ! -d {lo} -p tcp -o lo -m owner --gid-owner 4 -j MARK --set-mark 1338",
        "mangle -A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark",
        "mangle -I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN",
        f"mangle -I ISTIO_INBOUND 2 -p tcp -s {p6} -i lo -j RETURN",
        "mangle -I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
    ]


def test_every_step_in_order_ipv4() -> None:
    assert lines(KITCHEN_SINK, V4) == kitchen_sink_expected(
        "127.0.0.1/32", "127.0.0.6/32", "10.0.0.10/32", "10.1.0.0/16", "10.0.0.0/8"
    )


def test_every_step_in_order_ipv6() -> None:
    assert lines(KITCHEN_SINK, V6) == kitchen_sink_expected(
        "::1/128", "::6/128", "fd00::10/128", "fd00:1::/64", "fd00::/8"
    )


# ---- step 1: excluded interfaces -------------------------------------------------------------------


def test_exclude_interfaces_come_first_nat_only_in_redirect_mode() -> None:
    config = cfg(exclude_interfaces=("eth1", "eth2"), inbound_ports=ALL, service_cidrs=ALL)
    assert lines(config)[:5] == [
        "nat -A PREROUTING -i eth1 -j RETURN",
        "nat -A OUTPUT -o eth1 -j RETURN",
        "nat -A PREROUTING -i eth2 -j RETURN",
        "nat -A OUTPUT -o eth2 -j RETURN",
        HEAD_V4[0],
    ]
    assert not [line for line in lines(config) if line.startswith("mangle")]


def test_exclude_interfaces_in_tproxy_add_mangle_returns_after_all_nat_ones() -> None:
    config = cfg(exclude_interfaces=("eth1", "eth2"), mode=Mode.TPROXY, inbound_ports=ALL, ipv6=True)
    for family in (V4, V6):
        assert lines(config, family)[:9] == [
            "nat -A PREROUTING -i eth1 -j RETURN",
            "nat -A OUTPUT -o eth1 -j RETURN",
            "nat -A PREROUTING -i eth2 -j RETURN",
            "nat -A OUTPUT -o eth2 -j RETURN",
            "mangle -A PREROUTING -i eth1 -j RETURN",
            "mangle -A OUTPUT -o eth1 -j RETURN",
            "mangle -A PREROUTING -i eth2 -j RETURN",
            "mangle -A OUTPUT -o eth2 -j RETURN",
            HEAD_V4[0],
        ]


def test_exclude_interfaces_in_tproxy_come_before_mangle_inbound_jump() -> None:
    all_lines = lines(cfg(exclude_interfaces=("x0",), mode=Mode.TPROXY, inbound_ports=(80,)))
    assert index(all_lines, "mangle -A PREROUTING -i x0 -j RETURN") < index(
        all_lines, "mangle -A PREROUTING -p tcp -j ISTIO_INBOUND"
    )


# ---- step 2: kube-virt short-circuit ---------------------------------------------------------------


def test_kube_virt_returns_are_inserts_at_position_1_after_excluded_interfaces() -> None:
    config = cfg(exclude_interfaces=("eth9",), kube_virt_interfaces=("kv0", "kv1"))
    assert lines(config)[:5] == [
        "nat -A PREROUTING -i eth9 -j RETURN",
        "nat -A OUTPUT -o eth9 -j RETURN",
        "nat -I PREROUTING 1 -i kv0 -j RETURN",
        "nat -I PREROUTING 1 -i kv1 -j RETURN",
        HEAD_V4[0],
    ]
    inserted = [rule for rule in rules(config) if rule.position is not None]
    assert [(rule.table, rule.chain, rule.position, rule.target) for rule in inserted] == [
        (Table.NAT, "PREROUTING", 1, Verdict.RETURN),
        (Table.NAT, "PREROUTING", 1, Verdict.RETURN),
    ]


def test_kube_virt_with_no_include_cidrs_has_only_the_returns() -> None:
    all_lines = lines(cfg(kube_virt_interfaces=("kv0",)))
    assert [line for line in all_lines if "kv0" in line] == ["nat -I PREROUTING 1 -i kv0 -j RETURN"]


def test_kube_virt_with_wildcard_include_inserts_redirect_after_the_catch_all() -> None:
    all_lines = lines(cfg(kube_virt_interfaces=("kv0", "kv1"), service_cidrs=ALL))
    assert all_lines[-3:] == [
        "nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        "nat -I PREROUTING 1 -i kv0 -j ISTIO_REDIRECT",
        "nat -I PREROUTING 1 -i kv1 -j ISTIO_REDIRECT",
    ]


def test_kube_virt_with_cidr_list_inserts_per_cidr_then_appends() -> None:
    config = cfg(
        kube_virt_interfaces=("kv0", "kv1"),
        service_cidrs=(IPv4Interface("10.0.0.0/8"), IPv4Interface("172.16.0.0/12")),
    )
    assert lines(config)[-6:] == [
        "nat -I PREROUTING 1 -i kv0 -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        "nat -I PREROUTING 1 -i kv1 -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        "nat -A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        "nat -I PREROUTING 1 -i kv0 -d 172.16.0.0/12 -j ISTIO_REDIRECT",
        "nat -I PREROUTING 1 -i kv1 -d 172.16.0.0/12 -j ISTIO_REDIRECT",
        "nat -A ISTIO_OUTPUT -d 172.16.0.0/12 -j ISTIO_REDIRECT",
    ]


# ---- step 3: drop invalid --------------------------------------------------------------------------


def test_drop_invalid_rules_precede_the_tunnel_return() -> None:
    all_lines = lines(cfg(drop_invalid=True, kube_virt_interfaces=("kv0",)))
    assert all_lines[:4] == [
        "nat -I PREROUTING 1 -i kv0 -j RETURN",
        "mangle -A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP",
        "mangle -A ISTIO_DROP -j DROP",
        HEAD_V4[0],
    ]


def test_drop_invalid_in_both_families() -> None:
    config = cfg(drop_invalid=True, ipv6=True)
    assert lines(config, V6)[:2] == [
        "mangle -A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP",
        "mangle -A ISTIO_DROP -j DROP",
    ]


def test_no_drop_invalid_no_mangle() -> None:
    assert not [line for line in lines(cfg()) if line.startswith("mangle")]


# ---- steps 4-6 ------------------------------------------------------------------------------------


def test_tunnel_return_and_listener_redirects_use_the_configured_ports() -> None:
    config = cfg(proxy_port=16001, inbound_capture_port=16006, inbound_tunnel_port=16008)
    assert lines(config)[:3] == [
        "nat -A ISTIO_INBOUND -p tcp --dport 16008 -j RETURN",
        "nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001",
        "nat -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006",
    ]
    assert (
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 16008 -m owner --uid-owner 1337 "
        "-j ISTIO_IN_REDIRECT" in lines(config)
    )
    first = rules(config)[:3]
    assert first[0] == Rule(Table.NAT, "ISTIO_INBOUND", (Protocol(Proto.TCP), DestinationPort(16008)), Verdict.RETURN)
    assert first[1].target == Redirect(16001)
    assert first[2].target == Redirect(16006)


def test_tunnel_return_stays_in_nat_even_in_tproxy_mode() -> None:
    """Quirk 3.9: the tunnel RETURN is only in nat ISTIO_INBOUND."""
    all_lines = lines(cfg(mode=Mode.TPROXY, inbound_ports=ALL))
    assert [line for line in all_lines if "15008 -j RETURN" in line] == [HEAD_V4[0]]


# ---- step 7: inbound -------------------------------------------------------------------------------


def test_no_inbound_ports_no_prerouting_jump() -> None:
    assert not [line for line in lines(cfg(local_exclude_ports=(1, 2))) if "PREROUTING" in line]


def test_inbound_wildcard_returns_excluded_ports_then_redirects() -> None:
    all_lines = lines(cfg(inbound_ports=ALL, local_exclude_ports=(15090, 15021)))
    assert block(all_lines, "nat -A PREROUTING -p tcp -j ISTIO_INBOUND", 4) == [
        "nat -A PREROUTING -p tcp -j ISTIO_INBOUND",
        "nat -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "nat -A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "nat -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    ]
    assert all_lines.index("nat -A PREROUTING -p tcp -j ISTIO_INBOUND") == 3


def test_inbound_port_list_ignores_local_exclude_ports() -> None:
    all_lines = lines(cfg(inbound_ports=(32000, 31000), local_exclude_ports=(6000, 7000)))
    assert block(all_lines, "nat -A PREROUTING -p tcp -j ISTIO_INBOUND", 4) == [
        "nat -A PREROUTING -p tcp -j ISTIO_INBOUND",
        "nat -A ISTIO_INBOUND -p tcp --dport 32000 -j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_INBOUND -p tcp --dport 31000 -j ISTIO_IN_REDIRECT",
        "nat -A OUTPUT -j ISTIO_OUTPUT",
    ]
    assert not [line for line in all_lines if "6000" in line or "7000" in line]


def test_tproxy_wildcard_inbound_lives_in_mangle() -> None:
    all_lines = lines(cfg(mode=Mode.TPROXY, inbound_ports=ALL, local_exclude_ports=(15090, 15021, 15020)))
    assert all_lines[3:12] == [
        "mangle -A ISTIO_DIVERT -j MARK --set-mark 1337",
        "mangle -A ISTIO_DIVERT -j ACCEPT",
        "mangle -A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
        "mangle -A PREROUTING -p tcp -j ISTIO_INBOUND",
        "mangle -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "mangle -A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "mangle -A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "mangle -A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "mangle -A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY",
    ]
    # The nat table keeps only the shared chains: no PREROUTING jump, no IN_REDIRECT from ISTIO_INBOUND.
    assert not [line for line in all_lines if line.startswith("nat -A PREROUTING")]
    assert "nat -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT" not in all_lines


def test_tproxy_port_list_inbound() -> None:
    all_lines = lines(cfg(mode=Mode.TPROXY, inbound_ports=(32000, 31000), local_exclude_ports=(6000,)))
    assert block(all_lines, "mangle -A PREROUTING -p tcp -j ISTIO_INBOUND", 6) == [
        "mangle -A PREROUTING -p tcp -j ISTIO_INBOUND",
        "mangle -A ISTIO_INBOUND -p tcp --dport 32000 -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "mangle -A ISTIO_INBOUND -p tcp --dport 32000 -j ISTIO_TPROXY",
        "mangle -A ISTIO_INBOUND -p tcp --dport 31000 -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "mangle -A ISTIO_INBOUND -p tcp --dport 31000 -j ISTIO_TPROXY",
        "nat -A OUTPUT -j ISTIO_OUTPUT",
    ]
    assert not [line for line in all_lines if "6000" in line]


def test_tproxy_target_is_typed() -> None:
    tproxy_rules = [
        r for r in rules(cfg(mode=Mode.TPROXY, inbound_ports=ALL, tproxy_mark=7)) if r.chain == "ISTIO_TPROXY"
    ]
    assert tproxy_rules == [
        Rule(
            Table.MANGLE,
            "ISTIO_TPROXY",
            (Destination(IPv4Interface("127.0.0.1/32"), negated=True), Protocol(Proto.TCP)),
            Tproxy(port=15006, mark=7, mask=0xFFFFFFFF),
        )
    ]


def test_tproxy_three_inserts_end_the_plan() -> None:
    all_lines = lines(cfg(mode=Mode.TPROXY, inbound_ports=(80,)))
    assert all_lines[-8:] == [
        "mangle -A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
        "mangle -A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN",
        "mangle -A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338",
        "mangle -A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338",
        "mangle -A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark",
        "mangle -I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN",
        "mangle -I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN",
        "mangle -I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
    ]
    assert [rule.position for rule in rules(cfg(mode=Mode.TPROXY, inbound_ports=(80,)))[-3:]] == [1, 2, 3]


def test_tproxy_inserts_v6_use_v6_passthrough_source() -> None:
    v6 = lines(cfg(mode=Mode.TPROXY, inbound_ports=(80,), ipv6=True), V6)
    assert "mangle -I ISTIO_INBOUND 2 -p tcp -s ::6/128 -i lo -j RETURN" in v6
    assert "mangle -A ISTIO_TPROXY ! -d ::1/128 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006" in v6


def test_tproxy_with_empty_inbound_ports_has_inserts_only_and_no_routes() -> None:
    config = cfg(mode=Mode.TPROXY, ipv6=True)
    for family in (V4, V6):
        mangle = [line for line in lines(config, family) if line.startswith("mangle")]
        lo, p6 = ("127.0.0.1/32", "127.0.0.6/32") if family is V4 else ("::1/128", "::6/128")
        assert mangle == [
            "mangle -A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
            "mangle -A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN",
            f"mangle -A OUTPUT ! -d {lo} -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338",
            f"mangle -A OUTPUT ! -d {lo} -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338",
            "mangle -A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark",
            "mangle -I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN",
            f"mangle -I ISTIO_INBOUND 2 -p tcp -s {p6} -i lo -j RETURN",
            "mangle -I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
        ]
        ruleset = plan_of(config).ruleset(family)
        assert ruleset is not None
        assert declared_chains(ruleset.rules)[Table.MANGLE] == ["ISTIO_INBOUND"]
    assert plan_of(config).routes == ()


def test_tproxy_custom_mark_everywhere_but_outbound_mark_stays_1338() -> None:
    all_lines = lines(cfg(mode=Mode.TPROXY, inbound_ports=ALL, tproxy_mark=4242))
    marks = [line for line in all_lines if "4242" in line]
    assert marks == [
        "mangle -A ISTIO_DIVERT -j MARK --set-mark 4242",
        "mangle -A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 4242/0xffffffff --on-port 15006",
        "mangle -A PREROUTING -p tcp -m mark --mark 4242 -j CONNMARK --save-mark",
        "mangle -A OUTPUT -p tcp -o lo -m mark --mark 4242 -j RETURN",
        "mangle -A OUTPUT -p tcp -m connmark --mark 4242 -j CONNMARK --restore-mark",
        "mangle -I ISTIO_INBOUND 1 -p tcp -m mark --mark 4242 -j RETURN",
    ]
    assert "mangle -I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN" in all_lines


def test_redirect_mode_has_no_mangle_and_no_routes() -> None:
    config = cfg(inbound_ports=ALL, service_cidrs=ALL, ipv6=True)
    for family in (V4, V6):
        assert not [line for line in lines(config, family) if not line.startswith("nat")]
    assert plan_of(config).routes == ()


# ---- steps 8-9 -------------------------------------------------------------------------------------


def test_output_jump_has_no_protocol_and_excluded_ports_follow_it_tcp_then_udp() -> None:
    all_lines = lines(cfg(local_outbound_ports_exclude=(9000, 9001)))
    assert block(all_lines, "nat -A OUTPUT -j ISTIO_OUTPUT", 6) == [
        "nat -A OUTPUT -j ISTIO_OUTPUT",
        "nat -A ISTIO_OUTPUT -p tcp --dport 9000 -j RETURN",
        "nat -A ISTIO_OUTPUT -p udp --dport 9000 -j RETURN",
        "nat -A ISTIO_OUTPUT -p tcp --dport 9001 -j RETURN",
        "nat -A ISTIO_OUTPUT -p udp --dport 9001 -j RETURN",
        "nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    ]
    output_jump = next(rule for rule in rules(cfg()) if rule.chain == "OUTPUT")
    assert output_jump == Rule(Table.NAT, "OUTPUT", (), Jump("ISTIO_OUTPUT"))


# ---- step 10 ---------------------------------------------------------------------------------------


def test_passthrough_source_rule_is_typed_per_family() -> None:
    config = cfg(ipv6=True)
    expected = {
        V4: IPv4Interface("127.0.0.6/32"),
        V6: IPv6Interface("::6/128"),
    }
    for family, source in expected.items():
        found = [r for r in rules(config, family) if Source(source) in r.clauses]
        assert found == [Rule(Table.NAT, "ISTIO_OUTPUT", (OutInterface("lo"), Source(source)), Verdict.RETURN)]


# ---- steps 11-12: proxy UIDs and GIDs --------------------------------------------------------------


def owner_block(kind: str, owner: int, lo: str = "127.0.0.1/32") -> list[str]:
    return [
        f"nat -A ISTIO_OUTPUT -o lo ! -d {lo} -p tcp ! --dport 15008 -m owner --{kind}-owner {owner} "
        "-j ISTIO_IN_REDIRECT",
        f"nat -A ISTIO_OUTPUT -o lo -m owner ! --{kind}-owner {owner} -j RETURN",
        f"nat -A ISTIO_OUTPUT -m owner --{kind}-owner {owner} -j RETURN",
    ]


def test_uid_triples_then_gid_triples_in_list_order() -> None:
    all_lines = lines(cfg(proxy_uids=(3, 4), proxy_gids=(1, 2)))
    start = index(all_lines, "nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN") + 1
    assert all_lines[start : start + 13] == [
        *owner_block("uid", 3),
        *owner_block("uid", 4),
        *owner_block("gid", 1),
        *owner_block("gid", 2),
        LOOPBACK_RETURN_V4,
    ]


def test_owner_rules_are_typed() -> None:
    owner_rules = [r for r in rules(cfg(proxy_uids=(3,), proxy_gids=(1,))) if r.chain == "ISTIO_OUTPUT"][1:7]
    assert [r.clauses[-1] for r in owner_rules] == [
        UidOwner(3),
        UidOwner(3, negated=True),
        UidOwner(3),
        GidOwner(1),
        GidOwner(1, negated=True),
        GidOwner(1),
    ]


def test_loopback_include_cidr_drops_the_negated_owner_returns() -> None:
    """Reference 4.1 ``loopback-outbound-iprange``: -i 127.1.2.3/32, DNS on, uid 3,4, gid 1,2."""
    config = cfg(
        service_cidrs=(IPv4Interface("127.1.2.3/32"),),
        redirect_dns=True,
        dns_servers=(ip_address("127.0.0.53"),),
        proxy_uids=(3, 4),
        proxy_gids=(1, 2),
    )
    all_lines = lines(config)
    start = index(all_lines, "nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN") + 1
    assert all_lines[start : start + 9] == [
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 "
        "-m owner --uid-owner 3 -j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -m owner --uid-owner 3 -j RETURN",
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 "
        "-m owner --uid-owner 4 -j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -m owner --uid-owner 4 -j RETURN",
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1 "
        "-j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -m owner --gid-owner 1 -j RETURN",
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 2 "
        "-j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -m owner --gid-owner 2 -j RETURN",
        "raw -A OUTPUT -j ISTIO_OUTPUT_DNS",
    ]
    assert not [line for line in all_lines if "! --uid-owner" in line or "! --gid-owner" in line]
    assert all_lines[-1] == "nat -A ISTIO_OUTPUT -d 127.1.2.3/32 -j ISTIO_REDIRECT"


def test_loopback_include_cidr_of_either_family_drops_returns_in_both_families() -> None:
    config = cfg(service_cidrs=(IPv4Interface("10.0.0.0/8"), IPv6Interface("::1/128")), ipv6=True)
    for family in (V4, V6):
        assert not [line for line in lines(config, family) if "! --uid-owner" in line or "! --gid-owner" in line]


def test_loopback_host_bits_in_a_wide_include_cidr_count_as_loopback() -> None:
    # 127.0.0.0/8 written with host bits: the CIDR's address is loopback.
    all_lines = lines(cfg(service_cidrs=(IPv4Interface("127.0.0.5/8"),)))
    assert not [line for line in all_lines if "! --uid-owner" in line]


def test_non_loopback_include_cidr_keeps_the_negated_owner_returns() -> None:
    all_lines = lines(cfg(service_cidrs=(IPv4Interface("10.0.0.0/8"),)))
    assert "nat -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN" in all_lines
    assert "nat -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN" in all_lines


def test_default_uid_is_1337_and_gid_defaults_to_uid() -> None:
    config = Config(ipv6=False)
    assert lines(config) == [*HEAD_V4, *OUTPUT_V4, LOOPBACK_RETURN_V4]
    decisions = decide(config, NO_FACTS)
    assert decisions.owners == (UidOwner(1337), GidOwner(1337))


def test_default_uid_is_the_envoy_users_uid_when_known() -> None:
    decisions = decide(Config(ipv6=False), HostFacts(envoy_uid=101))
    assert decisions.owners == (UidOwner(101), GidOwner(101))
    assert "nat -A ISTIO_OUTPUT -m owner --gid-owner 101 -j RETURN" in lines(
        Config(ipv6=False), facts=HostFacts(envoy_uid=101)
    )


def test_explicit_uids_win_over_envoy_uid_and_gids_follow_them() -> None:
    decisions = decide(Config(ipv6=False, proxy_uids=(5, 6)), HostFacts(envoy_uid=101))
    assert decisions.owners == (UidOwner(5), UidOwner(6), GidOwner(5), GidOwner(6))


def test_explicit_gids_do_not_change_the_default_uid() -> None:
    decisions = decide(Config(ipv6=False, proxy_gids=(7,)), NO_FACTS)
    assert decisions.owners == (UidOwner(1337), GidOwner(7))


# ---- step 13: owner groups -------------------------------------------------------------------------


def test_owner_groups_include_list_is_one_rule_with_n_negated_gid_owners() -> None:
    all_lines = lines(cfg(owner_groups_include=("java", 202)))
    assert block(all_lines, "nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN", 3) == [
        "nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "nat -A ISTIO_OUTPUT -m owner ! --gid-owner java -m owner ! --gid-owner 202 -j RETURN",
        LOOPBACK_RETURN_V4,
    ]
    group_rule = next(r for r in rules(cfg(owner_groups_include=("java", 202))) if GidOwner("java", True) in r.clauses)
    assert group_rule.clauses == (GidOwner("java", negated=True), GidOwner(202, negated=True))
    assert group_rule.target is Verdict.RETURN


def test_owner_groups_include_single_group() -> None:
    assert "nat -A ISTIO_OUTPUT -m owner ! --gid-owner 202 -j RETURN" in lines(cfg(owner_groups_include=(202,)))


def test_owner_groups_exclude_with_wildcard_include() -> None:
    all_lines = lines(cfg(owner_groups_exclude=(888, "ftp")))
    assert block(all_lines, "nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN", 4) == [
        "nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "nat -A ISTIO_OUTPUT -m owner --gid-owner 888 -j RETURN",
        "nat -A ISTIO_OUTPUT -m owner --gid-owner ftp -j RETURN",
        LOOPBACK_RETURN_V4,
    ]


def test_owner_groups_exclude_is_ignored_with_an_include_list() -> None:
    all_lines = lines(cfg(owner_groups_include=("java",), owner_groups_exclude=(888,)))
    assert not [line for line in all_lines if "888" in line]
    assert "nat -A ISTIO_OUTPUT -m owner ! --gid-owner java -j RETURN" in all_lines


def test_owner_groups_empty_include_list_is_a_bare_return() -> None:
    all_lines = lines(cfg(owner_groups_include=(), service_cidrs=ALL))
    assert all_lines[-4:] == [
        "nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "nat -A ISTIO_OUTPUT -j RETURN",
        LOOPBACK_RETURN_V4,
        "nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ]


def test_owner_groups_in_both_families() -> None:
    config = cfg(owner_groups_include=("java", 202), ipv6=True)
    assert "nat -A ISTIO_OUTPUT -m owner ! --gid-owner java -m owner ! --gid-owner 202 -j RETURN" in lines(config, V6)


# ---- step 14: DNS ----------------------------------------------------------------------------------


def dns_config(**changes: object) -> Config:
    return cfg(redirect_dns=True, **changes)


def test_dns_with_v4_server_matches_worked_example() -> None:
    all_lines = lines(dns_config(dns_servers=(ip_address("10.96.0.10"),)))
    assert all_lines[3:] == [
        "nat -A OUTPUT -j ISTIO_OUTPUT",
        "nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 "
        "-m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN",
        "nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 "
        "-j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --gid-owner 1337 -j RETURN",
        "nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "raw -A OUTPUT -j ISTIO_OUTPUT_DNS",
        "nat -A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS",
        "nat -A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053",
        "nat -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
        "raw -A PREROUTING -j ISTIO_INBOUND",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j CT --zone 2",
        "raw -A ISTIO_INBOUND -p udp --sport 53 -s 10.96.0.10/32 -j CT --zone 1",
        LOOPBACK_RETURN_V4,
    ]


def test_dns_multiport_only_for_uid_rules() -> None:
    all_lines = lines(dns_config(dns_servers=(ip_address("10.96.0.10"),), proxy_uids=(3, 4), proxy_gids=(1, 2)))
    multiport = [line for line in all_lines if "multiport" in line]
    assert len(multiport) == 2
    assert all("--uid-owner" in line for line in multiport)
    gid_redirects = [line for line in all_lines if "--gid-owner" in line and "ISTIO_IN_REDIRECT" in line]
    assert gid_redirects == [
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1 "
        "-j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 2 "
        "-j ISTIO_IN_REDIRECT",
    ]


def test_dns_multiport_uses_the_configured_tunnel_port() -> None:
    all_lines = lines(dns_config(capture_all_dns=True, inbound_tunnel_port=16008))
    assert [line for line in all_lines if "multiport" in line] == [
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,16008 "
        "-m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"
    ]


def test_dns_redirect_targets_are_typed_and_spelled_per_protocol() -> None:
    dns_rules = [
        r for r in rules(dns_config(capture_all_dns=True)) if r.chain == "ISTIO_OUTPUT_DNS" and r.table is Table.NAT
    ]
    assert [(r.clauses, r.target) for r in dns_rules] == [
        ((Protocol(Proto.TCP), DestinationPort(53)), Redirect(15053)),
        ((Protocol(Proto.UDP), DestinationPort(53)), Redirect(15053)),
    ]
    assert [rule_text(r) for r in dns_rules] == [
        "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053",
    ]


def capture_all_dns_block() -> list[str]:
    return [
        "raw -A OUTPUT -j ISTIO_OUTPUT_DNS",
        "nat -A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS",
        "nat -A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053",
        "nat -A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 3 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 3 -j CT --zone 2",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 4 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 4 -j CT --zone 2",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1 -j CT --zone 2",
        "raw -A PREROUTING -j ISTIO_INBOUND",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2",
        "raw -A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1",
    ]


def test_dns_capture_all_in_both_families_and_ignores_servers() -> None:
    config = dns_config(
        capture_all_dns=True,
        dns_servers=(ip_address("10.96.0.10"),),
        proxy_uids=(3, 4),
        proxy_gids=(1,),
        ipv6=True,
    )
    for family, lo in ((V4, "127.0.0.1/32"), (V6, "::1/128")):
        all_lines = lines(config, family)
        start = index(all_lines, "raw -A OUTPUT -j ISTIO_OUTPUT_DNS")
        assert all_lines[start:] == [*capture_all_dns_block(), f"nat -A ISTIO_OUTPUT -d {lo} -j RETURN"]
        assert not [line for line in all_lines if "10.96.0.10" in line]


def test_dns_capture_all_does_not_need_servers_from_facts() -> None:
    config = dns_config(capture_all_dns=True)
    facts = HostFacts(nameservers=(ip_address("10.96.0.10"),))
    assert lines(config, facts=facts) == lines(config)


def test_dns_servers_per_family() -> None:
    config = dns_config(
        dns_servers=(ip_address("10.96.0.10"), ip_address("fd00::a"), ip_address("10.96.0.11")), ipv6=True
    )
    v4 = lines(config, V4)
    v6 = lines(config, V6)
    assert [line for line in v4 if line.startswith("nat -A ISTIO_OUTPUT_DNS")] == [
        "nat -A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053",
        "nat -A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.11/32 -j REDIRECT --to-ports 15053",
        "nat -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053",
        "nat -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.11/32 -j REDIRECT --to-port 15053",
    ]
    assert [line for line in v6 if line.startswith("nat -A ISTIO_OUTPUT_DNS")] == [
        "nat -A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d fd00::a/128 -j REDIRECT --to-ports 15053",
        "nat -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d fd00::a/128 -j REDIRECT --to-port 15053",
    ]
    assert v4[index(v4, "raw -A PREROUTING -j ISTIO_INBOUND") :][:5] == [
        "raw -A PREROUTING -j ISTIO_INBOUND",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j CT --zone 2",
        "raw -A ISTIO_INBOUND -p udp --sport 53 -s 10.96.0.10/32 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.11/32 -j CT --zone 2",
        "raw -A ISTIO_INBOUND -p udp --sport 53 -s 10.96.0.11/32 -j CT --zone 1",
    ]
    assert v6[index(v6, "raw -A PREROUTING -j ISTIO_INBOUND") :][:3] == [
        "raw -A PREROUTING -j ISTIO_INBOUND",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -d fd00::a/128 -j CT --zone 2",
        "raw -A ISTIO_INBOUND -p udp --sport 53 -s fd00::a/128 -j CT --zone 1",
    ]


def test_dns_v6_servers_only_still_writes_v4_raw_zone_rules() -> None:
    """Reference 3.6: raw OUTPUT jump and the UID/GID zones in both families whenever DNS is active."""
    config = dns_config(dns_servers=(ip_address("fd00::a"),), ipv6=True)
    v4 = lines(config, V4)
    assert [line for line in v4 if line.startswith("raw")] == [
        "raw -A OUTPUT -j ISTIO_OUTPUT_DNS",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
        "raw -A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1",
        "raw -A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
    ]
    # No v4 server: no nat DNS chain and no jump to it, but the UID rules keep the DNS form.
    assert not [line for line in v4 if "ISTIO_OUTPUT_DNS" in line and line.startswith("nat")]
    assert "nat -A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN" in v4
    v4_ruleset = plan_of(config).ruleset(V4)
    assert v4_ruleset is not None
    assert declared_chains(v4_ruleset.rules)[Table.RAW] == ["ISTIO_OUTPUT_DNS"]
    v6 = lines(config, V6)
    assert "nat -A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS" in v6
    assert "raw -A PREROUTING -j ISTIO_INBOUND" in v6


def test_dns_v4_servers_only_leaves_v6_without_nat_dns() -> None:
    config = dns_config(dns_servers=(ip_address("10.96.0.10"),), ipv6=True)
    v6 = lines(config, V6)
    assert "raw -A OUTPUT -j ISTIO_OUTPUT_DNS" in v6
    assert not [line for line in v6 if line.startswith("nat") and "ISTIO_OUTPUT_DNS" in line]
    assert "raw -A PREROUTING -j ISTIO_INBOUND" not in v6


def test_dns_silently_off_without_servers_or_capture_all() -> None:
    config = dns_config(proxy_uids=(3, 4), proxy_gids=(1, 2), ipv6=True)
    plain = cfg(proxy_uids=(3, 4), proxy_gids=(1, 2), ipv6=True)
    assert plan_of(config) == plan_of(plain)
    assert decide(config, NO_FACTS).redirect_dns is False


def test_dns_servers_only_matter_with_redirect_dns() -> None:
    config = cfg(dns_servers=(ip_address("10.96.0.10"),), capture_all_dns=True)
    assert plan_of(config) == plan_of(cfg())


def test_dns_servers_from_facts_when_not_configured() -> None:
    facts = HostFacts(nameservers=(ip_address("10.96.0.10"),))
    assert lines(dns_config(), facts=facts) == lines(dns_config(dns_servers=(ip_address("10.96.0.10"),)))


def test_configured_dns_servers_override_facts() -> None:
    facts = HostFacts(nameservers=(ip_address("10.96.0.10"),))
    all_lines = lines(dns_config(dns_servers=(ip_address("10.0.0.2"),)), facts=facts)
    assert not [line for line in all_lines if "10.96.0.10" in line]
    assert "nat -A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.0.0.2/32 -j REDIRECT --to-ports 15053" in all_lines


def test_dns_block_sits_between_owner_groups_and_loopback_return() -> None:
    all_lines = lines(dns_config(capture_all_dns=True, owner_groups_exclude=(888,)))
    group = index(all_lines, "nat -A ISTIO_OUTPUT -m owner --gid-owner 888 -j RETURN")
    assert all_lines[group + 1] == "raw -A OUTPUT -j ISTIO_OUTPUT_DNS"
    assert all_lines[-1] == LOOPBACK_RETURN_V4


# ---- steps 15-18: loopback, excluded and included CIDRs, outbound ports ---------------------------


def test_exclude_cidrs_apply_even_without_include_cidrs() -> None:
    all_lines = lines(cfg(service_exclude_cidrs=(IPv4Interface("10.1.0.0/16"), IPv4Interface("1.1.0.0/16"))))
    assert all_lines[-3:] == [
        LOOPBACK_RETURN_V4,
        "nat -A ISTIO_OUTPUT -d 10.1.0.0/16 -j RETURN",
        "nat -A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN",
    ]


def test_exclude_cidrs_apply_with_include_list_and_come_before_it() -> None:
    """Reference 4.1 ``ip-range``: -x 1.1.0.0/16 -i 9.9.0.0/16."""
    config = cfg(service_exclude_cidrs=(IPv4Interface("1.1.0.0/16"),), service_cidrs=(IPv4Interface("9.9.0.0/16"),))
    assert lines(config)[-3:] == [
        LOOPBACK_RETURN_V4,
        "nat -A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN",
        "nat -A ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT",
    ]


def test_cidrs_are_split_per_family() -> None:
    config = cfg(
        service_exclude_cidrs=(IPv6Interface("2001:db8:1::/48"), IPv4Interface("10.1.0.0/16")),
        service_cidrs=(
            IPv6Interface("2001:db8::/32"),
            IPv4Interface("10.0.0.0/8"),
            IPv4Interface("192.168.0.0/16"),
        ),
        ipv6=True,
    )
    assert lines(config, V4)[-4:] == [
        LOOPBACK_RETURN_V4,
        "nat -A ISTIO_OUTPUT -d 10.1.0.0/16 -j RETURN",
        "nat -A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        "nat -A ISTIO_OUTPUT -d 192.168.0.0/16 -j ISTIO_REDIRECT",
    ]
    assert lines(config, V6)[-3:] == [
        "nat -A ISTIO_OUTPUT -d ::1/128 -j RETURN",
        "nat -A ISTIO_OUTPUT -d 2001:db8:1::/48 -j RETURN",
        "nat -A ISTIO_OUTPUT -d 2001:db8::/32 -j ISTIO_REDIRECT",
    ]


def test_cidr_host_bits_are_kept_as_written() -> None:
    all_lines = lines(cfg(service_cidrs=(IPv4Interface("10.0.0.1/8"),)))
    assert all_lines[-1] == "nat -A ISTIO_OUTPUT -d 10.0.0.1/8 -j ISTIO_REDIRECT"


def test_include_list_of_other_family_only_captures_nothing_in_this_family() -> None:
    config = cfg(service_cidrs=(IPv6Interface("2001:db8::/32"),), ipv6=True)
    assert not [line for line in lines(config, V4) if "ISTIO_OUTPUT -d" in line and "ISTIO_REDIRECT" in line]
    assert lines(config, V4)[-1] == LOOPBACK_RETURN_V4


def test_wildcard_include_in_both_families() -> None:
    config = cfg(service_cidrs=ALL, ipv6=True)
    for family in (V4, V6):
        assert lines(config, family)[-1] == "nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT"


def test_outbound_ports_come_after_excludes_and_before_includes() -> None:
    config = cfg(
        outbound_ports=(32000, 31000),
        service_exclude_cidrs=(IPv4Interface("1.1.0.0/16"),),
        service_cidrs=ALL,
        ipv6=True,
    )
    assert lines(config)[-5:] == [
        LOOPBACK_RETURN_V4,
        "nat -A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN",
        "nat -A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT",
        "nat -A ISTIO_OUTPUT -p tcp --dport 31000 -j ISTIO_REDIRECT",
        "nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ]
    assert lines(config, V6)[-4:] == [
        "nat -A ISTIO_OUTPUT -d ::1/128 -j RETURN",
        "nat -A ISTIO_OUTPUT -p tcp --dport 32000 -j ISTIO_REDIRECT",
        "nat -A ISTIO_OUTPUT -p tcp --dport 31000 -j ISTIO_REDIRECT",
        "nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    ]


def test_custom_loopback_cidr_used_everywhere_but_passthrough_and_v6() -> None:
    config = cfg(
        ipv4_loopback_cidr=IPv4Interface("127.0.0.1/8"),
        mode=Mode.TPROXY,
        inbound_ports=ALL,
        service_cidrs=ALL,
        ipv6=True,
    )
    v4 = lines(config, V4)
    assert [line for line in v4 if "127.0.0.1/" in line] == [
        "mangle -A ISTIO_TPROXY ! -d 127.0.0.1/8 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/8 -p tcp ! --dport 15008 -m owner --uid-owner 1337 "
        "-j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/8 -p tcp ! --dport 15008 -m owner --gid-owner 1337 "
        "-j ISTIO_IN_REDIRECT",
        "nat -A ISTIO_OUTPUT -d 127.0.0.1/8 -j RETURN",
        "mangle -A OUTPUT ! -d 127.0.0.1/8 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338",
        "mangle -A OUTPUT ! -d 127.0.0.1/8 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338",
    ]
    assert "nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN" in v4
    assert "mangle -I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN" in v4
    v6 = lines(config, V6)
    assert "nat -A ISTIO_OUTPUT -d ::1/128 -j RETURN" in v6
    assert not [line for line in v6 if "127." in line]


# ---- families, routes, loopback addresses ----------------------------------------------------------


def test_ipv4_always_ipv6_only_when_enabled() -> None:
    assert plan_of(cfg()).families == (V4,)
    assert plan_of(cfg(ipv6=True)).families == (V4, V6)


@pytest.mark.parametrize(
    ("addresses", "dual_stack", "expected"),
    [
        (("198.18.0.2",), False, (V4,)),
        (("2001:db8::2",), False, (V4, V6)),
        (("198.18.0.2", "2001:db8::2"), False, (V4, V6)),
        (("198.18.0.2", "2001:db8::2"), True, (V4, V6)),
        (("198.18.0.2", "fe80::1"), True, (V4,)),
        (("127.0.0.1", "::1", "fe80::1", "2001:db8::2", "198.18.0.2"), False, (V4, V6)),
        (("169.254.1.1", "198.18.0.2"), False, (V4,)),
    ],
)
def test_ipv6_detection_from_facts(addresses: tuple[str, ...], dual_stack: bool, expected: tuple[Family, ...]) -> None:
    facts = HostFacts(addresses=tuple(ip_address(a) for a in addresses))
    assert plan_of(cfg(ipv6=None, dual_stack=dual_stack), facts).families == expected


def test_no_usable_address_is_an_error_without_forced_ipv6() -> None:
    facts = HostFacts(addresses=(IPv4Address("127.0.0.1"), IPv6Address("::1"), IPv6Address("fe80::1")))
    with pytest.raises(HostError):
        plan_of(cfg(ipv6=None), facts)
    assert plan_of(cfg(ipv6=False), facts).families == (V4,)


def test_loopback_address_only_with_ipv6() -> None:
    assert plan_of(cfg()).loopback_addresses == ()
    assert plan_of(cfg(ipv6=True)).loopback_addresses == (IPv6Interface("::6/128"),)
    # In REDIRECT mode too, and regardless of TPROXY.
    assert plan_of(cfg(ipv6=True, mode=Mode.TPROXY, inbound_ports=ALL)).loopback_addresses == (
        IPv6Interface("::6/128"),
    )


def test_routes_only_for_tproxy_with_inbound_ports_one_per_family() -> None:
    assert plan_of(cfg(mode=Mode.TPROXY, inbound_ports=(80,))).routes == (PolicyRoute(V4, 1337, 133),)
    assert plan_of(cfg(mode=Mode.TPROXY, inbound_ports=ALL, ipv6=True)).routes == (
        PolicyRoute(V4, 1337, 133),
        PolicyRoute(V6, 1337, 133),
    )
    assert plan_of(cfg(mode=Mode.TPROXY, inbound_ports=ALL, tproxy_mark=7, tproxy_route_table=200)).routes == (
        PolicyRoute(V4, 7, 200),
    )
    assert plan_of(cfg(mode=Mode.TPROXY)).routes == ()
    assert plan_of(cfg(mode=Mode.REDIRECT, inbound_ports=ALL)).routes == ()


def test_rulesets_hold_only_their_familys_addresses() -> None:
    config = KITCHEN_SINK
    for family in (V4, V6):
        for rule in rules(config, family):
            for clause in rule.clauses:
                if isinstance(clause, Source | Destination):
                    assert Family.of(clause.network) is family, rule


# ---- --match-sets ----------------------------------------------------------------------------------------


def test_match_sets_replace_each_list_by_one_lookup_in_the_same_place() -> None:
    listed = Config(
        inbound_ports=(8080, 8081),
        local_exclude_ports=(15090,),
        service_cidrs=(IPv4Interface("10.0.0.0/8"), IPv4Interface("10.1.0.0/16")),
        service_exclude_cidrs=(IPv4Interface("10.2.0.0/16"),),
        outbound_ports=(25,),
        local_outbound_ports_exclude=(5432, 3306),
        kube_virt_interfaces=("eth1",),
        ipv6=False,
    )
    plain = build_plan(listed, HostFacts())
    sets = build_plan(replace(listed, match_sets=True), HostFacts())
    assert plain.sets == ()
    assert sets.sets == (
        AddressSet("ISTIO_EXCLUDE_CIDR4", Family.V4, (IPv4Interface("10.2.0.0/16"),)),
        AddressSet("ISTIO_INCLUDE_CIDR4", Family.V4, (IPv4Interface("10.0.0.0/8"), IPv4Interface("10.1.0.0/16"))),
        PortSet("ISTIO_INBOUND_PORTS", (8080, 8081)),
        PortSet("ISTIO_OUTBOUND_PORTS", (25,)),
        PortSet("ISTIO_OUTBOUND_EXCLUDE_PORTS", (5432, 3306)),
    )
    payload = render_restore(sets.rulesets[0])
    assert "-A ISTIO_INBOUND -p tcp -m set --match-set ISTIO_INBOUND_PORTS dst -j ISTIO_IN_REDIRECT\n" in payload
    assert "-A ISTIO_OUTPUT -m set --match-set ISTIO_EXCLUDE_CIDR4 dst -j RETURN\n" in payload
    assert "-I PREROUTING 1 -i eth1 -m set --match-set ISTIO_INCLUDE_CIDR4 dst -j ISTIO_REDIRECT\n" in payload
    assert "--dport 8080" not in payload and "10.1.0.0/16" not in payload
    # -d is ignored without -b '*', so its set is not made either.
    assert all(ipset.name != "ISTIO_INBOUND_EXCLUDE_PORTS" for ipset in sets.sets)
    # Every lookup replaced the rules of one list, where those rules stood.
    plain_rules, set_rules = plain.rulesets[0].rules, sets.rulesets[0].rules
    assert len(set_rules) == len(plain_rules) - 1 - 1 - 1 - 2  # -b, -i (+kube-virt), -o tcp+udp
    assert [rule.chain for rule in set_rules if any(isinstance(c, InSet) for c in rule.clauses)] == [
        "ISTIO_INBOUND",
        "ISTIO_OUTPUT",
        "ISTIO_OUTPUT",
        "ISTIO_OUTPUT",
        "ISTIO_OUTPUT",
        "PREROUTING",
        "ISTIO_OUTPUT",
    ]
