"""``status``: the live rules of a namespace against the plan of the given flags. Reads only."""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import routes
from .apply import observe, xtables_environment
from .config import Config
from .model import Plan, Table
from .state import compare, own_entries

Ref = tuple[Table, str, str]


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Status:
    families: list[FamilyStatus]
    routing: list[str]
    """The routing changes an apply would make (TPROXY ip rules and routes, ``::6``)."""

    @property
    def in_sync(self) -> bool:
        return all(family.in_sync for family in self.families) and not self.routing


def status(config: Config, plan: Plan) -> Status:
    families = []
    for seen in observe(config, plan, xtables_environment(config)):
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
    routing = [description for description, _, _ in routes.changes(plan, routes.read(), config.cleanup_only)]
    return Status(families, routing)


def render_status_text(report: Status) -> str:
    lines = []
    for family in report.families:
        state = "in sync" if family.in_sync else "DRIFT"
        lines.append(f"{family.family} (iptables-{family.variant}): {state}")
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
