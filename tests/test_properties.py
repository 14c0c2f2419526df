"""Properties of the plan and its renderings over random valid configurations and host facts."""

from __future__ import annotations

import json
from collections import Counter
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv6Address,
    IPv6Interface,
    ip_interface,
)

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import (
    BUILTIN_CHAINS,
    COMMENT_PREFIX,
    ISTIO_IN_REDIRECT,
    ISTIO_REDIRECT,
    ISTIO_TPROXY,
    Destination,
    Family,
    Jump,
    Plan,
    Redirect,
    RuleSet,
    Source,
    Table,
    Tproxy,
    Verdict,
    declared_chains,
)
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.records import replace
from istio_iptables.render.commands import render_commands
from istio_iptables.render.json import render_json
from istio_iptables.render.restore import render_restore
from istio_iptables.state import parse_tables

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ports = st.integers(1, 65535)
port_lists = st.lists(ports, max_size=4).map(tuple)
ids = st.integers(0, 0xFFFFFFFE)
id_lists = st.one_of(st.none(), st.lists(ids, min_size=1, max_size=3).map(tuple))
interfaces = st.lists(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), max_size=3).map(tuple)
group_names = st.from_regex(r"[a-z_][a-z0-9_-]{0,8}", fullmatch=True)
groups = st.lists(st.one_of(ids, group_names), max_size=4).map(tuple)

v4_cidrs = st.builds(
    lambda address, prefix: IPv4Interface((address, prefix)), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
v6_cidrs = st.builds(
    lambda address, prefix: IPv6Interface((address, prefix)), st.integers(0, 2**128 - 1), st.integers(0, 128)
)
# Loopback CIDRs too, so the "include CIDR is loopback" branch is exercised.
special_cidrs = st.sampled_from(
    [IPv4Interface("127.1.2.3/32"), IPv4Interface("127.0.0.1/8"), IPv6Interface("::1/128"), IPv4Interface("0.0.0.0/0")]
)
cidrs = st.one_of(v4_cidrs, v6_cidrs, special_cidrs)
cidr_lists = st.lists(cidrs, max_size=4).map(tuple)
loopback_cidrs = st.builds(
    lambda host, prefix: IPv4Interface(((127 << 24) | host, prefix)), st.integers(0, 2**24 - 1), st.integers(8, 32)
)
dns_servers = st.lists(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)), max_size=3).map(tuple)
# Host addresses: at least one usable one, so detection never fails.
host_addresses = st.lists(
    st.sampled_from(
        [
            IPv4Address("127.0.0.1"),
            IPv6Address("::1"),
            IPv6Address("fe80::1"),
            IPv4Address("169.254.0.1"),
            IPv4Address("198.18.0.2"),
            IPv6Address("2001:db8::2"),
        ]
    ),
    max_size=4,
).map(lambda addresses: (*addresses, IPv4Address("198.19.0.9")))


@st.composite
def configs_and_facts(draw: st.DrawFn) -> tuple[Config, HostFacts]:
    redirect_dns = draw(st.booleans())
    config = Config(
        proxy_port=draw(ports),
        inbound_capture_port=draw(ports),
        inbound_tunnel_port=draw(ports),
        proxy_uids=draw(id_lists),
        proxy_gids=draw(id_lists),
        mode=draw(st.sampled_from(Mode)),
        inbound_ports=draw(st.one_of(st.just(ALL), port_lists)),
        local_exclude_ports=draw(port_lists),
        exclude_interfaces=draw(interfaces),
        service_cidrs=draw(st.one_of(st.just(ALL), cidr_lists)),
        service_exclude_cidrs=draw(cidr_lists),
        outbound_ports=draw(port_lists),
        local_outbound_ports_exclude=draw(port_lists),
        kube_virt_interfaces=draw(interfaces),
        tproxy_mark=draw(st.integers(1, 0xFFFFFFFF)),
        tproxy_route_table=draw(st.integers(1, 252)),
        redirect_dns=redirect_dns,
        capture_all_dns=draw(st.booleans()),
        drop_invalid=draw(st.booleans()),
        dual_stack=draw(st.booleans()),
        owner_groups_include=draw(st.one_of(st.just(ALL), groups)),
        owner_groups_exclude=draw(groups),
        ipv4_loopback_cidr=draw(loopback_cidrs),
        ipv6=draw(st.sampled_from([True, False, None])),
        dns_servers=draw(st.one_of(st.none(), dns_servers.filter(bool))),
    )
    facts = HostFacts(
        addresses=draw(host_addresses),
        nameservers=draw(dns_servers),
        envoy_uid=draw(st.one_of(st.none(), ids)),
    )
    return config, facts


def expect_ipv6(config: Config, facts: HostFacts) -> bool:
    if config.ipv6 is not None:
        return config.ipv6
    usable = [a for a in facts.addresses if not (a.is_loopback or a.is_link_local)]
    return any(a.version == 6 for a in usable)


