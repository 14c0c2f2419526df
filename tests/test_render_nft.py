"""The plan as an nft transaction in Istio's ``--native-nftables`` form, as exact text."""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv6Interface, ip_address, ip_interface

import pytest

from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import (
    ISTIO_CHAINS,
    ISTIO_INBOUND,
    Destination,
    Family,
    Jump,
    Plan,
    Proto,
    Protocol,
    Rule,
    RuleSet,
    Table,
    Tproxy,
    Verdict,
)
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.render.nft import chain_name, insert_index, merge_families, render_nft, rule_expression

V4, V6 = Family.V4, Family.V6
NAT, MANGLE, RAW = Table.NAT, Table.MANGLE, Table.RAW


def cfg(**changes: object) -> Config:
    """Istio's test base: uid 1337 (gid defaults to it), IPv4 only, everything else at its default."""
    settings: dict[str, object] = {"proxy_uids": (1337,), "ipv6": False}
    settings.update(changes)
    return Config(**settings)  # type: ignore[arg-type]


def nft(config: Config) -> list[str]:
    return render_nft(build_plan(config, HostFacts())).splitlines()


def rules_of(lines: list[str], table: str, chain: str | None = None) -> list[str]:
    """The rule lines of one table (or one chain), without the ``add rule inet istio-proxy-<table>`` head."""
    head = f"rule inet istio-proxy-{table} "
    found = [line.split(head, 1)[1] for line in lines if head in line]
    return [rule for rule in found if chain is None or rule.split(" ", 1)[0] == chain]


def test_empty_config_is_istios_empty_golden() -> None:
    assert render_nft(build_plan(cfg(), HostFacts())) == "".join(
        line + "\n"
        for line in (
            "add table inet istio-proxy-nat",
            "flush table inet istio-proxy-nat",
            "add chain inet istio-proxy-nat output { type nat hook output priority -100 ; }",
            "add chain inet istio-proxy-nat istio-inbound",
            "add chain inet istio-proxy-nat istio-redirect",
            "add chain inet istio-proxy-nat istio-in-redirect",
            "add chain inet istio-proxy-nat istio-output",
            "add rule inet istio-proxy-nat istio-inbound meta l4proto tcp tcp dport 15008 counter return",
            "add rule inet istio-proxy-nat istio-redirect meta l4proto tcp counter redirect to :15001",
            "add rule inet istio-proxy-nat istio-in-redirect meta l4proto tcp counter redirect to :15006",
            "add rule inet istio-proxy-nat output counter jump istio-output",
            "add rule inet istio-proxy-nat istio-output oifname lo ip saddr 127.0.0.6/32 counter return",
            "add rule inet istio-proxy-nat istio-output oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 "
            "tcp dport != 15008 skuid 1337 counter jump istio-in-redirect",
            "add rule inet istio-proxy-nat istio-output oifname lo skuid != 1337 counter return",
            "add rule inet istio-proxy-nat istio-output skuid 1337 counter return",
            "add rule inet istio-proxy-nat istio-output oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 "
            "tcp dport != 15008 skgid 1337 counter jump istio-in-redirect",
            "add rule inet istio-proxy-nat istio-output oifname lo skgid != 1337 counter return",
            "add rule inet istio-proxy-nat istio-output skgid 1337 counter return",
            "add rule inet istio-proxy-nat istio-output ip daddr 127.0.0.1/32 counter return",
        )
    )


