"""Native nftables state: ``nft -j list ruleset`` parsed into the model, compared with the plan, and the
transactions that lead from it to a plan. Pure: the JSON is a listing the kernel gave for the plan below
(``tests/fixtures/nft-everything.json``, plus a foreign table and an iptables-nft chain)."""

from __future__ import annotations

import json
from ipaddress import ip_address, ip_interface
from pathlib import Path
from typing import Any

import pytest

from istio_iptables.apply import group_id, saves_mark, split_save_mark, unmark
from istio_iptables.backends.restore import LEGACY, Iptables
from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import (
    ISTIO_OUTPUT,
    AddressSet,
    ConntrackState,
    CtState,
    Destination,
    DestinationPort,
    DestinationPorts,
    Family,
    InSet,
    Jump,
    Plan,
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
    Table,
    Tproxy,
    UidOwner,
    Verdict,
)
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.explain.trace import Flow, trace
from istio_iptables.records import replace
from istio_iptables.render.nft import render_nft
from istio_iptables.render.restore import render_restore
from istio_iptables.state import SavedRule, TableState, compare, drift, parse_tables
from istio_iptables.state.changes import render_transition as render_restore_transition
from istio_iptables.state.nft import (
    NftRule,
    NftState,
    parse_rule,
    parse_ruleset,
    parse_set,
    planned_layout,
    render_appends,
    render_deletes,
    render_transition,
    restore_document,
    set_text,
    stale_tables,
)

FIXTURE = Path(__file__).parent / "fixtures" / "nft-everything.json"
V4, V6 = Family.V4, Family.V6


def everything() -> Plan:
    """The flags of the fixture: -m TPROXY -i '*' -x 198.19.0.0/24 -b '*' -d 15090 --redirect-dns
    --dns-servers 198.18.0.1,2001:db8::1 --drop-invalid -c eth9 -k veth7 -o 5432 -q 25 --ipv6, uid 1337."""
    config = Config(
        proxy_uids=(1337,),
        mode=Mode.TPROXY,
        service_cidrs=ALL,
        service_exclude_cidrs=(ip_interface("198.19.0.0/24"),),
        inbound_ports=ALL,
        local_exclude_ports=(15090,),
        redirect_dns=True,
        dns_servers=(ip_address("198.18.0.1"), ip_address("2001:db8::1")),
        drop_invalid=True,
        exclude_interfaces=("eth9",),
        kube_virt_interfaces=("veth7",),
        local_outbound_ports_exclude=(5432,),
        outbound_ports=(25,),
        ipv6=True,
    )
    return build_plan(config, HostFacts())


@pytest.fixture(scope="module")
def live() -> NftState:
    return parse_ruleset(FIXTURE.read_text())


def expr(*items: dict[str, Any]) -> list[dict[str, Any]]:
    return [*items]


def match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


COUNTER = {"counter": {"packets": 0, "bytes": 0}}


# ---- the whole listing ---------------------------------------------------------------------------------


def test_the_kernels_listing_of_a_plan_is_that_plan(live: NftState) -> None:
    plan = everything()
    assert live.version == "1.0.6"
    assert set(live.tables) == {Table.NAT, Table.MANGLE, Table.RAW}
    assert live.unparsed == []
    expected, actual = planned_layout(plan, group_id), live.layout(group_id)
    assert drift(expected, actual) == []
    assert expected == actual


def test_other_tables_are_only_glanced_at(live: NftState) -> None:
    # An iptables-nft chain ISTIO_OUTPUT in "ip nat": where an iptables copy of ours may be.
    assert live.iptables_nft == frozenset({V4})
    hooked = {(chain.family, chain.table, chain.chain, chain.hook, chain.priority) for chain in live.base_chains}
    assert ("inet", "firewall", "input", "prerouting", -200) in hooked
    assert ("ip", "nat", "OUTPUT", "output", -100) in hooked
    for item in live.objects:
        ((kind, body),) = item.items()
        assert (body["name"] if kind == "table" else body["table"]).startswith("istio-proxy-")


def test_one_familys_view_has_model_chains_and_only_its_rules(live: NftState) -> None:
    v6 = live.family_tables(V6)
    mangle = v6[Table.MANGLE]
    assert mangle.chains["PREROUTING"] == "ACCEPT" and mangle.chains["ISTIO_TPROXY"] is None
    tproxy = [entry.rule for entry in mangle.entries if entry.chain == "ISTIO_TPROXY"]
    assert [rule.target for rule in tproxy if rule] == [Tproxy(15006, 1337)]
    assert tproxy[0] is not None and Destination(ip_interface("::1/128"), True) in tproxy[0].clauses
    jumps = [entry.rule.target for entry in v6[Table.NAT].entries if entry.rule and entry.chain == "OUTPUT"]
    assert Jump(ISTIO_OUTPUT) in jumps
    v4_nat = live.family_tables(V4)[Table.NAT]
    assert all("ip6 " not in entry.text for entry in v4_nat.entries)
    assert any("ip6 " in entry.text for entry in v6[Table.NAT].entries)


