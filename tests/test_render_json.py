"""The plan as JSON: document shape, every clause and target kind, and agreement with the restore payload."""

from __future__ import annotations

import json
from ipaddress import IPv4Interface, IPv6Interface, ip_address
from typing import Any

from istio_iptables.capture.config import ALL, Config, DryRunFormat, Mode
from istio_iptables.capture.model import (
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
    Jump,
    Mark,
    OutInterface,
    Plan,
    PolicyRoute,
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
    Tproxy,
    UidOwner,
    Verdict,
    declared_chains,
)
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.cli.dryrun import dry_run_output
from istio_iptables.render.json import SCHEMA_VERSION, render_json
from istio_iptables.render.restore import render_restore


def document(plan: Plan) -> dict[str, Any]:
    rendered = render_json(plan)
    assert rendered.endswith("}\n")
    loaded = json.loads(rendered)
    assert isinstance(loaded, dict)
    return loaded


def test_every_clause_and_target_kind() -> None:
    v4_rules = (
        Rule(
            Table.NAT,
            "ISTIO_OUTPUT",
            (
                Protocol(Proto.TCP),
                Source(IPv4Interface("127.0.0.6/32")),
                Destination(IPv4Interface("10.0.0.1/8"), negated=True),
                InInterface("eth0"),
                OutInterface("lo"),
                DestinationPort(15008, negated=True),
                SourcePort(53),
                DestinationPorts((53, 15008), negated=True),
                UidOwner(1337),
                GidOwner("java", negated=True),
                GidOwner(202),
            ),
            Jump("ISTIO_IN_REDIRECT"),
        ),
        Rule(Table.NAT, "ISTIO_REDIRECT", (Protocol(Proto.UDP),), Redirect(15053)),
        Rule(
            Table.MANGLE,
            "ISTIO_INBOUND",
            (Mark(1338, negated=True), ConntrackState((CtState.RELATED, CtState.ESTABLISHED))),
            Verdict.RETURN,
            position=3,
        ),
        Rule(Table.MANGLE, "ISTIO_TPROXY", (), Tproxy(15006, 1337)),
        Rule(Table.MANGLE, "ISTIO_DIVERT", (), SetMark(1337)),
        Rule(Table.MANGLE, "PREROUTING", (), SaveMark()),
        Rule(Table.MANGLE, "OUTPUT", (Connmark(1337),), RestoreMark()),
        Rule(Table.RAW, "ISTIO_OUTPUT_DNS", (), CtZone(2)),
        Rule(Table.MANGLE, "ISTIO_DROP", (), Verdict.DROP),
    )
    plan = Plan(
        rulesets=(
            RuleSet(Family.V4, v4_rules),
            RuleSet(Family.V6, (Rule(Table.NAT, "OUTPUT", (Destination(IPv6Interface("::1/128")),), Verdict.ACCEPT),)),
        ),
        routes=(PolicyRoute(Family.V4, 1337, 133), PolicyRoute(Family.V6, 7, 200)),
        loopback_addresses=(IPv6Interface("::6/128"),),
    )
    assert document(plan) == {
        "version": 1,
        "families": [
            {
                "family": "ipv4",
                "tables": [
                    {
                        "table": "mangle",
                        "chains": ["ISTIO_INBOUND", "ISTIO_TPROXY", "ISTIO_DIVERT", "ISTIO_DROP"],
                        "rules": [
                            {
                                "chain": "ISTIO_INBOUND",
                                "position": 3,
                                "clauses": [
                                    {"match": "mark", "mark": 1338, "negated": True},
                                    {
                                        "match": "conntrack_state",
                                        "states": ["RELATED", "ESTABLISHED"],
                                        "negated": False,
                                    },
                                ],
                                "target": {"target": "verdict", "verdict": "RETURN"},
                                "comment": None,
                                "text": "-I ISTIO_INBOUND 3 -m mark ! --mark 1338 -m conntrack --ctstate "
                                "RELATED,ESTABLISHED -j RETURN",
                            },
                            {
                                "chain": "ISTIO_TPROXY",
                                "position": None,
                                "clauses": [],
                                "target": {"target": "tproxy", "port": 15006, "mark": 1337, "mask": 0xFFFFFFFF},
                                "comment": None,
                                "text": "-A ISTIO_TPROXY -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
                            },
                            {
                                "chain": "ISTIO_DIVERT",
                                "position": None,
                                "clauses": [],
                                "target": {"target": "set_mark", "mark": 1337},
                                "comment": None,
                                "text": "-A ISTIO_DIVERT -j MARK --set-mark 1337",
                            },
                            {
                                "chain": "PREROUTING",
                                "position": None,
                                "clauses": [],
                                "target": {"target": "save_mark"},
                                "comment": None,
                                "text": "-A PREROUTING -j CONNMARK --save-mark",
                            },
                            {
                                "chain": "OUTPUT",
                                "position": None,
                                "clauses": [{"match": "connmark", "mark": 1337, "negated": False}],
                                "target": {"target": "restore_mark"},
                                "comment": None,
                                "text": "-A OUTPUT -m connmark --mark 1337 -j CONNMARK --restore-mark",
                            },
                            {
                                "chain": "ISTIO_DROP",
                                "position": None,
                                "clauses": [],
                                "target": {"target": "verdict", "verdict": "DROP"},
                                "comment": None,
                                "text": "-A ISTIO_DROP -j DROP",
                            },
                        ],
                    },
                    {
                        "table": "nat",
                        "chains": ["ISTIO_OUTPUT", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT"],
                        "rules": [
                            {
                                "chain": "ISTIO_OUTPUT",
                                "position": None,
                                "clauses": [
                                    {"match": "protocol", "protocol": "tcp", "negated": False},
                                    {"match": "source", "network": "127.0.0.6/32", "negated": False},
                                    {"match": "destination", "network": "10.0.0.1/8", "negated": True},
                                    {"match": "in_interface", "name": "eth0", "negated": False},
                                    {"match": "out_interface", "name": "lo", "negated": False},
                                    {"match": "destination_port", "port": 15008, "negated": True},
                                    {"match": "source_port", "port": 53, "negated": False},
                                    {"match": "destination_ports", "ports": [53, 15008], "negated": True},
                                    {"match": "uid_owner", "uid": 1337, "negated": False},
                                    {"match": "gid_owner", "group": "java", "negated": True},
                                    {"match": "gid_owner", "group": 202, "negated": False},
                                ],
                                "target": {"target": "jump", "chain": "ISTIO_IN_REDIRECT"},
                                "comment": None,
                                "text": "-A ISTIO_OUTPUT -p tcp -s 127.0.0.6/32 ! -d 10.0.0.1/8 -i eth0 -o lo "
                                "! --dport 15008 --sport 53 -m multiport ! --dports 53,15008 "
                                "-m owner --uid-owner 1337 -m owner ! --gid-owner java -m owner --gid-owner 202 "
                                "-j ISTIO_IN_REDIRECT",
                            },
                            {
                                "chain": "ISTIO_REDIRECT",
                                "position": None,
                                "clauses": [{"match": "protocol", "protocol": "udp", "negated": False}],
                                "target": {"target": "redirect", "port": 15053},
                                "comment": None,
                                "text": "-A ISTIO_REDIRECT -p udp -j REDIRECT --to-port 15053",
                            },
                        ],
                    },
                    {
                        "table": "raw",
                        "chains": ["ISTIO_OUTPUT_DNS"],
                        "rules": [
                            {
                                "chain": "ISTIO_OUTPUT_DNS",
                                "position": None,
                                "clauses": [],
                                "target": {"target": "ct_zone", "zone": 2},
                                "comment": None,
                                "text": "-A ISTIO_OUTPUT_DNS -j CT --zone 2",
                            }
                        ],
                    },
                ],
            },
            {
                "family": "ipv6",
                "tables": [
                    {
                        "table": "nat",
                        "chains": [],
                        "rules": [
                            {
                                "chain": "OUTPUT",
                                "position": None,
                                "clauses": [{"match": "destination", "network": "::1/128", "negated": False}],
                                "target": {"target": "verdict", "verdict": "ACCEPT"},
                                "comment": None,
                                "text": "-A OUTPUT -d ::1/128 -j ACCEPT",
                            }
                        ],
                    }
                ],
            },
        ],
        "sets": [],
        "routes": [
            {"family": "ipv4", "mark": 1337, "table": 133},
            {"family": "ipv6", "mark": 7, "table": 200},
        ],
        "loopback_addresses": ["::6/128"],
    }


def full_plan() -> Plan:
    config = Config(
        proxy_uids=(1337,),
        mode=Mode.TPROXY,
        inbound_ports=ALL,
        local_exclude_ports=(15090, 15021, 15020),
        service_cidrs=ALL,
        redirect_dns=True,
        dns_servers=(ip_address("10.96.0.10"), ip_address("fd00::a")),
        drop_invalid=True,
        ipv6=True,
    )
    return build_plan(config, HostFacts())


def test_real_plan_document_agrees_with_restore_payloads() -> None:
    plan = full_plan()
    doc = document(plan)
    assert doc["version"] == SCHEMA_VERSION == 1
    assert set(doc) == {"version", "families", "sets", "routes", "loopback_addresses"}
    assert [family["family"] for family in doc["families"]] == ["ipv4", "ipv6"]
    for ruleset, family in zip(plan.rulesets, doc["families"], strict=True):
        assert set(family) == {"family", "tables"}
        assert [table["table"] for table in family["tables"]] == ["mangle", "nat", "raw"]
        chains = declared_chains(ruleset.rules)
        payload_lines: list[str] = []
        for table in family["tables"]:
            assert set(table) == {"table", "chains", "rules"}
            assert table["chains"] == chains.get(Table(table["table"]), [])
            payload_lines.append(f"* {table['table']}")
            payload_lines += [f"-N {chain}" for chain in table["chains"]]
            for rule in table["rules"]:
                assert set(rule) == {"chain", "position", "clauses", "target", "comment", "text"}
                assert all("match" in clause and "negated" in clause for clause in rule["clauses"])
                assert "target" in rule["target"]
                payload_lines.append(rule["text"])
            payload_lines.append("COMMIT")
        assert "".join(line + "\n" for line in payload_lines) == render_restore(ruleset)
    assert doc["routes"] == [
        {"family": "ipv4", "mark": 1337, "table": 133},
        {"family": "ipv6", "mark": 1337, "table": 133},
    ]
    assert doc["loopback_addresses"] == ["::6/128"]


def test_real_plan_spot_checks() -> None:
    doc = document(full_plan())
    v4_nat = next(t for t in doc["families"][0]["tables"] if t["table"] == "nat")
    uid_redirect = v4_nat["rules"][5]
    assert uid_redirect == {
        "chain": "ISTIO_OUTPUT",
        "position": None,
        "clauses": [
            {"match": "out_interface", "name": "lo", "negated": False},
            {"match": "destination", "network": "127.0.0.1/32", "negated": True},
            {"match": "protocol", "protocol": "tcp", "negated": False},
            {"match": "destination_ports", "ports": [53, 15008], "negated": True},
            {"match": "uid_owner", "uid": 1337, "negated": False},
        ],
        "target": {"target": "jump", "chain": "ISTIO_IN_REDIRECT"},
        "comment": None,
        "text": "-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp -m multiport ! --dports 53,15008 "
        "-m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
    }
    v6_raw = next(t for t in doc["families"][1]["tables"] if t["table"] == "raw")
    assert v6_raw["rules"][-1] == {
        "chain": "ISTIO_INBOUND",
        "position": None,
        "clauses": [
            {"match": "protocol", "protocol": "udp", "negated": False},
            {"match": "source_port", "port": 53, "negated": False},
            {"match": "source", "network": "fd00::a/128", "negated": False},
        ],
        "target": {"target": "ct_zone", "zone": 1},
        "comment": None,
        "text": "-A ISTIO_INBOUND -p udp --sport 53 -s fd00::a/128 -j CT --zone 1",
    }


def test_ipv4_redirect_plan_has_empty_routes_and_addresses() -> None:
    doc = document(build_plan(Config(proxy_uids=(1337,), ipv6=False), HostFacts()))
    assert [family["family"] for family in doc["families"]] == ["ipv4"]
    assert doc["routes"] == []
    assert doc["loopback_addresses"] == []


def test_json_is_indented_and_deterministic() -> None:
    plan = full_plan()
    rendered = render_json(plan)
    assert rendered == render_json(full_plan())
    assert rendered.startswith('{\n  "version": 1,\n  "families": [\n')
    assert dry_run_output(plan, DryRunFormat.JSON) == rendered
