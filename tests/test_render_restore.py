"""The iptables-restore payload (reference 3.5) and the dry-run wrappers around it, as exact text."""

from __future__ import annotations

from ipaddress import IPv4Interface, ip_address

from istio_iptables.capture.config import ALL, Config, DryRunFormat, Mode
from istio_iptables.capture.model import ConntrackState, CtState, Family, Jump, Plan, Rule, RuleSet, Table, Verdict
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.cli.dryrun import dry_run_output, istio_command_log
from istio_iptables.records import replace
from istio_iptables.render.restore import render_restore

V4, V6 = Family.V4, Family.V6

DEFAULT_INJECTION = Config(
    proxy_port=15001,
    inbound_capture_port=15006,
    proxy_uids=(1337,),
    mode=Mode.REDIRECT,
    service_cidrs=ALL,
    service_exclude_cidrs=(),
    inbound_ports=ALL,
    local_exclude_ports=(15090, 15021, 15020),
    ipv6=False,
)


def payload(config: Config, family: Family = V4) -> str:
    ruleset = build_plan(config, HostFacts()).ruleset(family)
    assert ruleset is not None
    return render_restore(ruleset)


def text(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


NAT_DEFAULT_INJECTION_V4 = (
    "* nat",
    "-N ISTIO_INBOUND",
    "-N ISTIO_REDIRECT",
    "-N ISTIO_IN_REDIRECT",
    "-N ISTIO_OUTPUT",
    "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
    "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
    "-A PREROUTING -p tcp -j ISTIO_INBOUND",
    "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
    "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
    "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
    "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
    "-A OUTPUT -j ISTIO_OUTPUT",
    "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
    "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
    "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
    "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
    "COMMIT",
)


def test_default_injection_is_the_worked_example_verbatim() -> None:
    assert payload(DEFAULT_INJECTION) == text(*NAT_DEFAULT_INJECTION_V4)


def test_default_injection_ipv6_payload() -> None:
    config = replace(DEFAULT_INJECTION, ipv6=True)
    v6 = payload(config, V6)
    expected = text(*NAT_DEFAULT_INJECTION_V4).replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128")
    assert v6 == expected
    assert payload(config, V4) == text(*NAT_DEFAULT_INJECTION_V4)


def test_default_injection_tproxy() -> None:
    config = replace(DEFAULT_INJECTION, mode=Mode.TPROXY)
    assert payload(config) == text(
        "* mangle",
        "-N ISTIO_DIVERT",
        "-N ISTIO_TPROXY",
        "-N ISTIO_INBOUND",
        "-A ISTIO_DIVERT -j MARK --set-mark 1337",
        "-A ISTIO_DIVERT -j ACCEPT",
        "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY",
        "-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
        "-A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN",
        "-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338",
        "-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338",
        "-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark",
        "-I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN",
        "-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN",
        "-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
        "COMMIT",
        # The nat section keeps the shared chains and has no PREROUTING jump.
        *[
            line
            for line in NAT_DEFAULT_INJECTION_V4
            if "PREROUTING" not in line and "15090" not in line and "15021" not in line and "15020" not in line
            if line != "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT"
        ],
    )


def test_default_injection_with_dns() -> None:
    config = replace(DEFAULT_INJECTION, redirect_dns=True, dns_servers=(ip_address("10.96.0.10"),))
    assert payload(config) == text(
        "* nat",
        "-N ISTIO_INBOUND",
        "-N ISTIO_REDIRECT",
        "-N ISTIO_IN_REDIRECT",
        "-N ISTIO_OUTPUT",
        "-N ISTIO_OUTPUT_DNS",
        "-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
        "-A PREROUTING -p tcp -j ISTIO_INBOUND",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT",
        "-A OUTPUT -j ISTIO_OUTPUT",
        "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 "
        "-j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -o lo -p tcp ! --dport 53 -m owner ! --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS",
        "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053",
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
        "COMMIT",
        "* raw",
        "-N ISTIO_OUTPUT_DNS",
        "-N ISTIO_INBOUND",
        "-A OUTPUT -j ISTIO_OUTPUT_DNS",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
        "-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1",
        "-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
        "-A PREROUTING -j ISTIO_INBOUND",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j CT --zone 2",
        "-A ISTIO_INBOUND -p udp --sport 53 -s 10.96.0.10/32 -j CT --zone 1",
        "COMMIT",
    )


def test_drop_invalid_declares_istio_drop_once_before_its_rules() -> None:
    config = Config(proxy_uids=(1337,), drop_invalid=True, ipv6=False)
    assert payload(config).startswith(
        text(
            "* mangle",
            "-N ISTIO_DROP",
            "-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP",
            "-A ISTIO_DROP -j DROP",
            "COMMIT",
            "* nat",
        )
    )


def test_kube_virt_inserts_keep_their_place_in_the_payload() -> None:
    config = Config(
        proxy_uids=(1337,),
        kube_virt_interfaces=("eth1", "eth2"),
        service_cidrs=(IPv4Interface("10.0.0.0/8"),),
        ipv6=False,
    )
    lines = payload(config).splitlines()
    assert lines[5:7] == ["-I PREROUTING 1 -i eth1 -j RETURN", "-I PREROUTING 1 -i eth2 -j RETURN"]
    assert lines[-4:] == [
        "-I PREROUTING 1 -i eth1 -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        "-I PREROUTING 1 -i eth2 -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
        "COMMIT",
    ]


# ---- serialisation rules on hand-made rule sets ----------------------------------------------------


def rule(table: Table, chain: str, target: Verdict | Jump, position: int | None = None) -> Rule:
    return Rule(table, chain, (), target, position)


def test_tables_sorted_by_name_empty_ones_skipped() -> None:
    ruleset = RuleSet(
        V4,
        (
            rule(Table.RAW, "OUTPUT", Verdict.ACCEPT),
            rule(Table.NAT, "OUTPUT", Verdict.RETURN),
            rule(Table.MANGLE, "OUTPUT", Verdict.RETURN),
            rule(Table.FILTER, "INPUT", Verdict.ACCEPT),
        ),
    )
    assert render_restore(ruleset) == text(
        "* filter",
        "-A INPUT -j ACCEPT",
        "COMMIT",
        "* mangle",
        "-A OUTPUT -j RETURN",
        "COMMIT",
        "* nat",
        "-A OUTPUT -j RETURN",
        "COMMIT",
        "* raw",
        "-A OUTPUT -j ACCEPT",
        "COMMIT",
    )


def test_chains_declared_in_order_of_first_use_then_jump_targets() -> None:
    ruleset = RuleSet(
        V4,
        (
            rule(Table.NAT, "OUTPUT", Jump("LATE")),
            rule(Table.NAT, "B_CHAIN", Jump("ONLY_TARGET")),
            rule(Table.NAT, "A_CHAIN", Jump("B_CHAIN")),
            rule(Table.NAT, "B_CHAIN", Verdict.RETURN),
            rule(Table.NAT, "LATE", Verdict.RETURN, position=1),
            rule(Table.MANGLE, "PREROUTING", Jump("M_TARGET")),
        ),
    )
    assert render_restore(ruleset) == text(
        "* mangle",
        "-N M_TARGET",
        "-A PREROUTING -j M_TARGET",
        "COMMIT",
        "* nat",
        "-N B_CHAIN",
        "-N A_CHAIN",
        "-N LATE",
        "-N ONLY_TARGET",
        "-A OUTPUT -j LATE",
        "-A B_CHAIN -j ONLY_TARGET",
        "-A A_CHAIN -j B_CHAIN",
        "-A B_CHAIN -j RETURN",
        "-I LATE 1 -j RETURN",
        "COMMIT",
    )


def test_builtin_chains_are_never_declared() -> None:
    ruleset = RuleSet(
        V4,
        tuple(
            rule(Table.MANGLE, chain, Verdict.ACCEPT)
            for chain in ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
        ),
    )
    assert "-N" not in render_restore(ruleset)


def test_same_chain_name_is_declared_per_table() -> None:
    ruleset = RuleSet(
        V4,
        (
            rule(Table.RAW, "ISTIO_INBOUND", Verdict.RETURN),
            rule(Table.NAT, "ISTIO_INBOUND", Verdict.RETURN),
        ),
    )
    assert render_restore(ruleset) == text(
        "* nat",
        "-N ISTIO_INBOUND",
        "-A ISTIO_INBOUND -j RETURN",
        "COMMIT",
        "* raw",
        "-N ISTIO_INBOUND",
        "-A ISTIO_INBOUND -j RETURN",
        "COMMIT",
    )


def test_payload_ends_with_commit_and_newline_and_has_no_blank_lines() -> None:
    rendered = payload(DEFAULT_INJECTION)
    assert rendered.endswith("COMMIT\n")
    assert "\n\n" not in rendered
    assert not rendered.startswith("\n")
    assert all(line == line.strip() for line in rendered.split("\n"))


def test_empty_ruleset_renders_nothing() -> None:
    assert render_restore(RuleSet(V4, ())) == ""


def test_conntrack_states_joined_by_comma() -> None:
    ruleset = RuleSet(
        V4,
        (
            Rule(
                Table.MANGLE,
                "X",
                (ConntrackState((CtState.NEW, CtState.INVALID), negated=True),),
                Verdict.DROP,
            ),
        ),
    )
    assert render_restore(ruleset) == text(
        "* mangle", "-N X", "-A X -m conntrack ! --ctstate NEW,INVALID -j DROP", "COMMIT"
    )


# ---- dry-run wrappers ------------------------------------------------------------------------------


def dual_stack_plan() -> Plan:
    return build_plan(replace(DEFAULT_INJECTION, ipv6=True), HostFacts())


def test_dry_run_restore_output_prefixes_each_payload_with_its_command() -> None:
    plan = dual_stack_plan()
    v4, v6 = (render_restore(ruleset) for ruleset in plan.rulesets)
    assert dry_run_output(plan, DryRunFormat.RESTORE) == (
        "# iptables-restore --noflush\n" + v4 + "# ip6tables-restore --noflush\n" + v6
    )


def test_dry_run_restore_output_ipv4_only() -> None:
    plan = build_plan(DEFAULT_INJECTION, HostFacts())
    assert dry_run_output(plan, DryRunFormat.RESTORE) == "# iptables-restore --noflush\n" + text(
        *NAT_DEFAULT_INJECTION_V4
    )


def test_istio_command_log_is_istios_golden_format() -> None:
    """Reference 4.1: saves, the v4 payload, the v6 payload (if enabled), then the final saves."""
    plan = build_plan(DEFAULT_INJECTION, HostFacts())
    assert istio_command_log(plan) == text(
        "iptables-save", "ip6tables-save", *NAT_DEFAULT_INJECTION_V4, "iptables-save"
    )
    plan = dual_stack_plan()
    v4, v6 = (render_restore(ruleset) for ruleset in plan.rulesets)
    assert istio_command_log(plan) == "iptables-save\nip6tables-save\n" + v4 + v6 + "iptables-save\nip6tables-save\n"
