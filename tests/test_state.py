"""Reading rules back: our restore payloads and real ``iptables-save`` spellings, into the model."""

from __future__ import annotations

import shlex
from ipaddress import IPv4Interface, IPv6Interface

import pytest

from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import (
    Connmark,
    ConntrackState,
    CtState,
    CtZone,
    Destination,
    DestinationPort,
    DestinationPorts,
    GidOwner,
    InInterface,
    Jump,
    Mark,
    OutInterface,
    Proto,
    Protocol,
    Redirect,
    RestoreMark,
    Rule,
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
from istio_iptables.render.restore import render_restore
from istio_iptables.state import UnparsedRuleError, parse_rule, parse_tables

TCP, UDP = Protocol(Proto.TCP), Protocol(Proto.UDP)
LO4 = IPv4Interface("127.0.0.1/32")


def rule_of(line: str, table: Table = Table.NAT) -> Rule:
    return parse_rule(table, shlex.split(line))


# ---- our own payloads ------------------------------------------------------------------------------


def test_restore_payload_round_trips() -> None:
    config = Config(
        proxy_uids=(1337,),
        mode=Mode.TPROXY,
        inbound_ports=ALL,
        local_exclude_ports=(15090,),
        service_cidrs=ALL,
        redirect_dns=True,
        capture_all_dns=True,
        drop_invalid=True,
        owner_groups_include=("java", 202),
        ipv6=True,
    )
    for ruleset in build_plan(config, HostFacts()).rulesets:
        parsed = parse_tables(render_restore(ruleset))
        assert list(parsed) == ruleset.tables()
        chains = declared_chains(ruleset.rules)
        for table, state in parsed.items():
            assert state.rules == ruleset.in_table(table)
            assert state.chains == dict.fromkeys(chains.get(table, []))
            assert state.unparsed == []


def test_istio_spellings_of_targets() -> None:
    assert rule_of("-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001").target == Redirect(15001)
    assert rule_of("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053").target == Redirect(15053)
    assert rule_of(
        "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006",
        Table.MANGLE,
    ) == Rule(Table.MANGLE, "ISTIO_TPROXY", (Destination(LO4, negated=True), TCP), Tproxy(15006, 1337, 0xFFFFFFFF))
    assert rule_of("-A ISTIO_DIVERT -j MARK --set-mark 1337", Table.MANGLE).target == SetMark(1337)
    assert rule_of("-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark", Table.MANGLE) == Rule(
        Table.MANGLE, "PREROUTING", (TCP, Mark(1337)), SaveMark()
    )
    assert rule_of("-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark", Table.MANGLE) == Rule(
        Table.MANGLE, "OUTPUT", (TCP, Connmark(1337)), RestoreMark()
    )
    assert rule_of("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2", Table.RAW).target == CtZone(2)
    assert rule_of("-A ISTIO_DROP -j DROP", Table.MANGLE).target is Verdict.DROP
    assert rule_of("-A ISTIO_DIVERT -j ACCEPT", Table.MANGLE).target is Verdict.ACCEPT
    assert rule_of("-A OUTPUT -j ISTIO_OUTPUT").target == Jump("ISTIO_OUTPUT")


def test_insert_positions() -> None:
    assert rule_of("-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN", Table.MANGLE) == Rule(
        Table.MANGLE,
        "ISTIO_INBOUND",
        (TCP, Source(IPv4Interface("127.0.0.6/32")), InInterface("lo")),
        Verdict.RETURN,
        position=2,
    )
    assert rule_of("-I PREROUTING -i eth0 -j RETURN").position == 1
    assert rule_of("-A PREROUTING -i eth0 -j RETURN").position is None


# ---- real iptables-save spellings -------------------------------------------------------------------


def test_save_spelling_tcp_module_and_negated_dport() -> None:
    assert rule_of(
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 "
        "-j ISTIO_IN_REDIRECT"
    ) == Rule(
        Table.NAT,
        "ISTIO_OUTPUT",
        (
            Destination(LO4),
            OutInterface("lo"),
            TCP,
            DestinationPort(15008, negated=True),
            UidOwner(1337),
        ),
        Jump("ISTIO_IN_REDIRECT"),
    )
    assert rule_of(
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 "
        "-j ISTIO_IN_REDIRECT"
    ).clauses == (
        Destination(LO4, negated=True),
        OutInterface("lo"),
        TCP,
        DestinationPort(15008, negated=True),
        GidOwner(1337),
    )


def test_save_spelling_multiport() -> None:
    assert rule_of(
        "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 "
        "-j ISTIO_IN_REDIRECT"
    ).clauses == (
        Destination(LO4, negated=True),
        OutInterface("lo"),
        TCP,
        DestinationPorts((53, 15008), negated=True),
        UidOwner(1337),
    )


def test_save_spelling_negated_owner_and_udp_module() -> None:
    assert rule_of("-A ISTIO_OUTPUT -o lo -p tcp -m tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN") == Rule(
        Table.NAT,
        "ISTIO_OUTPUT",
        (OutInterface("lo"), TCP, DestinationPort(53, negated=True), UidOwner(1337, negated=True)),
        Verdict.RETURN,
    )
    assert rule_of("-A ISTIO_INBOUND -s 10.96.0.10/32 -p udp -m udp --sport 53 -j CT --zone 1", Table.RAW) == Rule(
        Table.RAW,
        "ISTIO_INBOUND",
        (Source(IPv4Interface("10.96.0.10/32")), UDP, SourcePort(53)),
        CtZone(1),
    )


def test_save_spelling_hex_marks() -> None:
    assert rule_of("-A OUTPUT -o lo -p tcp -m mark --mark 0x539 -j RETURN", Table.MANGLE).clauses == (
        OutInterface("lo"),
        TCP,
        Mark(1337),
    )
    assert rule_of("-A ISTIO_INBOUND -i lo -p tcp -m mark ! --mark 0x53a -j RETURN", Table.MANGLE).clauses == (
        InInterface("lo"),
        TCP,
        Mark(1338, negated=True),
    )
    assert rule_of("-A X -m mark --mark 0x539/0xffffffff -j RETURN", Table.MANGLE).clauses == (Mark(1337),)
    assert rule_of("-A OUTPUT -p tcp -m connmark --mark 0x539 -j RETURN", Table.MANGLE).clauses == (
        TCP,
        Connmark(1337),
    )


def test_save_spelling_tproxy() -> None:
    assert rule_of(
        "-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 "
        "--tproxy-mark 0x539/0xffffffff",
        Table.MANGLE,
    ).target == Tproxy(15006, 1337, 0xFFFFFFFF)
    assert rule_of(
        "-A ISTIO_TPROXY ! -d ::1/128 -p tcp -j TPROXY --on-port 15006 --on-ip :: --tproxy-mark 0x539/0xffffffff",
        Table.MANGLE,
    ) == Rule(
        Table.MANGLE,
        "ISTIO_TPROXY",
        (Destination(IPv6Interface("::1/128"), negated=True), TCP),
        Tproxy(15006, 1337),
    )


def test_save_spelling_mark_and_connmark_targets() -> None:
    assert rule_of("-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff", Table.MANGLE).target == SetMark(1337)
    assert rule_of(
        "-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff",
        Table.MANGLE,
    ).target == SetMark(1338)
    assert (
        rule_of(
            "-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff",
            Table.MANGLE,
        ).target
        == SaveMark()
    )
    assert (
        rule_of(
            "-A OUTPUT -p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff "
            "--ctmask 0xffffffff",
            Table.MANGLE,
        ).target
        == RestoreMark()
    )


def test_save_spelling_ct_and_conntrack() -> None:
    assert rule_of(
        "-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1", Table.RAW
    ) == Rule(
        Table.RAW,
        "ISTIO_OUTPUT_DNS",
        (UDP, DestinationPort(53), UidOwner(1337)),
        CtZone(1),
    )
    assert rule_of(
        "-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT", Table.MANGLE
    ).clauses == (TCP, ConntrackState((CtState.RELATED, CtState.ESTABLISHED)))
    assert rule_of("-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP", Table.MANGLE) == Rule(
        Table.MANGLE, "PREROUTING", (ConntrackState((CtState.INVALID,)),), Jump("ISTIO_DROP")
    )


def test_long_option_spellings() -> None:
    assert rule_of(
        "-A X --protocol tcp --source 10.0.0.1/32 --destination 10.0.0.2/32 --in-interface eth0 "
        "--out-interface eth1 --destination-port 80 -j RETURN"
    ).clauses == (
        TCP,
        Source(IPv4Interface("10.0.0.1/32")),
        Destination(IPv4Interface("10.0.0.2/32")),
        InInterface("eth0"),
        OutInterface("eth1"),
        DestinationPort(80),
    )


def test_group_names_stay_names() -> None:
    assert rule_of("-A ISTIO_OUTPUT -m owner ! --gid-owner java -m owner ! --gid-owner 202 -j RETURN").clauses == (
        GidOwner("java", negated=True),
        GidOwner(202, negated=True),
    )


IPTABLES_SAVE = """\
# Generated by iptables-save v1.8.9 (legacy) on Thu Jan  1 00:00:00 2026
*security
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -j ACCEPT
COMMIT
# Completed on Thu Jan  1 00:00:00 2026
# Generated by iptables-save v1.8.9 (legacy) on Thu Jan  1 00:00:00 2026
*raw
:PREROUTING ACCEPT [12:3456]
:OUTPUT ACCEPT [7:420]
:ISTIO_INBOUND - [0:0]
:ISTIO_OUTPUT_DNS - [0:0]
-A PREROUTING -j ISTIO_INBOUND
-A OUTPUT -j ISTIO_OUTPUT_DNS
-A ISTIO_INBOUND -s 10.96.0.10/32 -p udp -m udp --sport 53 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1
COMMIT
# Completed on Thu Jan  1 00:00:00 2026
# Generated by iptables-save v1.8.9 (legacy) on Thu Jan  1 00:00:00 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_DIVERT - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_TPROXY - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A PREROUTING -j LOG --log-prefix x
-A OUTPUT -p tcp -m comment --comment "x y" -j RETURN
-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_INBOUND -p tcp -m mark --mark 0x539 -j RETURN
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
COMMIT
# Completed on Thu Jan  1 00:00:00 2026
# Generated by iptables-save v1.8.9 (legacy) on Thu Jan  1 00:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A POSTROUTING -o eth0 -j MASQUERADE
-A ISTIO_OUTPUT -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
COMMIT
# Completed on Thu Jan  1 00:00:00 2026
"""


def test_iptables_save_document() -> None:
    tables = parse_tables(IPTABLES_SAVE)
    assert list(tables) == [Table.RAW, Table.MANGLE, Table.NAT]  # security skipped

    raw = tables[Table.RAW]
    assert raw.chains == {"PREROUTING": "ACCEPT", "OUTPUT": "ACCEPT", "ISTIO_INBOUND": None, "ISTIO_OUTPUT_DNS": None}
    assert raw.rules == [
        Rule(Table.RAW, "PREROUTING", (), Jump("ISTIO_INBOUND")),
        Rule(Table.RAW, "OUTPUT", (), Jump("ISTIO_OUTPUT_DNS")),
        Rule(Table.RAW, "ISTIO_INBOUND", (Source(IPv4Interface("10.96.0.10/32")), UDP, SourcePort(53)), CtZone(1)),
        Rule(Table.RAW, "ISTIO_OUTPUT_DNS", (UDP, DestinationPort(53), UidOwner(1337)), CtZone(1)),
    ]
    assert raw.unparsed == []

    mangle = tables[Table.MANGLE]
    assert mangle.chains == {
        "PREROUTING": "ACCEPT",
        "INPUT": "ACCEPT",
        "FORWARD": "DROP",
        "OUTPUT": "ACCEPT",
        "POSTROUTING": "ACCEPT",
        "ISTIO_DIVERT": None,
        "ISTIO_INBOUND": None,
        "ISTIO_TPROXY": None,
    }
    assert mangle.rules == [
        Rule(Table.MANGLE, "PREROUTING", (TCP,), Jump("ISTIO_INBOUND")),
        Rule(Table.MANGLE, "PREROUTING", (TCP, Mark(1337)), SaveMark()),
        Rule(Table.MANGLE, "OUTPUT", (TCP,), Verdict.RETURN, comment="x y"),
        Rule(Table.MANGLE, "ISTIO_DIVERT", (), SetMark(1337)),
        Rule(Table.MANGLE, "ISTIO_DIVERT", (), Verdict.ACCEPT),
        Rule(Table.MANGLE, "ISTIO_INBOUND", (TCP, Mark(1337)), Verdict.RETURN),
        Rule(Table.MANGLE, "ISTIO_TPROXY", (Destination(LO4, negated=True), TCP), Tproxy(15006, 1337)),
    ]
    assert mangle.unparsed == ["-A PREROUTING -j LOG --log-prefix x"]

    nat = tables[Table.NAT]
    assert nat.chains == {
        "PREROUTING": "ACCEPT",
        "INPUT": "ACCEPT",
        "OUTPUT": "ACCEPT",
        "POSTROUTING": "ACCEPT",
        "ISTIO_OUTPUT": None,
    }
    assert nat.rules == [
        Rule(Table.NAT, "OUTPUT", (), Jump("ISTIO_OUTPUT")),
        Rule(
            Table.NAT,
            "ISTIO_OUTPUT",
            (Destination(LO4), OutInterface("lo"), TCP, DestinationPort(15008, negated=True), UidOwner(1337)),
            Jump("ISTIO_IN_REDIRECT"),
        ),
    ]
    assert nat.unparsed == ["-A POSTROUTING -o eth0 -j MASQUERADE"]


def test_ip6tables_save_addresses() -> None:
    tables = parse_tables(
        "*nat\n"
        ":ISTIO_OUTPUT - [0:0]\n"
        "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN\n"
        "-A ISTIO_OUTPUT -d 2001:db8::/32 -j ISTIO_REDIRECT\n"
        "COMMIT\n"
    )
    assert tables[Table.NAT].rules == [
        Rule(Table.NAT, "ISTIO_OUTPUT", (Source(IPv6Interface("::6/128")), OutInterface("lo")), Verdict.RETURN),
        Rule(Table.NAT, "ISTIO_OUTPUT", (Destination(IPv6Interface("2001:db8::/32")),), Jump("ISTIO_REDIRECT")),
    ]


@pytest.mark.parametrize(
    "line",
    [
        "-A PREROUTING -j LOG --log-prefix x",
        "-A OUTPUT -j RETURN --comment x",
        "-A POSTROUTING -j MASQUERADE",
        "-A PREROUTING -p tcp -j DNAT --to-destination 10.0.0.1:80",
        "-A X -m mark --mark 0x1/0xff -j RETURN",
        "-A X -j MARK --set-xmark 0x1/0xff",
        "-A X -j CONNMARK --save-mark --nfmask 0xff --ctmask 0xffffffff",
        "-A X -p tcp -j TPROXY --on-port 15006 --on-ip 10.0.0.1 --tproxy-mark 0x1/0x1",
        "-A X -p tcp --dport 1000:2000 -j RETURN",
        "-A X -p tcp",
        "-A X -j RETURN --bogus",
        "-A X -m set --match-set foo src -j RETURN",
    ],
)
def test_unparsable_rules_are_kept_verbatim(line: str) -> None:
    state = parse_tables(f"*mangle\n:X - [0:0]\n{line}\n-A X -j RETURN\nCOMMIT\n")[Table.MANGLE]
    assert state.unparsed == [line]
    assert state.rules == [Rule(Table.MANGLE, "X", (), Verdict.RETURN)]


def test_unparsable_rule_raises_from_parse_rule() -> None:
    with pytest.raises(UnparsedRuleError):
        rule_of("-A PREROUTING -j LOG --log-prefix x")


def test_comments_blank_lines_and_table_header_spellings() -> None:
    tables = parse_tables("# hello\n\n* nat\n-N A\n-A A -j RETURN\nCOMMIT\n\n*raw\n-A OUTPUT -j ACCEPT\nCOMMIT\n")
    assert list(tables) == [Table.NAT, Table.RAW]
    assert tables[Table.NAT].chains == {"A": None}
    assert tables[Table.RAW].rules == [Rule(Table.RAW, "OUTPUT", (), Verdict.ACCEPT)]


def test_unknown_tables_are_skipped_entirely() -> None:
    text = (
        "*security\n:INPUT ACCEPT [0:0]\n-A INPUT -j LOG --log-prefix x\nCOMMIT\n*broute\n-A BROUTING -j DROP\nCOMMIT\n"
    )
    assert parse_tables(text) == {}


def test_empty_text() -> None:
    assert parse_tables("") == {}


def test_rules_outside_a_table_are_ignored() -> None:
    assert parse_tables("-A OUTPUT -j RETURN\n") == {}


def test_garbage_inside_a_table_is_an_error() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_tables("*nat\nthis is not a rule\nCOMMIT\n")


def test_same_table_twice_accumulates() -> None:
    tables = parse_tables("*nat\n-A OUTPUT -j RETURN\nCOMMIT\n*nat\n-A OUTPUT -j ACCEPT\nCOMMIT\n")
    assert [rule.target for rule in tables[Table.NAT].rules] == [Verdict.RETURN, Verdict.ACCEPT]


# ---- foreign rules must never break parsing, nor be read as something they are not ------------------


@pytest.mark.parametrize(
    "line",
    [
        # iptables-save prints a REDIRECT without ports as a bare "-j REDIRECT" (libxt_REDIRECT only prints
        # --to-ports when a port range was given), and --random on its own.
        "-A PREROUTING -p tcp --dport 80 -j REDIRECT",
        "-A PREROUTING -p tcp -j REDIRECT --random",
        # Valid restore input; the MARK target's other operations.
        "-A PREROUTING -j MARK --or-mark 0x1",
        "-A PREROUTING -j MARK --and-mark 0xfe",
    ],
)
def test_foreign_targets_without_the_options_we_expect_are_kept_unparsed(line: str) -> None:
    state = parse_tables(f"*nat\n{line}\nCOMMIT\n")[Table.NAT]
    assert state.rules == []
    assert state.unparsed == [line]


def test_targets_with_options_the_model_cannot_hold_are_not_simplified() -> None:
    """Reading ``--to-ports 15001 --random`` as our plain REDIRECT would make a foreign rule look like ours."""
    line = "-A PREROUTING -p tcp -j REDIRECT --to-ports 15001 --random"
    state = parse_tables(f"*nat\n{line}\nCOMMIT\n")[Table.NAT]
    assert state.rules == []
    assert state.unparsed == [line]


def test_comments_are_read_into_the_rule() -> None:
    tables = parse_tables('*nat\n-A OUTPUT -o lo -m comment --comment "istio-iptables: why" -j RETURN\nCOMMIT\n')
    assert tables[Table.NAT].rules == [
        Rule(Table.NAT, "OUTPUT", (OutInterface("lo"),), Verdict.RETURN, comment="istio-iptables: why")
    ]