def test_tproxy_ipv6_mangle_table_pairs_each_versioned_rule_with_its_ipv6_twin() -> None:
    lines = nft(cfg(mode=Mode.TPROXY, inbound_ports=(80,), proxy_gids=(7,), ipv6=True))
    mangle = lines[lines.index("add table inet istio-proxy-mangle") :]
    assert mangle == [
        "add table inet istio-proxy-mangle",
        "flush table inet istio-proxy-mangle",
        "add chain inet istio-proxy-mangle prerouting { type filter hook prerouting priority -150 ; }",
        "add chain inet istio-proxy-mangle output { type route hook output priority -150 ; }",
        "add chain inet istio-proxy-mangle istio-divert",
        "add chain inet istio-proxy-mangle istio-tproxy",
        "add chain inet istio-proxy-mangle istio-inbound",
        "add rule inet istio-proxy-mangle istio-divert counter meta mark set 1337",
        "add rule inet istio-proxy-mangle istio-divert counter accept",
        "add rule inet istio-proxy-mangle istio-tproxy meta l4proto tcp ip daddr != 127.0.0.1/32 "
        "tproxy ip to :15006 meta mark set 1337 counter accept",
        "add rule inet istio-proxy-mangle istio-tproxy meta l4proto tcp ip6 daddr != ::1/128 "
        "tproxy ip6 to :15006 meta mark set 1337 counter accept",
        "add rule inet istio-proxy-mangle prerouting meta l4proto tcp counter jump istio-inbound",
        "add rule inet istio-proxy-mangle istio-inbound meta l4proto tcp ct state related,established "
        "tcp dport 80 counter jump istio-divert",
        "add rule inet istio-proxy-mangle istio-inbound meta l4proto tcp tcp dport 80 counter jump istio-tproxy",
        "add rule inet istio-proxy-mangle prerouting meta l4proto tcp mark 1337 counter ct mark set mark",
        "add rule inet istio-proxy-mangle output oifname lo meta l4proto tcp mark 1337 counter return",
        "add rule inet istio-proxy-mangle output oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 "
        "skuid 1337 counter meta mark set 1338",
        "add rule inet istio-proxy-mangle output oifname lo meta l4proto tcp ip6 daddr != ::1/128 "
        "skuid 1337 counter meta mark set 1338",
        "add rule inet istio-proxy-mangle output oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 "
        "skgid 7 counter meta mark set 1338",
        "add rule inet istio-proxy-mangle output oifname lo meta l4proto tcp ip6 daddr != ::1/128 "
        "skgid 7 counter meta mark set 1338",
        "add rule inet istio-proxy-mangle output meta l4proto tcp ct mark 1337 counter meta mark set ct mark",
        # -I ISTIO_INBOUND 1/2/3: 0-based, and Istio inserts the ::6 rule at the same index as 127.0.0.6.
        "insert rule inet istio-proxy-mangle istio-inbound index 0 meta l4proto tcp mark 1337 counter return",
        "insert rule inet istio-proxy-mangle istio-inbound index 1 iifname lo meta l4proto tcp "
        "ip saddr 127.0.0.6/32 counter return",
        "insert rule inet istio-proxy-mangle istio-inbound index 1 iifname lo meta l4proto tcp "
        "ip6 saddr ::6/128 counter return",
        "insert rule inet istio-proxy-mangle istio-inbound index 2 iifname lo meta l4proto tcp "
        "mark != 1338 counter return",
    ]


DNS_SERVERS = (ip_address("10.0.0.1"), ip_address("10.0.0.2"), ip_address("fd00::a"))


def test_dns_servers_each_loop_runs_for_ipv4_then_ipv6() -> None:
    lines = nft(cfg(redirect_dns=True, dns_servers=DNS_SERVERS, ipv6=True))
    assert rules_of(lines, "nat", "istio-output-dns") == [
        "istio-output-dns ip daddr 10.0.0.1/32 tcp dport 53 counter redirect to :15053",
        "istio-output-dns ip daddr 10.0.0.2/32 tcp dport 53 counter redirect to :15053",
        "istio-output-dns ip6 daddr fd00::a/128 tcp dport 53 counter redirect to :15053",
        "istio-output-dns ip daddr 10.0.0.1/32 udp dport 53 counter redirect to :15053",
        "istio-output-dns ip daddr 10.0.0.2/32 udp dport 53 counter redirect to :15053",
        "istio-output-dns ip6 daddr fd00::a/128 udp dport 53 counter redirect to :15053",
    ]
    # The nat jump to the DNS chain is shared: written once, not once per family.
    assert rules_of(lines, "nat").count("istio-output counter jump istio-output-dns") == 1
    assert rules_of(lines, "raw") == [
        "output counter jump istio-output-dns",
        "istio-output-dns udp dport 53 meta skuid 1337 counter ct zone set 1",
        "istio-output-dns udp sport 15053 meta skuid 1337 counter ct zone set 2",
        "istio-output-dns udp dport 53 meta skgid 1337 counter ct zone set 1",
        "istio-output-dns udp sport 15053 meta skgid 1337 counter ct zone set 2",
        "prerouting counter jump istio-inbound",
        # Per server, a pair of rules in two chains: the loop body stays whole, IPv4 servers first.
        "istio-output-dns udp dport 53 ip daddr 10.0.0.1/32 counter ct zone set 2",
        "istio-inbound udp sport 53 ip saddr 10.0.0.1/32 counter ct zone set 1",
        "istio-output-dns udp dport 53 ip daddr 10.0.0.2/32 counter ct zone set 2",
        "istio-inbound udp sport 53 ip saddr 10.0.0.2/32 counter ct zone set 1",
        "istio-output-dns udp dport 53 ip6 daddr fd00::a/128 counter ct zone set 2",
        "istio-inbound udp sport 53 ip6 saddr fd00::a/128 counter ct zone set 1",
    ]