def restore_sections(payload: str) -> dict[str, list[str]]:
    """Lines per table of a restore payload, read independently of ``state.py``."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in payload.splitlines():
        if line.startswith("* "):
            assert line[2:] not in sections, f"table {line} twice"
            current = sections.setdefault(line[2:], [])
        elif line == "COMMIT":
            current = None
        else:
            assert current is not None, f"line outside a table: {line}"
            current.append(line)
    assert current is None, "payload does not end with COMMIT"
    return sections


@SETTINGS
@given(configs_and_facts())
def test_build_plan_is_deterministic(case: tuple[Config, HostFacts]) -> None:
    config, facts = case
    first, second = build_plan(config, facts), build_plan(config, facts)
    assert first == second
    assert render_commands(first) == render_commands(second)
    assert render_json(first) == render_json(second)
    for a, b in zip(first.rulesets, second.rulesets, strict=True):
        assert render_restore(a) == render_restore(b)


@SETTINGS
@given(configs_and_facts())
def test_families(case: tuple[Config, HostFacts]) -> None:
    config, facts = case
    plan = build_plan(config, facts)
    ipv6 = expect_ipv6(config, facts)
    assert plan.families == ((Family.V4, Family.V6) if ipv6 else (Family.V4,))
    assert all(ruleset.rules for ruleset in plan.rulesets)
    assert plan.loopback_addresses == ((IPv6Interface("::6/128"),) if ipv6 else ())
    assert {route.family for route in plan.routes} <= set(plan.families)
    assert len(plan.routes) == (len(plan.families) if config.mode is Mode.TPROXY and config.inbound_ports else 0)


@SETTINGS
@given(configs_and_facts())
def test_every_chain_used_is_declared_exactly_once(case: tuple[Config, HostFacts]) -> None:
    plan = build_plan(*case)
    for ruleset in plan.rulesets:
        sections = restore_sections(render_restore(ruleset))
        for table in ruleset.tables():
            lines = sections[table.value]
            declared = Counter(line.split()[1] for line in lines if line.startswith("-N "))
            assert all(count == 1 for count in declared.values()), declared
            needed = set()
            for rule in ruleset.in_table(table):
                needed.add(rule.chain)
                if isinstance(rule.target, Jump):
                    needed.add(rule.target.chain)
            assert set(declared) == needed - BUILTIN_CHAINS
            # Declarations precede every rule of the table.
            first_rule = next(i for i, line in enumerate(lines) if not line.startswith("-N "))
            assert all(not line.startswith("-N ") for line in lines[first_rule:])
            # And every rule line names a declared or built-in chain.
            for line in lines[first_rule:]:
                command, chain = line.split()[:2]
                assert command in ("-A", "-I")
                assert chain in declared or chain in BUILTIN_CHAINS


@SETTINGS
@given(configs_and_facts())
def test_insert_positions_are_valid_when_applied_in_order(case: tuple[Config, HostFacts]) -> None:
    """iptables-restore rejects ``-I chain N`` when the chain has fewer than N-1 rules."""
    plan = build_plan(*case)
    for ruleset in plan.rulesets:
        lengths: Counter[tuple[Table, str]] = Counter()
        for rule in ruleset.rules:
            key = (rule.table, rule.chain)
            if rule.position is not None:
                assert 1 <= rule.position <= lengths[key] + 1, rule
            lengths[key] += 1


def check_family_of_address(family: Family, token: str) -> None:
    try:
        network = ip_interface(token)
    except ValueError:
        return
    assert Family.of(network) is family, f"{token} in the {family.label} rules"


@SETTINGS
@given(configs_and_facts())
def test_no_address_of_the_other_family(case: tuple[Config, HostFacts]) -> None:
    plan = build_plan(*case)
    for ruleset in plan.rulesets:
        for rule in ruleset.rules:
            for clause in rule.clauses:
                if isinstance(clause, Source | Destination):
                    assert Family.of(clause.network) is ruleset.family, rule
        for token in render_restore(ruleset).split():
            if "/" in token:
                check_family_of_address(ruleset.family, token)


@SETTINGS
@given(configs_and_facts())
def test_parse_of_render_is_the_plan(case: tuple[Config, HostFacts]) -> None:
    plan = build_plan(*case)
    for ruleset in plan.rulesets:
        check_round_trip(ruleset)


def check_round_trip(ruleset: RuleSet) -> None:
    parsed = parse_tables(render_restore(ruleset))
    assert list(parsed) == ruleset.tables()
    chains = declared_chains(ruleset.rules)
    for table in ruleset.tables():
        assert parsed[table].rules == ruleset.in_table(table)
        assert list(parsed[table].chains) == chains.get(table, [])
        assert parsed[table].unparsed == []


@SETTINGS
@given(configs_and_facts())
def test_json_is_valid_and_matches_the_restore_lines(case: tuple[Config, HostFacts]) -> None:
    plan: Plan = build_plan(*case)
    document = json.loads(render_json(plan))
    assert [family["family"] for family in document["families"]] == [f.label for f in plan.families]
    for ruleset, family in zip(plan.rulesets, document["families"], strict=True):
        sections = restore_sections(render_restore(ruleset))
        for table in family["tables"]:
            expected = sections[table["table"]]
            assert [f"-N {chain}" for chain in table["chains"]] + [rule["text"] for rule in table["rules"]] == expected


CAPTURING_CHAINS = {ISTIO_REDIRECT, ISTIO_IN_REDIRECT, ISTIO_TPROXY}


@SETTINGS
@given(configs_and_facts())
def test_rule_comments_say_what_each_rule_does(case: tuple[Config, HostFacts]) -> None:
    """A rule that lets traffic go uncaptured never calls itself capture, and one that captures never says
    it does not (the -d RETURN was once "inbound capture")."""
    config, facts = case
    plan = build_plan(replace(config, rule_comments=True), facts)
    for ruleset in plan.rulesets:
        for rule in ruleset.rules:
            assert rule.comment is not None and rule.comment.startswith(COMMENT_PREFIX), rule
            # iptables-legacy-save escapes quotes in comments (\'), which then read back as other text.
            assert "'" not in rule.comment and '"' not in rule.comment, rule
            says_uncaptured = any(words in rule.comment for words in ("not captured", "never captured", "exclu"))
            if rule.target is Verdict.RETURN:
                assert "capture" not in rule.comment or says_uncaptured, rule
            captures = isinstance(rule.target, Redirect | Tproxy) or (
                isinstance(rule.target, Jump) and rule.target.chain in CAPTURING_CHAINS
            )
            if captures:
                assert not says_uncaptured, rule
