"""The plan as shell command lines: iptables / ip6tables per table (chains first), then ``ip`` for lo and routes."""

from __future__ import annotations

from ipaddress import IPv6Interface

from istio_iptables.capture.config import ALL, Config, DryRunFormat, Mode
from istio_iptables.capture.model import Family, Jump, Plan, PolicyRoute, Rule, RuleSet, Table, Verdict
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.cli.dryrun import dry_run_output
from istio_iptables.render.commands import render_commands
from istio_iptables.render.iptables import rule_text
from istio_iptables.render.restore import render_restore


def text(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def test_default_injection_ipv4() -> None:
    config = Config(proxy_uids=(1337,), service_cidrs=ALL, inbound_ports=ALL, local_exclude_ports=(15090,), ipv6=False)
    assert render_commands(build_plan(config, HostFacts())) == text(
        "iptables -t nat -N ISTIO_INBOUND",
        "iptables -t nat -N ISTIO_REDIRECT",
        "iptables -t nat -N ISTIO_IN_REDIRECT",
        "iptables -t nat -N ISTIO_OUTPUT",
        "iptables -t nat -A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "iptables -t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "iptables -t nat -A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "iptables -t nat -A PREROUTING -p tcp -j ISTIO_INBOUND",
        "iptables -t nat -A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "iptables -t nat -A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "iptables -t nat -A OUTPUT -j ISTIO_OUTPUT",
        "iptables -t nat -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        "iptables -t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 "
        "-j ISTIO_IN_REDIRECT",
        "iptables -t nat -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
        "iptables -t nat -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "iptables -t nat -A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 "
        "-j ISTIO_IN_REDIRECT",
        "iptables -t nat -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
        "iptables -t nat -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "iptables -t nat -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "iptables -t nat -A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    )


def test_tproxy_dual_stack_with_routes_and_loopback_address() -> None:
    config = Config(
        proxy_uids=(1337,),
        mode=Mode.TPROXY,
        inbound_ports=(80,),
        tproxy_mark=1337,
        tproxy_route_table=133,
        ipv6=True,
    )
    out = render_commands(build_plan(config, HostFacts())).splitlines()
    v4_mangle = [line for line in out if line.startswith("iptables -t mangle")]
    assert v4_mangle == [
        "iptables -t mangle -N ISTIO_DIVERT",
        "iptables -t mangle -N ISTIO_TPROXY",
        "iptables -t mangle -N ISTIO_INBOUND",
        "iptables -t mangle -A ISTIO_DIVERT -j MARK --set-mark 1337",
        "iptables -t mangle -A ISTIO_DIVERT -j ACCEPT",
        "iptables -t mangle -A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff "
        "--on-port 15006",
        "iptables -t mangle -A PREROUTING -p tcp -j ISTIO_INBOUND",
        "iptables -t mangle -A ISTIO_INBOUND -p tcp --dport 80 -m conntrack --ctstate RELATED,ESTABLISHED "
        "-j ISTIO_DIVERT",
        "iptables -t mangle -A ISTIO_INBOUND -p tcp --dport 80 -j ISTIO_TPROXY",
        "iptables -t mangle -A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
        "iptables -t mangle -A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN",
        "iptables -t mangle -A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338",
        "iptables -t mangle -A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338",
        "iptables -t mangle -A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark",
        "iptables -t mangle -I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN",
        "iptables -t mangle -I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN",
        "iptables -t mangle -I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
    ]
    # Order of sections: v4 mangle, v4 nat, v6 mangle, v6 nat, then lo address, then routes per family.
    sections = []
    for line in out:
        words = line.split()
        key = " ".join(words[:3]) if words[0] != "ip" else "ip"
        if not sections or sections[-1] != key:
            sections.append(key)
    assert sections == [
        "iptables -t mangle",
        "iptables -t nat",
        "ip6tables -t mangle",
        "ip6tables -t nat",
        "ip",
    ]
    assert out[-5:] == [
        "ip -6 addr add ::6/128 dev lo",
        "ip rule add fwmark 1337 lookup 133",
        "ip route add local default dev lo table 133",
        "ip -6 rule add fwmark 1337 lookup 133",
        "ip -6 route add local default dev lo table 133",
    ]
    assert "ip6tables -t mangle -I ISTIO_INBOUND 2 -p tcp -s ::6/128 -i lo -j RETURN" in out


def test_each_table_of_each_family_matches_the_restore_payload() -> None:
    config = Config(
        proxy_uids=(3, 4),
        proxy_gids=(1,),
        mode=Mode.TPROXY,
        inbound_ports=ALL,
        drop_invalid=True,
        redirect_dns=True,
        capture_all_dns=True,
        service_cidrs=ALL,
        ipv6=True,
    )
    plan = build_plan(config, HostFacts())
    commands = render_commands(plan).splitlines()
    for ruleset in plan.rulesets:
        binary = "iptables" if ruleset.family is Family.V4 else "ip6tables"
        table = ""
        expected = []
        for line in render_restore(ruleset).splitlines():
            if line.startswith("* "):
                table = line[2:]
            elif line != "COMMIT":
                expected.append(f"{binary} -t {table} {line}")
        assert [line for line in commands if line.startswith(binary + " ")] == expected


def test_hand_made_plan_custom_route_and_mark() -> None:
    plan = Plan(
        rulesets=(
            RuleSet(
                Family.V4,
                (
                    Rule(Table.RAW, "OUTPUT", (), Jump("X")),
                    Rule(Table.NAT, "X", (), Verdict.RETURN, position=2),
                ),
            ),
        ),
        routes=(PolicyRoute(Family.V4, 7, 200),),
        loopback_addresses=(IPv6Interface("::6/128"),),
    )
    assert render_commands(plan) == text(
        "iptables -t nat -N X",
        "iptables -t nat -I X 2 -j RETURN",
        "iptables -t raw -N X",
        "iptables -t raw -A OUTPUT -j X",
        "ip -6 addr add ::6/128 dev lo",
        "ip rule add fwmark 7 lookup 200",
        "ip route add local default dev lo table 200",
    )


def test_no_routes_and_no_lo_address_for_ipv4_redirect() -> None:
    out = render_commands(build_plan(Config(proxy_uids=(1337,), ipv6=False), HostFacts()))
    assert not [line for line in out.splitlines() if not line.startswith("iptables -t nat ")]
    assert out.endswith("iptables -t nat -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n")


def test_dry_run_commands_format_is_render_commands() -> None:
    plan = build_plan(Config(proxy_uids=(1337,), ipv6=True, mode=Mode.TPROXY, inbound_ports=ALL), HostFacts())
    assert dry_run_output(plan, DryRunFormat.COMMANDS) == render_commands(plan)


def test_rule_text_forms() -> None:
    assert rule_text(Rule(Table.NAT, "C", (), Verdict.ACCEPT)) == "-A C -j ACCEPT"
    assert rule_text(Rule(Table.NAT, "C", (), Jump("D"), position=3)) == "-I C 3 -j D"
