"""Which live rules are ours (state.ownership) and the undo that names only ours (render_undo): examples, and
properties over random configurations (tests/test_properties.py's strategy)."""

from __future__ import annotations

from hypothesis import given

from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import BUILTIN_CHAINS, InInterface, Jump, Plan, Table
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.records import replace
from istio_iptables.render.iptables import save_text
from istio_iptables.state import (
    TableState,
    canonical,
    foreign_entries,
    locate,
    own_entries,
    ownership,
    parse_tables,
    plan_places,
    tables_holding,
)
from istio_iptables.state.changes import render_undo
from tests.test_properties import SETTINGS, configs_and_facts

F = Config(inbound_ports=ALL, service_cidrs=ALL, local_exclude_ports=(15090, 15021, 15020), ipv6=False)


def same(group: int | str) -> int | str:
    return group


def live(
    plan: Plan, located_by: Plan, before: tuple[str, ...] = (), after: tuple[str, ...] = ()
) -> dict[Table, TableState]:
    """The plan's IPv4 rules as a save shows them once applied, with foreign rule lines ("nat -A ...") before
    and after them, told where ``located_by`` puts our rules."""
    ruleset = plan.rulesets[0]
    applied = tables_holding(ruleset.rules, lambda rule: save_text(canonical(rule, same)))
    text = ""
    for table in Table:
        state = applied.get(table, TableState())
        lines = [line.split(" ", 1)[1] for line in before if line.startswith(table.value + " ")]
        lines += [entry.text for entry in state.entries]
        lines += [line.split(" ", 1)[1] for line in after if line.startswith(table.value + " ")]
        declared = [f":{chain} - [0:0]" for chain in state.chains]
        text += f"*{table.value}\n" + "".join(line + "\n" for line in [*declared, *lines]) + "COMMIT\n"
    planned = located_by.rulesets[0].rules
    return locate(parse_tables(text), plan_places(planned, same))


def foreign_texts(tables: dict[Table, TableState]) -> list[str]:
    return [entry.text for state in tables.values() for entry in foreign_entries(state)]


FOREIGN_RETURN = "nat -A PREROUTING -i eth9 -j RETURN"
FOREIGN_SAVE_MARK = "mangle -A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark"


def test_the_issues_foreign_rules_are_not_ours_under_redirect() -> None:
    plan = build_plan(replace_config(), HostFacts())
    tables = live(
        plan,
        plan,
        after=(
            FOREIGN_RETURN,
            FOREIGN_SAVE_MARK,
        ),
    )
    assert sorted(foreign_texts(tables)) == sorted(
        line.split(" ", 1)[1] for line in (FOREIGN_RETURN, FOREIGN_SAVE_MARK)
    )


def test_an_interface_return_of_ours_needs_its_partner_and_its_side_of_our_jump() -> None:
    earlier = build_plan(replace_config(exclude_interfaces=("eth9",)), HostFacts())
    now = build_plan(replace_config(), HostFacts())
    tables = live(earlier, now)
    assert foreign_texts(tables) == []  # the earlier pair: vouched for by each other
    tables = live(
        now,
        now,
        after=(
            FOREIGN_RETURN,
            "nat -A OUTPUT -o eth9 -j RETURN",
        ),
    )
    assert len(foreign_texts(tables)) == 2  # a pair, but after our jumps: not where we put them


def test_kube_virt_return_is_ours_beside_its_jump_only() -> None:
    earlier = build_plan(replace_config(kube_virt_interfaces=("kv0",)), HostFacts())
    now = build_plan(replace_config(), HostFacts())
    assert foreign_texts(live(earlier, now)) == []
    assert foreign_texts(live(now, now, before=("nat -A PREROUTING -i kv0 -j RETURN",))) == [
        "-A PREROUTING -i kv0 -j RETURN"
    ]


def test_tproxy_mangle_rules_are_ours_with_their_marks_only() -> None:
    tproxy = build_plan(replace_config(mode=Mode.TPROXY), HostFacts())
    other_mark = "mangle -A PREROUTING -p tcp -m mark --mark 0x7 -j CONNMARK --save-mark"
    tables = live(
        tproxy,
        build_plan(replace_config(), HostFacts()),
        after=(
            other_mark,
            FOREIGN_SAVE_MARK,
        ),
    )
    # Ours vouched for by our TPROXY chains; a second copy and another mark's are someone else's.
    assert sorted(foreign_texts(tables)) == sorted([other_mark.split(" ", 1)[1], FOREIGN_SAVE_MARK.split(" ", 1)[1]])


def test_a_planned_rule_is_ours_only_on_its_side_of_our_jumps() -> None:
    """Planned ``-i eth9 -j RETURN`` (excluded interface) stands before our ISTIO_INBOUND jump; an identical
    rule after it is foreign, and is what remains if ours was deleted by hand."""
    plan = build_plan(replace_config(exclude_interfaces=("eth9",)), HostFacts())
    tables = live(plan, plan, after=(FOREIGN_RETURN,))
    assert foreign_texts(tables) == ["-A PREROUTING -i eth9 -j RETURN"]
    nat = tables[Table.NAT]
    ours = [entry for entry in own_entries(nat) if entry.text == "-A PREROUTING -i eth9 -j RETURN"]
    nat.entries.remove(ours[0])
    assert foreign_texts(tables) == ["-A PREROUTING -i eth9 -j RETURN"]


