"""The changes that move live tables to a plan: the iptables-restore --noflush payloads that make them (or put
ours back as they were), and what an apply or a clean-up changed, in words for the log (per table, our rules
added and removed, our chains created and deleted, our sets written and deleted, from the two layouts the
apply compared anyway: ``state.Layout``, the plan's and the live one). Pure."""

from __future__ import annotations

from collections import Counter

from istio_iptables.capture.model import BUILTIN_CHAINS, RuleSet, Table, declared_chains
from istio_iptables.records import record
from istio_iptables.render.iptables import rule_text
from istio_iptables.state import OWN_CHAINS, Layout, SavedRule, TableState, holds_own, own_entries, ownership


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


def render_transition(ruleset: RuleSet, live: dict[Table, TableState]) -> str:
    """One iptables-restore --noflush payload that turns the live tables into the planned ones, each table
    in one atomic COMMIT: our chains are declared (created, or flushed if they exist) and refilled, our
    rules in built-in chains deleted and re-added, chains of ours the plan no longer has deleted. Foreign
    rules are never named, so they stay as they are. With an empty ruleset this is the clean-up."""
    planned = declared_chains(ruleset.rules)
    tables = set(ruleset.tables()) | {table for table, state in live.items() if holds_own(state)}
    lines: list[str] = []
    for table in sorted(tables, key=lambda table: table.value):
        state = live.get(table, TableState())
        keep = planned.get(table, [])
        stale = [chain for chain in state.chains if chain in OWN_CHAINS and chain not in keep]
        lines.append(f"* {table.value}")
        lines.extend(f":{chain} - [0:0]" for chain in [*keep, *stale])
        own_in_builtin = [entry for entry in own_entries(state) if entry.chain in BUILTIN_CHAINS]
        lines.extend(map(delete_line, own_in_builtin))
        lines.extend(f"-X {chain}" for chain in stale)
        lines.extend(rule_text(rule) for rule in ruleset.in_table(table))
        lines.append("COMMIT")
    return "".join(line + "\n" for line in lines)


def render_undo(table: Table, before: TableState, now: TableState) -> str:
    """One iptables-restore --noflush payload (one COMMIT) that puts our rules of a table back as they were
    (``before``), naming no other rule, so what another program wrote meanwhile stays: our chains are
    declared (flushed) and refilled as before, chains of ours only ``now`` has deleted, our rules in built-in
    chains deleted and put back where they stood among the foreign rules around them. Empty when ours are
    as they were."""
    was, is_now = own_entries(before), own_entries(now)
    kept = [chain for chain in before.chains if chain in OWN_CHAINS]
    added = [chain for chain in now.chains if chain in OWN_CHAINS and chain not in before.chains]
    if was == is_now and not added and kept == [chain for chain in now.chains if chain in OWN_CHAINS]:
        return ""
    lines = [f"* {table.value}", *(f":{chain} - [0:0]" for chain in [*kept, *added])]
    lines += [delete_line(entry) for entry in is_now if entry.chain in BUILTIN_CHAINS]
    lines += [entry.text for entry in was if entry.chain in OWN_CHAINS]
    lines += [f"-X {chain}" for chain in added]
    lines += _reinserts(before, now)
    return "".join(line + "\n" for line in [*lines, "COMMIT"])


def _reinserts(before: TableState, now: TableState) -> list[str]:
    """``-I CHAIN N`` for each of our rules ``before`` held in a built-in chain, placed right after the foreign
    rule that preceded it then (found again among the chain's foreign rules now)."""
    foreign_now: dict[str, list[str]] = {}
    for entry, own in zip(now.entries, ownership(now), strict=True):
        if entry.chain in BUILTIN_CHAINS and not own:
            foreign_now.setdefault(entry.chain, []).append(entry.text)
    lines, cursors = [], dict.fromkeys(foreign_now, 0)
    for entry, own in zip(before.entries, ownership(before), strict=True):
        if entry.chain not in BUILTIN_CHAINS:
            continue
        chain, cursor = foreign_now.setdefault(entry.chain, []), cursors.get(entry.chain, 0)
        if own:
            chain.insert(cursor, entry.text)
            lines.append(f"-I {entry.chain} {cursor + 1} {entry.text.split(' ', 2)[2]}")
            cursor += 1
        elif entry.text in chain[cursor:]:
            cursor = chain.index(entry.text, cursor) + 1
        cursors[entry.chain] = cursor
    return lines


def render_deletes(table: Table, entries: list[SavedRule]) -> str:
    """One iptables-restore --noflush payload deleting some saved rules of one table, in one COMMIT."""
    return f"* {table.value}\n" + "".join(delete_line(entry) + "\n" for entry in entries) + "COMMIT\n"


def delete_line(entry: SavedRule) -> str:
    """Saved rules read "-A CHAIN args": the same args after -D delete exactly that rule."""
    return "-D " + entry.text.split(" ", 1)[1]