def test_a_dns_server_at_ipv6_loopback_is_not_taken_for_a_versioned_rule() -> None:
    lines = nft(cfg(redirect_dns=True, dns_servers=(*DNS_SERVERS[:2], ip_address("::1")), ipv6=True))
    assert rules_of(lines, "nat", "istio-output-dns")[:3] == [
        "istio-output-dns ip daddr 10.0.0.1/32 tcp dport 53 counter redirect to :15053",
        "istio-output-dns ip daddr 10.0.0.2/32 tcp dport 53 counter redirect to :15053",
        "istio-output-dns ip6 daddr ::1/128 tcp dport 53 counter redirect to :15053",
    ]


def test_dns_server_of_one_family_only_gets_the_shared_jumps_once() -> None:
    lines = nft(cfg(redirect_dns=True, dns_servers=(ip_address("fd00::a"),), ipv6=True))
    assert rules_of(lines, "nat")[-6:] == [
        "istio-output skgid 1337 counter return",
        "istio-output counter jump istio-output-dns",
        "istio-output-dns ip6 daddr fd00::a/128 tcp dport 53 counter redirect to :15053",
        "istio-output-dns ip6 daddr fd00::a/128 udp dport 53 counter redirect to :15053",
        "istio-output ip daddr 127.0.0.1/32 counter return",
        "istio-output ip6 daddr ::1/128 counter return",
    ]
    assert rules_of(lines, "raw")[-3:] == [
        "prerouting counter jump istio-inbound",
        "istio-output-dns udp dport 53 ip6 daddr fd00::a/128 counter ct zone set 2",
        "istio-inbound udp sport 53 ip6 saddr fd00::a/128 counter ct zone set 1",
    ]


def test_capture_all_dns_spells_tcp_with_meta_l4proto_and_udp_without() -> None:
    lines = nft(cfg(redirect_dns=True, capture_all_dns=True))
    assert rules_of(lines, "nat", "istio-output-dns") == [
        "istio-output-dns meta l4proto tcp tcp dport 53 counter redirect to :15053",
        "istio-output-dns udp dport 53 counter redirect to :15053",
    ]
    assert rules_of(lines, "raw")[-3:] == [
        "prerouting counter jump istio-inbound",
        "istio-output-dns udp dport 53 counter ct zone set 2",
        "istio-inbound udp sport 53 counter ct zone set 1",
    ]


def test_cidrs_and_kube_virt_dual_stack() -> None:
    config = cfg(
        kube_virt_interfaces=("kv0",),
        service_exclude_cidrs=(ip_interface("10.1.0.0/16"), ip_interface("fd00:1::/64")),
        service_cidrs=(ip_interface("10.0.0.0/8"), ip_interface("192.168.0.0/16"), ip_interface("fd00::/8")),
        ipv6=True,
    )
    lines = nft(config)
    assert lines[-10:] == [
        "add rule inet istio-proxy-nat istio-output ip daddr 127.0.0.1/32 counter return",
        "add rule inet istio-proxy-nat istio-output ip6 daddr ::1/128 counter return",
        "add rule inet istio-proxy-nat istio-output ip daddr 10.1.0.0/16 counter return",
        "add rule inet istio-proxy-nat istio-output ip6 daddr fd00:1::/64 counter return",
        "insert rule inet istio-proxy-nat prerouting index 0 iifname kv0 ip daddr 10.0.0.0/8 "
        "counter jump istio-redirect",
        "add rule inet istio-proxy-nat istio-output ip daddr 10.0.0.0/8 counter jump istio-redirect",
        "insert rule inet istio-proxy-nat prerouting index 0 iifname kv0 ip daddr 192.168.0.0/16 "
        "counter jump istio-redirect",
        "add rule inet istio-proxy-nat istio-output ip daddr 192.168.0.0/16 counter jump istio-redirect",
        "insert rule inet istio-proxy-nat prerouting index 0 iifname kv0 ip6 daddr fd00::/8 "
        "counter jump istio-redirect",
        "add rule inet istio-proxy-nat istio-output ip6 daddr fd00::/8 counter jump istio-redirect",
    ]
    # -I PREROUTING 1 into the empty chain: knftables refuses index 0 there, so it is an append.
    assert "add rule inet istio-proxy-nat prerouting iifname kv0 counter return" in lines


