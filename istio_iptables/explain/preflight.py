"""``preflight``: what an apply would do here and whether it can, without applying anything.

Per family: the iptables variant detection would choose and why; every table, match and target the plan
needs, probed in a scratch chain that is deleted again (with the kernel module that provides it); the
foreign rules already in the built-in chains where ours would be appended, which packets meet first. Then
IPv6: whether the namespace has addresses the flags leave uncaptured. And the locks an apply would take.
"""

from __future__ import annotations

import json
import os

from istio_iptables.apply import iptables_copies, namespace_lock_path, observe, xtables_environment
from istio_iptables.backends import nft as native
from istio_iptables.backends.restore import payload_features
from istio_iptables.capture.config import Config
from istio_iptables.capture.model import BUILTIN_CHAINS, NFT_TABLE_NAMES, Family, Plan
from istio_iptables.capture.plan import usable_ipv6
from istio_iptables.errors import ApplyError
from istio_iptables.explain.status import NATIVE, backend_label
from istio_iptables.host import netns
from istio_iptables.host.hostfacts import local_addresses
from istio_iptables.records import field, mutable_record
from istio_iptables.render.nft import BASE_CHAINS, render_nft
from istio_iptables.render.restore import render_restore
from istio_iptables.state import foreign_entries, own_entries


@mutable_record
class FamilyCheck:
    family: str
    variant: str = ""
    reason: str = ""
    error: str = ""
    features: list[tuple[str, bool]] = field(default_factory=list)
    preceding: list[str] = field(default_factory=list)
    """Foreign rules that packets meet before ours, as 'table chain: rule'."""

    @property
    def ok(self) -> bool:
        return not self.error and all(present for _, present in self.features)


@mutable_record
class Preflight:
    families: list[FamilyCheck]
    uncaptured_ipv6: list[str]
    locks: list[str]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.families)


def preflight(config: Config, plan: Plan) -> Preflight:
    environment = xtables_environment()
    if config.native_nftables:
        checks = {check.family: check for check in native_checks(plan, environment)}
        return Preflight(list(checks.values()), _uncaptured_ipv6(plan), _locks(checks, environment))
    checks = {family.label: FamilyCheck(family.label) for family in plan.families}
    try:
        observations = observe(config, plan, environment)
    except ApplyError as error:
        for check in checks.values():
            check.error = str(error)
        observations = []
    for seen in observations:
        family = seen.target.family
        if family not in plan.families:
            continue
        check = checks[family.label]
        check.variant, check.reason = seen.iptables.variant.value, seen.iptables.reason
        needed = payload_features(render_restore(seen.target))
        check.features = [(feature.label, present) for feature, present in seen.iptables.probe(needed)]
        appended = {(rule.table, rule.chain) for rule in seen.target.rules if rule.position is None}
        for table, state in seen.live.items():
            check.preceding += [
                f"{table.value} {entry.chain}: {entry.text}"
                for entry in foreign_entries(state)
                if entry.chain in BUILTIN_CHAINS and (table, entry.chain) in appended
            ]
    return Preflight(list(checks.values()), _uncaptured_ipv6(plan), _locks(checks, environment))


def native_checks(plan: Plan, environment: dict[str, str]) -> list[FamilyCheck]:
    """--native-nftables: the nft binary and the kernel's nf_tables (one listing), every kernel feature the
    transaction needs (probed in a scratch table that is never visible), the hooked chains of other tables
    that packets meet before ours, and any iptables copy of our rules that an apply would remove."""
    check = FamilyCheck("inet", NATIVE)
    try:
        nft = native.detect()
        script = render_nft(plan)
    except (ApplyError, ValueError) as error:
        check.error = str(error)
        return [check]
    present = [NFT_TABLE_NAMES[table] for table in nft.saved.tables]
    check.reason = f"nft {nft.saved.version}; " + (
        f"our tables here: {', '.join(present)}" if present else "none of our tables here yet"
    )
    check.features = [(feature.label, ok) for feature, ok in nft.probe(native.features_of(script))]
    ours = [
        (hook.split(" hook ", 1)[1].split()[0], int(hook.rsplit(" ", 1)[1]))
        for table, chains in BASE_CHAINS.items()
        if f"add table inet {NFT_TABLE_NAMES[table]}" in script
        for hook in chains.values()
    ]
    check.preceding = [
        f"{chain.family} {chain.table} {chain.chain}: hook {chain.hook} priority {chain.priority}, {chain.rules} rules"
        for chain in nft.saved.base_chains
        if chain.rules
        and chain.family in ("inet", "ip", "ip6")
        and any(chain.hook == hook and chain.priority <= priority for hook, priority in ours)
    ]
    checks = [check]
    for iptables, live in iptables_copies(environment, nft.saved.iptables_nft, plan):
        count = sum(len(own_entries(state)) for state in live.values())
        reason = f"holds {count} rules of ours, which an apply removes after the nftables transaction"
        checks.append(FamilyCheck(iptables.family.label, iptables.variant.value, reason))
    return checks


def _uncaptured_ipv6(plan: Plan) -> list[str]:
    ipv6 = [str(address) for address in usable_ipv6(tuple(local_addresses()))]
    return ipv6 if Family.V6 not in plan.families else []


def _locks(checks: dict[str, FamilyCheck], environment: dict[str, str]) -> list[str]:
    locks = [f"{namespace_lock_path()} (the byte of this namespace, {netns.identity()})"]
    xtables_lock = environment.get("XTABLES_LOCKFILE") or os.environ.get("XTABLES_LOCKFILE") or "/run/xtables.lock"
    if any(check.variant == "legacy" for check in checks.values()):
        locks.append(f"{xtables_lock} (legacy iptables, --wait)")
    return locks


def render_preflight_text(report: Preflight) -> str:
    lines = []
    for check in report.families:
        if check.error:
            lines.append(f"{check.family}: cannot apply: {check.error}")
            continue
        lines.append(f"{check.family}: {backend_label(check.variant)} ({check.reason})")
        lines += [f"  {'ok     ' if present else 'MISSING'} {label}" for label, present in check.features]
        if check.preceding:
            lines.append("  foreign rules that packets meet before ours:")
            lines += [f"    {rule}" for rule in check.preceding]
    if report.uncaptured_ipv6:
        lines.append("IPv6 addresses here whose traffic the flags leave uncaptured (IPv6 off): ")
        lines += [f"  {address}" for address in report.uncaptured_ipv6]
    lines += [f"lock: {lock}" for lock in report.locks]
    lines.append("an apply would succeed" if report.ok else "an apply would FAIL")
    return "\n".join(lines) + "\n"


def render_preflight_json(report: Preflight) -> str:
    document = {
        "ok": report.ok,
        "families": [
            {
                "family": check.family,
                "variant": check.variant,
                "reason": check.reason,
                "error": check.error,
                "features": [{"feature": label, "present": present} for label, present in check.features],
                "foreign_rules_before_ours": check.preceding,
            }
            for check in report.families
        ],
        "uncaptured_ipv6_addresses": report.uncaptured_ipv6,
        "locks": report.locks,
    }
    return json.dumps(document, indent=2) + "\n"