@pytest.mark.parametrize(
    "flow",
    [
        Flow.outbound("198.18.0.1", 8080),
        Flow.outbound("2001:db8::1", 8080),
        Flow.outbound("198.18.0.1", 53, protocol=Proto.UDP),
        Flow.outbound("198.19.0.7", 8080),
        Flow.outbound("198.18.0.1", 8080, uid=1337),
        Flow.outbound("198.18.0.2", 8080, uid=1337),
        Flow.inbound(8080),
        Flow.inbound(8080, family=V6),
        Flow.inbound(15090),
        Flow.inbound(8080, in_interface="eth9"),
    ],
    ids=lambda flow: flow.describe(),
)
def test_the_tracer_walks_live_nft_rules_as_it_walks_the_plan(live: NftState, flow: Flow) -> None:
    planned = trace(everything(), flow).verdict
    walked = trace(live.family_tables(flow.family), flow).verdict
    assert (walked.captured_by, walked.capture, walked.mark, walked.zone, walked.dropped, walked.certain) == (
        planned.captured_by,
        planned.capture,
        planned.mark,
        planned.zone,
        planned.dropped,
        planned.certain,
    )


# ---- one rule ------------------------------------------------------------------------------------------


def test_a_port_match_carries_its_protocol_once() -> None:
    # nft lists "meta l4proto tcp tcp dport != 15008" as "tcp dport != 15008"; both read as one Protocol.
    for expressions in (
        expr(match(payload("tcp", "dport"), 15008, "!="), COUNTER, {"return": None}),
        expr(match(meta("l4proto"), "tcp"), match(payload("tcp", "dport"), 15008, "!="), COUNTER, {"return": None}),
    ):
        rule = parse_rule(Table.NAT, "istio-inbound", expressions).rule
        assert rule is not None
        assert rule.clauses == (Protocol(Proto.TCP), DestinationPort(15008, True))
        assert rule.chain == "ISTIO_INBOUND" and rule.target is Verdict.RETURN


def test_sets_prefixes_states_and_statements() -> None:
    rule = parse_rule(
        Table.NAT,
        "istio-output",
        expr(
            match(payload("ip", "daddr"), {"prefix": {"addr": "10.0.0.0", "len": 8}}),
            match(payload("tcp", "dport"), {"set": [15008, 53]}, "!="),
            match(meta("skuid"), 1337),
            COUNTER,
            {"jump": {"target": "istio-in-redirect"}},
        ),
    )
    assert rule.families == frozenset({V4})
    assert rule.rule is not None
    assert set(rule.rule.clauses) == {
        Destination(ip_interface("10.0.0.0/8")),
        Protocol(Proto.TCP),
        DestinationPorts((53, 15008), True),
        UidOwner(1337),
    }
    assert (
        rule.text
        == "meta l4proto tcp ip daddr 10.0.0.0/8 tcp dport != { 53, 15008 } skuid 1337 counter jump istio-in-redirect"
    )
    states = parse_rule(
        Table.MANGLE,
        "istio-inbound",
        expr(match({"ct": {"key": "state"}}, ["established", "related"], "in"), {"accept": None}),
    )
    assert states.rule is not None and states.rule.clauses == (ConntrackState((CtState.ESTABLISHED, CtState.RELATED)),)
    marks = {
        "save": ({"ct": {"key": "mark"}}, meta("mark"), SaveMark()),
        "restore": (meta("mark"), {"ct": {"key": "mark"}}, RestoreMark()),
        "set": (meta("mark"), 1338, SetMark(1338)),
    }
    for key, value, target in marks.values():
        parsed = parse_rule(Table.MANGLE, "output", expr(COUNTER, {"mangle": {"key": key, "value": value}}))
        assert parsed.rule is not None and parsed.rule.target == target
        assert parsed.families == frozenset({V4, V6})


def test_a_rule_the_model_cannot_express_is_kept_as_text() -> None:
    rule = parse_rule(
        Table.NAT,
        "leftover",
        expr(match(payload("ip6", "saddr"), "2001:db8::9"), {"log": {"prefix": "x"}}, {"accept": None}),
    )
    assert rule.rule is None
    assert rule.families == frozenset({V6})
    assert rule.text == 'ip6 saddr 2001:db8::9 log {"prefix":"x"} accept'
    masked = parse_rule(Table.MANGLE, "prerouting", expr(match({"&": [meta("mark"), 255]}, 1), {"accept": None}))
    assert masked.rule is None and masked.families == frozenset({V4, V6})


# ---- transitions ------------------------------------------------------------------------------------------