def test_excluded_cidrs_of_ipv6_only_come_before_included_cidrs_of_ipv4_only() -> None:
    config = cfg(
        service_exclude_cidrs=(ip_interface("fd00:1::/64"),), service_cidrs=(ip_interface("10.0.0.0/8"),), ipv6=True
    )
    assert rules_of(nft(config), "nat")[-2:] == [
        "istio-output ip6 daddr fd00:1::/64 counter return",
        "istio-output ip daddr 10.0.0.0/8 counter jump istio-redirect",
    ]


def test_wildcard_capture_with_ipv6_is_shared() -> None:
    lines = nft(cfg(service_cidrs=ALL, kube_virt_interfaces=("kv0",), ipv6=True))
    assert rules_of(lines, "nat")[-2:] == [
        "istio-output counter jump istio-redirect",
        "prerouting index 0 iifname kv0 counter jump istio-redirect",
    ]
    assert rules_of(lines, "nat").count("istio-output counter jump istio-redirect") == 1


def test_outbound_ports_are_written_with_the_port_match_alone() -> None:
    lines = nft(cfg(outbound_ports=(3306,), local_outbound_ports_exclude=(9000,)))
    nat = rules_of(lines, "nat", "istio-output")
    assert nat[:2] == ["istio-output tcp dport 9000 counter return", "istio-output udp dport 9000 counter return"]
    assert nat[-1] == "istio-output tcp dport 3306 counter jump istio-redirect"


def test_invalid_drop_is_tcp_only_as_in_istio() -> None:
    lines = nft(cfg(drop_invalid=True))
    assert rules_of(lines, "mangle") == [
        "prerouting meta l4proto tcp ct state invalid counter jump istio-drop",
        "istio-drop counter drop",
    ]


def test_owner_groups_include_and_exclude() -> None:
    assert rules_of(nft(cfg(owner_groups_include=("java", 202))), "nat")[-2] == (
        "istio-output skgid != java skgid != 202 counter return"
    )
    assert rules_of(nft(cfg(owner_groups_exclude=(888, "ftp"))), "nat")[-3:-1] == [
        "istio-output skgid 888 counter return",
        "istio-output skgid ftp counter return",
    ]


@pytest.mark.parametrize(
    "config",
    [
        cfg(),
        cfg(ipv6=True, mode=Mode.TPROXY, inbound_ports=ALL, local_exclude_ports=(15090,)),
        cfg(ipv6=True, redirect_dns=True, dns_servers=DNS_SERVERS, proxy_uids=(3, 4), proxy_gids=(1, 2)),
        cfg(ipv6=True, service_cidrs=(ip_interface("fd00::/8"),), kube_virt_interfaces=("a", "b")),
    ],
    ids=["empty", "tproxy-ipv6", "dns-ipv6", "cidrs-ipv6"],
)
def test_every_rule_counts_and_both_families_keep_their_order(config: Config) -> None:
    plan = build_plan(config, HostFacts())
    lines = render_nft(plan).splitlines()
    assert all(" counter " in line for line in lines if " rule " in line)
    for table in (NAT, MANGLE, RAW):
        merged = [rule for _, rule in merge_families(plan, table)]
        for ruleset in plan.rulesets:
            assert _is_subsequence(ruleset.in_table(table), merged), (table, ruleset.family)
        # Nothing but the rules of the two lists, and a rule of both lists once.
        v4, v6 = (rs.in_table(table) for rs in plan.rulesets) if len(plan.rulesets) == 2 else (merged, [])
        shared = sum(1 for rule in merged if rule in v4 and rule in v6)
        assert len(merged) == len(v4) + len(v6) - shared


