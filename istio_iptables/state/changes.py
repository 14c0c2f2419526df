"""What an apply or a clean-up changed, in words for the log: per table, our rules added and removed, our
chains created and deleted, our sets written and deleted. Pure: it compares the two layouts the apply
compared anyway (``state.Layout``, the plan's and the live one)."""

from __future__ import annotations

from collections import Counter

from istio_iptables.capture.model import BUILTIN_CHAINS, Table
from istio_iptables.records import record
from istio_iptables.state.tables import Layout


@record
class TableChange:
    table: Table
    added: int
    removed: int
    created: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    sets_written: tuple[str, ...] = ()
    sets_deleted: tuple[str, ...] = ()

    def describe(self, where: str) -> str:
        """``ipv4 nat (iptables-nft): 14 rules added, 0 removed; chains created: ISTIO_INBOUND, ...``."""
        parts = [f"{self.added} {'rule' if self.added == 1 else 'rules'} added, {self.removed} removed"]
        for what, names in (
            ("chains created", self.created),
            ("chains deleted", self.deleted),
            ("sets written", self.sets_written),
            ("sets deleted", self.sets_deleted),
        ):
            if names:
                parts.append(f"{what}: {', '.join(names)}")
        return f"{where}: " + "; ".join(parts)


def table_changes(expected: Layout, actual: Layout) -> list[TableChange]:
    """The tables whose rules, chains or sets differ between ``actual`` (before) and ``expected`` (after),
    in table order. nftables layouts begin a hooked chain with its hook (``type nat hook ...``) and list a
    set as a chain ``@name`` holding its definition: neither counts as a rule."""
    found = []
    for table in sorted(set(expected) | set(actual), key=lambda table: table.value):
        after, before = expected.get(table, {}), actual.get(table, {})
        added = removed = 0
        for chain in set(after) - _sets(after) | set(before) - _sets(before):
            want, have = Counter(_rules(after.get(chain, []))), Counter(_rules(before.get(chain, [])))
            added += sum((want - have).values())
            removed += sum((have - want).values())
        change = TableChange(
            table,
            added,
            removed,
            created=_chains(after, before),
            deleted=_chains(before, after),
            sets_written=tuple(sorted(name[1:] for name in _sets(after) if after[name] != before.get(name))),
            sets_deleted=tuple(sorted(name[1:] for name in _sets(before) - _sets(after))),
        )
        if change != TableChange(table, 0, 0):
            found.append(change)
    return found


def _rules(texts: list[str]) -> list[str]:
    return [text for text in texts if not text.startswith("type ")]


def _sets(chains: dict[str, list[str]]) -> set[str]:
    return {name for name in chains if name.startswith("@")}


def _chains(these: dict[str, list[str]], those: dict[str, list[str]]) -> tuple[str, ...]:
    """Chains in ``these`` and not in ``those`` (built-in ones exist anyway; sets are not chains), in order."""
    return tuple(
        name for name in these if name not in those and name not in BUILTIN_CHAINS and not name.startswith("@")
    )