def test_the_transaction_deletes_what_exists_then_writes_the_plan(live: NftState) -> None:
    plan = everything()
    script = render_transition(plan, live)
    deletes = [f"delete table inet istio-proxy-{name}\n" for name in ("nat", "mangle", "raw")]
    assert script == "".join(deletes) + render_nft(plan)
    assert render_transition(plan, NftState("1.0.6", {})) == render_nft(plan)
    assert render_transition(None, live) == "".join(deletes)
    assert render_transition(None, NftState("1.0.6", {})) == ""


def test_a_table_the_plan_no_longer_uses_is_stale_and_shows_as_extra(live: NftState) -> None:
    plan = everything()
    redirect_only = Plan(
        tuple(
            replace(ruleset, rules=tuple(r for r in ruleset.rules if r.table is Table.NAT)) for ruleset in plan.rulesets
        )
    )
    assert stale_tables(redirect_only, live) == [Table.MANGLE, Table.RAW]
    difference = compare(planned_layout(redirect_only, group_id), live.layout(group_id))
    assert not difference.missing and not difference.changed
    assert {table for table, _, _ in difference.extra} == {Table.MANGLE, Table.RAW}


def test_drift_shows_a_missing_and_an_extra_rule(live: NftState) -> None:
    plan = everything()
    nat = live.tables[Table.NAT]
    changed = replace(nat, rules=[rule for rule in nat.rules if "5432" not in rule.text] + nat.rules[:1])
    drifted = replace(live, tables={**live.tables, Table.NAT: changed})
    difference = compare(planned_layout(plan, group_id), drifted.layout(group_id))
    missing = [text for _, _, text in difference.missing]
    assert missing == ["tcp dport 5432 counter return", "udp dport 5432 counter return"]
    assert [chain for _, chain, _ in difference.extra] == ["prerouting"]


def test_a_tproxy_switch_holds_the_save_mark_apart(live: NftState) -> None:
    """While two copies coexist neither may save the mark: the new one goes in without its save-mark rule,
    added last on its own; the old one loses its own first (docs/capture.md, "Switching backends")."""
    plan = everything()
    held, marks = split_save_mark(plan)
    assert [(ruleset.family, [rule.chain for rule in ruleset.rules]) for ruleset in marks.rulesets] == [
        (V4, ["PREROUTING"]),
        (V6, ["PREROUTING"]),
    ]
    assert all(saves_mark(rule) for ruleset in marks.rulesets for rule in ruleset.rules)
    assert not any(saves_mark(rule) for ruleset in held.rulesets for rule in ruleset.rules)
    appended = render_appends(plan, held)
    assert (
        appended == "add rule inet istio-proxy-mangle prerouting meta l4proto tcp mark 1337 counter ct mark set mark\n"
    )
    # The held tables with that rule appended are the plan's.
    full, kept = planned_layout(plan, group_id), planned_layout(held, group_id)
    assert full[Table.MANGLE]["prerouting"].pop().endswith("ct mark set mark") and full == kept
    # The old nft copy loses its rule by handle.
    assert render_deletes(live, saves_mark) == "delete rule inet istio-proxy-mangle prerouting handle 19\n"

    # An old iptables copy: a restore deleting the rule, and what the removal of the rest starts from.
    ruleset = plan.ruleset(V4)
    assert ruleset is not None
    tables = parse_tables(render_restore(ruleset))
    first, rest = unmark(Iptables(V4, LEGACY, "", {}), tables)
    assert first is not None and first.tables == {Table.MANGLE}
    assert first.payload == "* mangle\n-D PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark\nCOMMIT\n"
    removal = render_restore_transition(RuleSet(V4, ()), rest)
    assert "--save-mark" not in removal and "-D PREROUTING -p tcp -j ISTIO_INBOUND" in removal
    assert unmark(Iptables(V4, LEGACY, "", {}), rest) == (None, rest)


def test_no_split_without_a_save_mark_or_when_it_is_not_last() -> None:
    plan = everything()
    redirect = Plan(
        tuple(replace(ruleset, rules=tuple(r for r in ruleset.rules if not saves_mark(r))) for ruleset in plan.rulesets)
    )
    assert split_save_mark(redirect) == (redirect, Plan(()))
    after = Rule(Table.MANGLE, "PREROUTING", (), Verdict.RETURN)
    later = Plan(tuple(replace(ruleset, rules=(*ruleset.rules, after)) for ruleset in plan.rulesets))
    assert split_save_mark(later) == (later, Plan(()))