def _is_subsequence(part: list[Rule], whole: list[Rule]) -> bool:
    rest = iter(whole)
    return all(any(rule == other for other in rest) for rule in part)


def test_chain_names_are_lower_case_with_dashes() -> None:
    assert [chain_name(chain) for chain in ISTIO_CHAINS] == [
        "istio-inbound",
        "istio-redirect",
        "istio-in-redirect",
        "istio-output",
        "istio-output-dns",
        "istio-divert",
        "istio-tproxy",
        "istio-drop",
    ]
    assert chain_name("PREROUTING") == "prerouting"
    assert chain_name("OUTPUT") == "output"


RETURN_RULE = Rule(MANGLE, ISTIO_INBOUND, (Protocol(Proto.TCP),), Verdict.RETURN)


@pytest.mark.parametrize(
    ("position", "rules_in_chain", "index"),
    [
        (None, 0, None),
        (None, 5, None),
        (1, 0, None),  # into an empty chain: an append
        (1, 1, 0),
        (2, 1, None),  # at the rule count: an append
        (3, 2, None),
        (2, 4, 1),
        (5, 4, None),  # beyond the rule count: an append
    ],
)
def test_insert_index_is_zero_based_and_appends_where_nft_has_no_such_index(
    position: int | None, rules_in_chain: int, index: int | None
) -> None:
    rule = Rule(MANGLE, ISTIO_INBOUND, RETURN_RULE.clauses, Verdict.RETURN, position)
    assert insert_index(rule, rules_in_chain) == index


def test_inserts_count_the_rules_written_before_them_in_their_chain() -> None:
    rules = (
        Rule(NAT, "PREROUTING", (), Verdict.RETURN, 1),
        Rule(NAT, "PREROUTING", (), Jump(ISTIO_INBOUND), 1),
        Rule(NAT, ISTIO_INBOUND, (), Verdict.RETURN, 1),
        Rule(NAT, "PREROUTING", (), Verdict.ACCEPT, 3),
        Rule(NAT, "PREROUTING", (), Verdict.DROP, 2),
    )
    assert render_nft(Plan((RuleSet(V4, rules),))).splitlines()[-5:] == [
        "add rule inet istio-proxy-nat prerouting counter return",
        "insert rule inet istio-proxy-nat prerouting index 0 counter jump istio-inbound",
        "add rule inet istio-proxy-nat istio-inbound counter return",
        "add rule inet istio-proxy-nat prerouting counter accept",
        "insert rule inet istio-proxy-nat prerouting index 1 counter drop",
    ]


def test_tables_without_rules_are_left_out_and_an_empty_plan_is_empty() -> None:
    assert render_nft(Plan(())) == ""
    raw_only = Plan((RuleSet(V4, (Rule(RAW, "OUTPUT", (), Jump("ISTIO_OUTPUT_DNS")),)),))
    assert render_nft(raw_only).splitlines() == [
        "add table inet istio-proxy-raw",
        "flush table inet istio-proxy-raw",
        "add chain inet istio-proxy-raw output { type filter hook output priority -300 ; }",
        "add rule inet istio-proxy-raw output counter jump istio-output-dns",
    ]


def test_a_table_istio_has_no_nft_form_for_is_refused() -> None:
    plan = Plan((RuleSet(V4, (Rule(Table.FILTER, "INPUT", (), Verdict.ACCEPT),)),))
    with pytest.raises(ValueError, match="filter"):
        render_nft(plan)


def test_tproxy_family_follows_the_address_and_a_partial_mask_is_refused() -> None:
    v6 = Rule(MANGLE, "ISTIO_TPROXY", (Destination(IPv6Interface("::1/128"), negated=True),), Tproxy(15006, 7))
    assert rule_expression(v6) == "ip6 daddr != ::1/128 tproxy ip6 to :15006 meta mark set 7 counter accept"
    bare = Rule(MANGLE, "ISTIO_TPROXY", (), Tproxy(15006, 7))
    assert rule_expression(bare, V6) == "tproxy ip6 to :15006 meta mark set 7 counter accept"
    v4 = Rule(MANGLE, "ISTIO_TPROXY", (Destination(IPv4Interface("127.0.0.1/32"), negated=True),), Tproxy(1, 7, 0xFF))
    with pytest.raises(ValueError, match="mask"):
        rule_expression(v4)
