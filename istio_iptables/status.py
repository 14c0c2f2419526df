"""``status``: the live rules of a namespace against the plan of the given flags. Reads only."""

from __future__ import annotations

import json

from . import routes
from .apply import group_id, iptables_copies, observe, xtables_environment
from .backends import nft as native
from .config import Config
from .errors import ApplyError
from .model import Plan, Table
from .nft_state import planned_layout
from .records import record
from .render.nft import TABLE_NAMES
from .state import Layout, compare, own_entries

NATIVE = "native"
"""The variant of the native nftables tables (``--native-nftables``), which hold both families."""

Ref = tuple[Table, str, str]


@record
class FamilyStatus:
    family: str
    variant: str
    missing: list[Ref]
    extra: list[Ref]
    changed: list[tuple[Ref, Ref]]
    foreign: list[Ref]

    @property
    def in_sync(self) -> bool:
        return not (self.missing or self.extra or self.changed)


@record
class Status:
    families: list[FamilyStatus]
    routing: list[str]
    """The routing changes an apply would make (TPROXY ip rules and routes, ``::6``)."""

    @property
    def in_sync(self) -> bool:
        return all(family.in_sync for family in self.families) and not self.routing


def status(config: Config, plan: Plan) -> Status:
    if config.native_nftables:
        families = native_status(config, plan)
    else:
        families = iptables_status(config, plan) + native_copy_status()
    routing = [description for description, _, _ in routes.changes(plan, routes.read(), config.cleanup_only)]
    return Status(families, routing)


def iptables_status(config: Config, plan: Plan) -> list[FamilyStatus]:
    families = []
    for seen in observe(config, plan, xtables_environment()):
        difference = compare(seen.expected, seen.actual)
        foreign = [
            (table, entry.chain, entry.text)
            for table, state in seen.live.items()
            for entry in state.entries
            if entry not in own_entries(state)
        ]
        families.append(
            FamilyStatus(
                seen.target.family.label,
                seen.iptables.variant.value,
                difference.missing,
                difference.extra,
                difference.changed,
                foreign,
            )
        )
    return families


def native_status(config: Config, plan: Plan) -> list[FamilyStatus]:
    """Our nftables tables against the plan, and any iptables copy of our rules (which an apply removes)."""
    nft = native.detect()
    expected = planned_layout(None if config.cleanup_only else plan, group_id)
    actual = nft.saved.layout(group_id)
    difference = compare(expected, actual)
    families = [
        FamilyStatus(
            "inet",
            NATIVE,
            difference.missing,
            difference.extra + _empty_extras(expected, actual),
            difference.changed,
            [],
        )
    ]
    for iptables, live in iptables_copies(xtables_environment(), nft.saved.iptables_nft):
        extra = [(table, entry.chain, entry.text) for table, state in live.items() for entry in own_entries(state)]
        families.append(FamilyStatus(iptables.family.label, iptables.variant.value, [], extra, [], []))
    return families


def native_copy_status() -> list[FamilyStatus]:
    """The nftables tables a --native-nftables run left, which an iptables apply removes."""
    tables = native.own_tables()
    if not tables:
        return []
    try:
        layout = native.detect().saved.layout(group_id)
    except ApplyError:
        layout = {table: {} for table in tables}
    extra = [
        (table, chain, text) for table, chains in layout.items() for chain, texts in chains.items() for text in texts
    ]
    return [FamilyStatus("inet", NATIVE, [], extra + _empty_extras({}, layout), [], [])]


def _empty_extras(expected: Layout, actual: Layout) -> list[Ref]:
    """What a comparison of rules cannot show: a table or chain of ours that the plan lacks and that is empty."""
    extras: list[Ref] = []
    for table, chains in actual.items():
        wanted = expected.get(table)
        if wanted is None and not chains:
            extras.append((table, "", f"table inet {TABLE_NAMES[table]} (empty)"))
        extras += [
            (table, chain, "(empty chain)")
            for chain, texts in chains.items()
            if not texts and chain not in (wanted or {})
        ]
    return extras


def backend_label(variant: str) -> str:
    return "native nftables" if variant == NATIVE else f"iptables-{variant}"


def render_status_text(report: Status) -> str:
    lines = []
    for family in report.families:
        state = "in sync" if family.in_sync else "DRIFT"
        lines.append(f"{family.family} ({backend_label(family.variant)}): {state}")
        lines += [f"  missing  {table.value} {chain}: {text}" for table, chain, text in family.missing]
        lines += [f"  extra    {table.value} {chain}: {text}" for table, chain, text in family.extra]
        for (table, chain, expected), (_, _, live) in family.changed:
            lines += [f"  changed  {table.value} {chain}: {live}", f"     want  {table.value} {chain}: {expected}"]
        if family.foreign:
            lines.append("  foreign rules (not ours, left alone):")
            lines += [f"    {table.value} {chain}: {text}" for table, chain, text in family.foreign]
    lines.append("routing: " + ("in sync" if not report.routing else "DRIFT"))
    lines += [f"  would {change}" for change in report.routing]
    return "\n".join(lines) + "\n"


def render_status_json(report: Status) -> str:
    def ref(item: Ref) -> dict[str, str]:
        return {"table": item[0].value, "chain": item[1], "rule": item[2]}

    document = {
        "in_sync": report.in_sync,
        "families": [
            {
                "family": family.family,
                "variant": family.variant,
                "in_sync": family.in_sync,
                "missing": [ref(item) for item in family.missing],
                "extra": [ref(item) for item in family.extra],
                "changed": [{"expected": ref(want), "live": ref(have)} for want, have in family.changed],
                "foreign": [ref(item) for item in family.foreign],
            }
            for family in report.families
        ],
        "routing": {"in_sync": not report.routing, "changes": report.routing},
    }
    return json.dumps(document, indent=2) + "\n"
