"""The iptables-restore payload of one family, exactly as Istio writes it (reference 3.5), and the payloads
that move live tables to a plan."""

from __future__ import annotations

import re

from ..model import BUILTIN_CHAINS, RuleSet, Table, declared_chains
from ..state import OWN_CHAINS, SavedRule, TableState, holds_own, own_entries
from .iptables import rule_text


def render_restore(ruleset: RuleSet) -> str:
    """Tables sorted by name, each ``* table``, its ``-N`` lines, its rules in order, then ``COMMIT``."""
    chains = declared_chains(ruleset.rules)
    lines: list[str] = []
    for table in ruleset.tables():
        lines.append(f"* {table.value}")
        lines.extend(f"-N {chain}" for chain in chains.get(table, []))
        lines.extend(rule_text(rule) for rule in ruleset.in_table(table))
        lines.append("COMMIT")
    return "".join(line + "\n" for line in lines)


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


def render_deletes(table: Table, entries: list[SavedRule]) -> str:
    """One iptables-restore --noflush payload deleting some saved rules of one table, in one COMMIT."""
    return f"* {table.value}\n" + "".join(delete_line(entry) + "\n" for entry in entries) + "COMMIT\n"


def delete_line(entry: SavedRule) -> str:
    """Saved rules read "-A CHAIN args": the same args after -D delete exactly that rule."""
    return "-D " + entry.text.split(" ", 1)[1]


def table_text(saved: str, table: Table) -> str:
    """One table of a save, without comments and counters: what a comparison of rules needs."""
    lines, keep = [], False
    for line in saved.splitlines():
        if line.startswith("*"):
            keep = line[1:].strip() == table.value
        if keep and not line.startswith("#"):
            lines.append(re.sub(r"\[\d+:\d+\]$", "[0:0]", line))
        if line.strip() == "COMMIT":
            keep = False
    return "".join(line + "\n" for line in lines)


def render_tables(saved: str, tables: set[Table]) -> str:
    """The given tables of a save, whole, for a flushing restore that puts them back exactly as saved; a
    table the save did not have is restored empty."""
    return "".join(
        table_text(saved, table) or f"*{table.value}\nCOMMIT\n" for table in sorted(tables, key=lambda t: t.value)
    )