def test_the_rollback_document_recreates_the_tables_as_listed(live: NftState) -> None:
    document = json.loads(restore_document(live, [Table.NAT]))["nftables"]
    assert document[0] == {"delete": {"table": {"family": "inet", "name": "istio-proxy-nat"}}}
    adds = document[1:]
    assert len(adds) == len(live.objects)
    assert all("handle" not in next(iter(item["add"].values())) for item in adds)
    tproxy = [item for item in adds if '{"tproxy":' in json.dumps(item)]
    assert tproxy and all(item["add"]["rule"]["table"] == "istio-proxy-mangle" for item in tproxy)
    assert restore_document(NftState("1.0.6", {}), []) == '{"nftables": []}'
    assert not any(isinstance(rule.rule, type(None)) for rule in live.tables[Table.MANGLE].rules)
    assert Source(ip_interface("127.0.0.6/32")) in {
        clause for rule in live.tables[Table.MANGLE].rules if rule.rule for clause in rule.rule.clauses
    }


def test_named_sets_and_their_lookups() -> None:
    cidrs = {
        "name": "istio-exclude-cidr4",
        "type": "ipv4_addr",
        "flags": ["interval"],
        "elem": [{"prefix": {"addr": "192.168.0.0", "len": 24}}, "10.0.0.1", {"range": ["10.0.1.0", "10.0.1.255"]}],
    }
    parsed = parse_set(cidrs)
    assert parsed == AddressSet(
        "ISTIO_EXCLUDE_CIDR4",
        V4,
        (ip_interface("192.168.0.0/24"), ip_interface("10.0.0.1/32"), ip_interface("10.0.1.0/24")),
    )
    assert set_text(parsed) == "type ipv4_addr flags interval elements { 10.0.0.1/32, 10.0.1.0/24, 192.168.0.0/24 }"
    # As planned, before nft merged what touches: the same text.
    planned = AddressSet(
        "ISTIO_EXCLUDE_CIDR4",
        V4,
        (
            ip_interface("192.168.0.0/25"),
            ip_interface("192.168.0.129/25"),
            ip_interface("10.0.0.1/32"),
            ip_interface("10.0.1.0/24"),
        ),
    )
    assert set_text(planned) == set_text(parsed)
    ports = parse_set({"name": "istio-inbound-ports", "type": "inet_service", "elem": [81, 80]})
    assert ports == PortSet("ISTIO_INBOUND_PORTS", (81, 80))
    assert set_text(ports) == "type inet_service elements { 80, 81 }"
    assert parse_set({"name": "x", "type": "ipv4_addr", "flags": ["interval", "timeout"], "elem": []}) is None

    lookup = parse_rule(
        Table.NAT,
        "istio-inbound",
        expr(
            match(payload("tcp", "dport"), "@istio-inbound-ports"), COUNTER, {"jump": {"target": "istio-in-redirect"}}
        ),
    )
    assert lookup.rule is not None
    assert set(lookup.rule.clauses) == {Protocol(Proto.TCP), InSet("ISTIO_INBOUND_PORTS")}
    assert lookup.text == "meta l4proto tcp tcp dport @istio-inbound-ports counter jump istio-in-redirect"
    excluded = parse_rule(
        Table.NAT, "istio-output", expr(match(payload("ip", "daddr"), "@istio-exclude-cidr4"), {"return": None})
    )
    assert excluded.rule is not None and excluded.rule.clauses == (InSet("ISTIO_EXCLUDE_CIDR4"),)
    assert excluded.families == frozenset({V4})
    state = parse_ruleset(
        json.dumps(
            {
                "nftables": [
                    {"table": {"family": "inet", "name": "istio-proxy-nat"}},
                    {"set": {"family": "inet", "table": "istio-proxy-nat", **cidrs}},
                ]
            }
        )
    )
    assert state.sets == (parsed,)
    assert state.layout(group_id) == {Table.NAT: {"@istio-exclude-cidr4": [set_text(parsed)]}}
    flow = Flow.outbound("10.0.1.7", 8080)
    assert trace(excluded_tables(excluded), flow, sets=state.sets).verdict.captured_by is None


def excluded_tables(entry: NftRule) -> dict[Table, TableState]:
    """nat OUTPUT -> ISTIO_OUTPUT holding one rule, then a redirect to 15001."""
    state = TableState(chains={"OUTPUT": "ACCEPT", "ISTIO_OUTPUT": None, "ISTIO_REDIRECT": None})
    state.entries += [
        SavedRule("OUTPUT", "counter jump istio-output", Rule(Table.NAT, "OUTPUT", (), Jump(ISTIO_OUTPUT))),
        SavedRule("ISTIO_OUTPUT", entry.text, entry.rule),
        SavedRule("ISTIO_OUTPUT", "jump istio-redirect", Rule(Table.NAT, "ISTIO_OUTPUT", (), Jump("ISTIO_REDIRECT"))),
        SavedRule(
            "ISTIO_REDIRECT",
            "redirect to :15001",
            Rule(Table.NAT, "ISTIO_REDIRECT", (Protocol(Proto.TCP),), Redirect(15001)),
        ),
    ]
    return {Table.NAT: state}
