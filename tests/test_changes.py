"""What an apply changed, in words: per table, rules added and removed, chains and sets (``changes.py``)."""

from __future__ import annotations

from istio_iptables.capture.model import Table
from istio_iptables.state import Layout
from istio_iptables.state.changes import TableChange, table_changes

PLANNED: Layout = {
    Table.NAT: {
        "ISTIO_INBOUND": ["-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN", "-A ISTIO_INBOUND -p tcp -j X"],
        "PREROUTING": ["-A PREROUTING -p tcp -j ISTIO_INBOUND"],
    }
}


def test_a_fresh_table_is_all_added_with_its_chains_and_no_builtin_chain() -> None:
    assert table_changes(PLANNED, {}) == [TableChange(Table.NAT, 3, 0, created=("ISTIO_INBOUND",))]


def test_a_clean_up_is_all_removed() -> None:
    assert table_changes({}, PLANNED) == [TableChange(Table.NAT, 0, 3, deleted=("ISTIO_INBOUND",))]


def test_unchanged_tables_are_not_listed() -> None:
    assert table_changes(PLANNED, PLANNED) == []


def test_a_replaced_rule_counts_once_each_way_and_duplicates_count() -> None:
    live = {Table.NAT: {**PLANNED[Table.NAT], "PREROUTING": ["-A PREROUTING -j ISTIO_INBOUND"] * 2}}
    assert table_changes(PLANNED, live) == [TableChange(Table.NAT, 1, 2)]


def test_nft_hooks_are_not_rules_and_sets_are_named() -> None:
    hook = "type nat hook prerouting priority -100 policy accept"
    planned: Layout = {Table.NAT: {"prerouting": [hook, "counter jump istio-inbound"], "@ports": ["type x { 1 }"]}}
    live: Layout = {Table.NAT: {"prerouting": [hook], "@ports": ["type x { 2 }"], "@old": ["type y"]}}
    assert table_changes(planned, live) == [
        TableChange(Table.NAT, 1, 0, sets_written=("ports",), sets_deleted=("old",))
    ]


def test_describe() -> None:
    change = TableChange(Table.NAT, 1, 0, created=("A", "B"), sets_deleted=("S",))
    assert change.describe("ipv4 nat (iptables-nft)") == (
        "ipv4 nat (iptables-nft): 1 rule added, 0 removed; chains created: A, B; sets deleted: S"
    )