def test_nothing_is_ours_by_place_where_no_chain_of_ours_is() -> None:
    plan = build_plan(replace_config(exclude_interfaces=("eth9",)), HostFacts())
    tables = locate(
        parse_tables(f"*nat\n{FOREIGN_RETURN.split(' ', 1)[1]}\nCOMMIT\n"), plan_places(plan.rulesets[0].rules, same)
    )
    assert not any(ownership(tables[Table.NAT]))


def test_comments_decide_alone_once_a_table_holds_ours() -> None:
    text = (
        "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n"
        '-A OUTPUT -o eth9 -m comment --comment "istio-iptables: excluded interface, never captured" -j RETURN\n'
        "-A PREROUTING -i eth9 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"
    )
    nat = parse_tables(text)[Table.NAT]
    assert [entry.text for entry in foreign_entries(nat)] == ["-A PREROUTING -i eth9 -j RETURN"]


def test_undo_names_only_our_rules_and_puts_them_back_beside_their_neighbours() -> None:
    before = parse_tables(
        "*nat\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -d 198.19.0.1/32 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n"
        "-A OUTPUT -d 198.19.0.2/32 -j RETURN\n-A ISTIO_OUTPUT -j RETURN\nCOMMIT\n"
    )[Table.NAT]
    now = parse_tables(
        "*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n-A OUTPUT -d 198.19.0.9/32 -j RETURN\n"
        "-A OUTPUT -d 198.19.0.1/32 -j RETURN\n-A OUTPUT -d 198.19.0.2/32 -j RETURN\n-A OUTPUT -j ISTIO_OUTPUT\n"
        "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n"
    )[Table.NAT]
    assert render_undo(Table.NAT, before, now) == (
        "* nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n-D OUTPUT -j ISTIO_OUTPUT\n"
        "-A ISTIO_OUTPUT -j RETURN\n-X ISTIO_REDIRECT\n-I OUTPUT 3 -j ISTIO_OUTPUT\nCOMMIT\n"
    )
    assert render_undo(Table.NAT, before, before) == ""


def replace_config(**changes: object) -> Config:
    return replace(F, **changes)


# ---- properties ------------------------------------------------------------------------------------------


@SETTINGS
@given(configs_and_facts())
def test_every_rule_of_the_plan_is_ours_and_foreign_rules_shaped_like_ours_are_not(
    case: tuple[Config, HostFacts],
) -> None:
    """Foreign rules shaped like ours before and after ours: an interface RETURN without its partner, a pair
    after our jumps, a save-mark with a mark of its own. (A pair before our jumps looks exactly like an earlier
    configuration's excluded interface, docs/capture.md says so.)"""
    plan = build_plan(case[0], case[1])
    save_mark = "mangle -A PREROUTING -p tcp -m mark --mark 0x5 -j CONNMARK --save-mark"
    before = ("nat -A PREROUTING -i foreign-9 -j RETURN", save_mark)
    after = ("nat -A PREROUTING -i foreign-8 -j RETURN", "nat -A OUTPUT -o foreign-8 -j RETURN", save_mark)
    tables = live(plan, plan, before=before, after=after)
    assert sorted(foreign_texts(tables)) == sorted(line.split(" ", 1)[1] for line in (*before, *after))


@SETTINGS
@given(configs_and_facts())
def test_an_earlier_configurations_rules_are_ours_for_any_later_plan(case: tuple[Config, HostFacts]) -> None:
    """Located by another configuration's plan (or a clean-up's), every rule of ours is still found, but the
    KubeVirt RETURN of a configuration without KubeVirt jumps (no captured CIDR), which nothing vouches for."""
    plan = build_plan(case[0], case[1])
    tables = live(plan, build_plan(F, HostFacts()))
    kube_virt_jumps = {
        clause.name
        for rule in plan.rulesets[0].rules
        if rule.chain == "PREROUTING" and rule.target == Jump("ISTIO_REDIRECT")
        for clause in rule.clauses
        if isinstance(clause, InInterface)
    }
    unvouched = {f"-A PREROUTING -i {nic} -j RETURN" for nic in case[0].kube_virt_interfaces}
    unvouched -= {f"-A PREROUTING -i {nic} -j RETURN" for nic in (*kube_virt_jumps, *case[0].exclude_interfaces)}
    owned = {entry.text for state in tables.values() for entry in own_entries(state)}
    # A second copy (flags naming an interface twice) counts as someone else's: one stays after a clean-up.
    assert set(foreign_texts(tables)) - owned <= unvouched
    assert all(entry.chain in BUILTIN_CHAINS for state in tables.values() for entry in foreign_entries(state))
