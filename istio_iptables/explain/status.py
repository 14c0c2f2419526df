"""``status``: the live rules of a namespace against the plan of the given flags. Reads only."""

from __future__ import annotations

import json
from functools import partial

from istio_iptables.apply import Observation, group_id, iptables_copies, observe, stray_copies, xtables_environment
from istio_iptables.backends import ipset
from istio_iptables.backends import nft as native
from istio_iptables.capture.config import Config
from istio_iptables.capture.model import NFT_TABLE_NAMES, Plan, Table
from istio_iptables.errors import ApplyError
from istio_iptables.host import netlink, routes
from istio_iptables.host.hostfacts import which
from istio_iptables.records import field, record
from istio_iptables.state import Layout, compare, foreign_entries, holds_own, live_layout, own_entries
from istio_iptables.state.nft import planned_layout

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
    holds_ours: bool = False
    """Whether the live rules hold anything of ours (a namespace the capture never reached holds nothing)."""

    @property
    def in_sync(self) -> bool:
        return not (self.missing or self.extra or self.changed)


@record
class Status:
    families: list[FamilyStatus]
    routing: list[str]
    """The routing changes an apply would make (TPROXY ip rules and routes, ``::6``)."""
    sets: list[str] = field(default_factory=list)
    """How our ipsets (``--match-sets`` with iptables) differ from the plan's; native sets are in the layout."""
    uses_sets: bool = False
    """Whether the plan or the live rules use our ipsets (only then is there a sets line)."""

    @property
    def in_sync(self) -> bool:
        return all(family.in_sync for family in self.families) and not self.routing and not self.sets

    @property
    def holds_ours(self) -> bool:
        """Whether any family holds a rule, chain or table of ours: the namespace was captured, by whatever plan."""
        return any(family.holds_ours for family in self.families)


def status(config: Config, plan: Plan) -> Status:
    routing = [description for description, _, _ in routes.changes(plan, routes.read(), config.cleanup_only)]
    if config.native_nftables:
        return Status(native_status(config, plan), routing)
    environment = xtables_environment()
    observations = observe(config, plan, environment)
    families = [
        report
        for report in (
            *map(partial(_family_status, plan=plan), observations),
            *map(_stray_copy, stray_copies(observations, environment, plan)),
        )
        if report is not None
    ]
    planned_sets = () if config.cleanup_only else plan.sets
    referenced = any("--match-set ISTIO_" in seen.iptables.saved for seen in observations)
    uses_sets = bool(planned_sets) or referenced or (config.cleanup_only and which("ipset") is not None)
    sets = ipset.differences(planned_sets, ipset.read()) if uses_sets else []
    return Status(families + native_copy_status(), routing, sets, uses_sets)


def _family_status(seen: Observation, *, plan: Plan) -> FamilyStatus | None:
    """One family's rules against the plan; None for a family the flags leave alone (``--no-ipv6``) that
    holds nothing of ours."""
    holds_ours = any(map(holds_own, seen.live.values()))
    if seen.target.family not in plan.families and not holds_ours:
        return None
    difference = seen.difference
    foreign = [
        (table, entry.chain, entry.text) for table, state in seen.live.items() for entry in foreign_entries(state)
    ]
    return FamilyStatus(
        seen.target.family.label,
        seen.iptables.variant.value,
        difference.missing,
        difference.extra,
        difference.changed,
        foreign,
        holds_ours,
    )


def _stray_copy(seen: Observation) -> FamilyStatus | None:
    """Our rules in a family's other iptables variant (nft beside legacy, or the reverse): a copy the kernel
    runs too, which an apply does not look at (a clean-up removes it). None when it holds nothing of ours."""
    layout = live_layout(seen.live, None)
    if not layout:
        return None
    family, variant = seen.target.family.label, seen.iptables.variant.value
    return FamilyStatus(family, variant, [], _every_rule(layout) + _empty_extras({}, layout), [], [], True)


def _every_rule(layout: Layout) -> list[Ref]:
    return [
        (table, chain, text) for table, chains in layout.items() for chain, texts in chains.items() for text in texts
    ]


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
            bool(actual),
        )
    ]
    for iptables, live in iptables_copies(xtables_environment(), nft.saved.iptables_nft, plan):
        extra = [(table, entry.chain, entry.text) for table, state in live.items() for entry in own_entries(state)]
        families.append(FamilyStatus(iptables.family.label, iptables.variant.value, [], extra, [], [], bool(extra)))
    return families


def native_copy_status() -> list[FamilyStatus]:
    """The nftables tables a --native-nftables run left, which an iptables apply removes."""
    tables = netlink.own_nft_tables()
    if not tables:
        return []
    try:
        layout = native.detect().saved.layout(group_id)
    except ApplyError:
        layout = {table: {} for table in tables}
    return [FamilyStatus("inet", NATIVE, [], _every_rule(layout) + _empty_extras({}, layout), [], [], True)]


def _empty_extras(expected: Layout, actual: Layout) -> list[Ref]:
    """What a comparison of rules cannot show: a table or chain of ours that the plan lacks and that is empty."""
    extras: list[Ref] = []
    for table, chains in actual.items():
        wanted = expected.get(table)
        if wanted is None and not chains:
            extras.append((table, "", f"table inet {NFT_TABLE_NAMES[table]} (empty)"))
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
    if report.uses_sets:
        lines.append("sets: " + ("in sync" if not report.sets else "DRIFT"))
        lines += [f"  {difference}" for difference in report.sets]
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
        "sets": {"in_sync": not report.sets, "changes": report.sets},
    }
    return json.dumps(document, indent=2) + "\n"
