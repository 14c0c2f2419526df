"""Applying a plan: the order of the side effects, and the undo when one of them fails.

1. Hold this namespace's lock so runs never interleave (the CLI has entered ``--network-namespace``).
2. Per family, detect the iptables variant and read its state (one ``-save``; none where no table exists).
3. Compare our rules there with the plan. In sync: nothing to do. Different: one ``iptables-restore
   --noflush`` per family turns them into the plan, each table in one atomic COMMIT, so no packet ever
   meets a half-written table or a gap in the capture (``--no-reconcile`` refuses instead, as Istio does).
4. Converge TPROXY routing and ``::6``.
5. Remove the copy a ``--native-nftables`` run left (our nftables tables), now that the new one is in.
If a step fails, our rules in every table already changed are put back as they were (no other rule is
named, so one another program added meanwhile stays), and routing changes are undone: the namespace ends
as it started. A SIGINT or SIGTERM while the lock is held stops the run before the first change, or after
the last (or after the undo): never in between (``interrupts``).

``apply_native`` is the same for ``--native-nftables``: one ``nft`` transaction, routing, then the removal of
any iptables copy of our rules (either variant). Switching backends thus never leaves a moment with no
capture: the new copy goes in first, the old one out second. In TPROXY mode no copy may hold its
``CONNMARK --save-mark`` rule while two coexist (``split_save_mark``): the old copy's goes first, before the
new copy (without its own) goes in, and the new copy's is added last, after the old copy is out.
"""

from __future__ import annotations

import grp
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cached_property

from istio_iptables.backends.restore import (
    LEGACY,
    NFT,
    WRITTEN,
    Iptables,
    available,
    detect,
    holds_legacy_tables,
    nft_tables_in_use,
)
from istio_iptables.capture.config import Backend, Config
from istio_iptables.capture.model import (
    BUILTIN_CHAINS,
    NFT_TABLE_NAMES,
    AddressSet,
    Family,
    Plan,
    PortSet,
    Rule,
    RuleSet,
    SaveMark,
    Table,
)
from istio_iptables.errors import ApplyError
from istio_iptables.host import interrupts, locks, netlink, netns, routes
from istio_iptables.host.hostfacts import which
from istio_iptables.log import Log, LogLevel, logs
from istio_iptables.records import field, record, replace
from istio_iptables.render.restore import render_restore
from istio_iptables.state import (
    Chains,
    Layout,
    LayoutDiff,
    Places,
    TableState,
    compare,
    differing_chains,
    drift,
    holds_own,
    live_layout,
    locate,
    own_entries,
    parse_tables,
    plan_places,
    planned_layout,
    saved_as_planned,
)
from istio_iptables.state.changes import render_deletes, render_transition, render_undo, table_changes

TYPE_CHECKING = False  # typing is not imported at run time (records.py says why)
if TYPE_CHECKING:
    from istio_iptables.backends import ipset
    from istio_iptables.backends import nft as native

log = Log(__name__)

LOCK_TIMEOUT = 60.0


class DriftError(ApplyError):
    """Our rules differ from the plan and ``--no-reconcile`` forbids repairing them."""


@record
class Transition:
    iptables: Iptables
    payload: str
    tables: frozenset[Table]
    places: Places = field(default_factory=dict)
    """Where the plan puts our rules in built-in chains: what tells ours apart when undoing this."""
    emptying: frozenset[Table] = frozenset()
    """Tables it changes that the target holds no rule in: on nf_tables, deleted afterwards if left empty."""


def apply(config: Config, plan: Plan) -> None:
    """Make this namespace hold exactly the plan (or, with ``--cleanup-only``, nothing of ours)."""
    started = time.monotonic()
    environment = xtables_environment()
    with namespace_lock(), interrupts.held():
        native_copy = netlink.own_nft_tables()
        switching = bool(native_copy) and config.reconcile and not config.cleanup_only and which("nft") is not None
        held, marks = split_save_mark(plan) if switching else (plan, Plan(()))
        observations = observe(config, held, environment)
        if config.cleanup_only:
            observations += stray_copies(observations, environment, held)
        transitions = plan_transitions(config, observations)
        if native_copy and not (config.reconcile or config.cleanup_only):
            names = ", ".join(NFT_TABLE_NAMES[table] for table in native_copy)
            raise DriftError(
                f"nftables tables of a --native-nftables run are present ({names}) and --no-reconcile "
                "forbids removing them"
            )
        # TPROXY switch: the old copy's save-mark out first, the new copy's in last (README, "Switching").
        old, unmarked = None, ""
        if marks.rulesets:
            from istio_iptables.backends import nft as native  # noqa: PLC0415 (only to switch backends)
            from istio_iptables.state.nft import render_deletes as nft_deletes  # noqa: PLC0415

            old = native.detect()
            unmarked = nft_deletes(old.saved, saves_mark)
        finish = [
            Transition(seen.iptables, render_restore(ruleset), frozenset({Table.MANGLE}), places(seen.live))
            for seen in observations
            if (ruleset := marks.ruleset(seen.target.family))
        ]
        routing = routes.read()
        sets = set_changes(config, () if config.cleanup_only else plan.sets, transitions)
        drift = sets.drift() if sets and not (config.reconcile or config.cleanup_only) else []
        if drift:
            raise DriftError(
                "live sets differ from the plan and --no-reconcile forbids repairing them:\n" + "\n".join(drift)
            )
        attempted: list[Transition] = []
        undo: list[routes.Step] = []
        native_changed = False
        interrupts.checkpoint()
        try:
            # Sets first, so no rule meets a missing or half-filled set; stale ones only once unused.
            if sets:
                sets.fill_in()
            if old and unmarked:
                old.apply(unmarked)
                native_changed = True
            for transition in transitions:
                # A refused restore may still have committed the tables before the refused one.
                attempted.append(transition)
                transition.iptables.restore(transition.payload)
            undo = routes.converge(plan, routing, cleanup=config.cleanup_only)
            if sets:
                sets.drop_out()
            if native_copy:
                from istio_iptables.backends.nft import delete_tables  # noqa: PLC0415 (only to switch backends)

                native_changed = delete_tables(native_copy) or native_changed
            for transition in finish:
                attempted.append(transition)
                transition.iptables.restore(transition.payload)
        except ApplyError as error:
            routes.undo(undo)
            # The old copy back first, then the new one out: capture never stops.
            notes = [restore_native(old)] if old and native_changed else []
            notes += rollback_notes(attempted)
            try:
                if sets:
                    sets.put_back()
            except ApplyError as failure:
                notes.append(f"ROLLBACK FAILED for the sets: {failure}")
            raise ApplyError(f"{error} ({'; '.join(notes) or 'nothing was changed'})") from None
        emptied = delete_emptied_tables(attempted)
    if logs(LogLevel.INFO):
        changed = {transition.iptables.family for transition in transitions}
        lines = [
            line
            for seen in observations
            if seen.target.family in changed
            for line in _changed_tables(seen.expected, seen.actual, _iptables_label(seen.iptables))
        ]
        lines += emptied
        lines += sets.report() if sets else []
        _report(config, started, lines, changed=bool(transitions or native_copy or (sets and sets.changes)))


def _changed_tables(expected: Layout, actual: Layout, label: Callable[[Table], str]) -> list[str]:
    """One line per table that changed, named by ``label``."""
    return [change.describe(label(change.table)) for change in table_changes(expected, actual)]


def _iptables_label(iptables: Iptables) -> Callable[[Table], str]:
    return lambda table: f"{iptables.family.label} {table.value} (iptables-{iptables.variant.value})"


def _nft_label(table: Table) -> str:
    return f"nftables inet {NFT_TABLE_NAMES[table]}"


def _report(config: Config, started: float, lines: list[str], changed: bool) -> None:
    """What changed, then the time the whole apply (or clean-up) took: the lines an init container leaves."""
    for line in lines:
        log.info("%s", line)
    took = (time.monotonic() - started) * 1000
    if changed and not lines:
        log.info("rules already as planned, rewritten (--force-apply) in %.0f ms", took)
    elif changed:
        log.info("%s in %.0f ms", "cleaned up" if config.cleanup_only else "applied", took)
    elif config.cleanup_only:
        log.info("nothing of ours here; nothing to change (took %.0f ms)", took)
    else:
        log.info("rules already as planned; nothing to change (took %.0f ms)", took)


def set_changes(
    config: Config, planned: tuple[AddressSet | PortSet, ...], transitions: list[Transition]
) -> ipset.Changes | None:
    """What this run does to our ipsets; None, with no process and no ipset code loaded, unless the plan has
    some, rules being replaced look some up, or a clean-up may find some."""
    referenced = any("--match-set ISTIO_" in transition.iptables.saved for transition in transitions)
    if not (planned or referenced or (config.cleanup_only and which("ipset") is not None)):
        return None
    from istio_iptables.backends import ipset  # noqa: PLC0415 (most plans have no sets)

    return ipset.changes(planned)


def apply_native(config: Config, plan: Plan) -> None:
    """``--native-nftables``: make our three ``inet`` tables hold exactly the plan (or, with ``--cleanup-only``,
    delete them) in one nft transaction, converge routing, then remove any iptables copy of our rules."""
    from istio_iptables.backends import nft as native  # noqa: PLC0415 (an iptables apply needs none of it)
    from istio_iptables.state import nft as nft_state  # noqa: PLC0415

    started = time.monotonic()
    environment = xtables_environment()
    with namespace_lock(), interrupts.held():
        nft = native.detect()
        copies = iptables_copies(environment, nft.saved.iptables_nft, plan)
        switching = bool(copies) and config.reconcile and not config.cleanup_only
        held, marks = split_save_mark(plan) if switching else (plan, Plan(()))
        target = None if config.cleanup_only else held
        try:
            expected, actual = nft_state.planned_layout(target, group_id), nft.saved.layout(group_id)
            changes = expected != actual or config.force_apply
            script = nft_state.render_transition(target, nft.saved) if changes else ""
            finish = nft_state.render_appends(plan, held) if marks.rulesets else ""
        except ValueError as error:  # a plan with no nftables form (a table or a mark mask Istio's lacks)
            raise ApplyError(f"--native-nftables: {error}") from None
        if not (config.reconcile or config.cleanup_only):
            _refuse_native_drift(expected, actual, bool(nft.saved.tables), copies)
        # TPROXY switch: the old copy's save-mark out first, the new copy's in last (README, "Switching").
        unmarks = [unmark(iptables, live) if marks.rulesets else (None, live) for iptables, live in copies]
        transitions = [
            Transition(iptables, payload, tables, places(live), emptying=tables)
            for (iptables, _), (_, live) in zip(copies, unmarks, strict=True)
            for payload in [render_transition(RuleSet(iptables.family, ()), live)]
            for tables in [touched(payload)]
        ]
        routing = routes.read()
        committed, attempted, undo = False, list[Transition](), []
        interrupts.checkpoint()
        try:
            for first, _ in unmarks:
                if first:
                    attempted.append(first)
                    first.iptables.restore(first.payload)
            if script:
                nft.apply(script)
                committed = True
                log.info("nftables: committed one transaction of %d commands", script.count("\n"))
            undo = routes.converge(plan, routing, cleanup=config.cleanup_only)
            for transition in transitions:
                # The old copy goes only now that the new one is in: capture never stops.
                attempted.append(transition)
                transition.iptables.restore(transition.payload)
            if finish:
                nft.apply(finish)
                committed = True
        except ApplyError as error:
            notes = rollback_notes(attempted)
            if undo:
                routes.undo(undo)
                notes.append("routing restored")
            if committed:
                notes.append(restore_native(nft))
            raise ApplyError(f"{error} ({'; '.join(notes) or 'nothing was changed'})") from None
        emptied = delete_emptied_tables(attempted)
    if logs(LogLevel.INFO):
        lines = _changed_tables(expected, actual, _nft_label) if script else []
        for iptables, live in copies:
            lines += _changed_tables({}, live_layout(live, None), _iptables_label(iptables))
        lines += emptied
        _report(config, started, lines, changed=bool(script or transitions))


def split_save_mark(plan: Plan) -> tuple[Plan, Plan]:
    """TPROXY's ``CONNMARK --save-mark`` rules apart: the plan without them, and them alone. While two copies
    of the capture coexist, the one the kernel runs second would save the mark the first one's TPROXY set
    (``mark 1337 -> RETURN``, then ``mark 1337 -> save-mark``), so neither may hold that rule. Nothing is
    split (the second plan is empty) when one of them is not the last rule of its chain: only then can it
    be added last, on its own."""
    marks = [tuple(rule for rule in ruleset.rules if saves_mark(rule)) for ruleset in plan.rulesets]
    last = all(
        [other for other in ruleset.rules if (other.table, other.chain) == (rule.table, rule.chain)][-1] is rule
        and rule.position is None
        for ruleset, rules in zip(plan.rulesets, marks, strict=True)
        for rule in rules
    )
    if not any(marks) or not last:
        return plan, Plan(())
    held = tuple(
        RuleSet(ruleset.family, tuple(rule for rule in ruleset.rules if rule not in rules))
        for ruleset, rules in zip(plan.rulesets, marks, strict=True)
    )
    alone = tuple(RuleSet(ruleset.family, rules) for ruleset, rules in zip(plan.rulesets, marks, strict=True) if rules)
    return replace(plan, rulesets=held), Plan(alone)


def saves_mark(rule: Rule) -> bool:
    return isinstance(rule.target, SaveMark)


def unmark(iptables: Iptables, live: dict[Table, TableState]) -> tuple[Transition | None, dict[Table, TableState]]:
    """An iptables copy's save-mark rules: the restore deleting them (None: it has none), and its tables
    without them (what the removal of the rest starts from)."""
    mangle = live.get(Table.MANGLE, TableState())
    found = [
        entry
        for entry in own_entries(mangle)
        if entry.chain in BUILTIN_CHAINS and entry.rule is not None and saves_mark(entry.rule)
    ]
    if not found:
        return None, live
    kept = TableState(mangle.chains, [entry for entry in mangle.entries if entry not in found], mangle.places)
    first = Transition(iptables, render_deletes(Table.MANGLE, found), frozenset({Table.MANGLE}), places(live))
    return first, {**live, Table.MANGLE: kept}


def restore_native(nft: native.Nft) -> str:
    """Put our nftables tables back as ``nft`` listed them; returns the note for the error."""
    try:
        nft.restore(nft.saved)
    except ApplyError as failure:
        return f"ROLLBACK FAILED for nftables: {failure}"
    return "nftables tables restored"


def _refuse_native_drift(expected: Layout, actual: Layout, tables_exist: bool, copies: list[Copy]) -> None:
    """--no-reconcile: our tables differing from the plan, or an iptables copy of our rules, is drift."""
    problems = []
    if expected != actual and tables_exist:
        lines = drift(expected, actual)
        lines += [f"table inet {NFT_TABLE_NAMES[t]} (not in the plan)" for t in actual if t not in expected]
        problems.append("nftables:\n" + "\n".join(lines))
    for iptables, live in copies:
        count = sum(len(own_entries(state)) for state in live.values())
        tables = ", ".join(table.value for table, state in live.items() if holds_own(state))
        label = f"{iptables.family.label} (iptables-{iptables.variant.value})"
        problems.append(f"{label}: {count} rules of ours in {tables}, a copy an iptables run left")
    if problems:
        raise DriftError(
            "live rules differ from the plan and --no-reconcile forbids repairing them:\n" + "\n".join(problems)
        )


Copy = tuple[Iptables, dict[Table, TableState]]
"""An iptables copy of our rules: the variant of one family holding them, and its parsed tables."""


def iptables_copies(environment: dict[str, str], nft_families: Iterable[Family], plan: Plan) -> list[Copy]:
    """Our rules in iptables, per variant and family (those an iptables run of the plan's flags would have
    written included): what a switch to native nftables removes. Looked for only where they can be: legacy
    where the kernel lists a legacy table (no process), nft where the nft listing showed an iptables-nft
    table with a rule or an ``ISTIO_*`` chain."""
    copies: list[Copy] = []
    nft_families = set(nft_families)
    for variant in (LEGACY, NFT):
        for family in Family:
            maybe = holds_legacy_tables(family) if variant is LEGACY else family in nft_families
            if not maybe or not available(family, variant):
                continue
            iptables = detect(family, variant, environment)
            live = locate(parse_tables(iptables.saved), reference_places(plan, family))
            if any(map(holds_own, live.values())):
                copies.append((iptables, live))
    return copies


def stray_copies(observations: list[Observation], environment: dict[str, str], plan: Plan) -> list[Observation]:
    """Our rules in the iptables variant the observations did not choose (a run forced to the other variant
    left them): a clean-up removes them in the same run."""
    chosen = {(seen.target.family, seen.iptables.variant) for seen in observations}
    nft_families = [family for family in Family if nft_tables_in_use(family) is not False]
    return [
        Observation(iptables, RuleSet(iptables.family, ()), live)
        for iptables, live in iptables_copies(environment, nft_families, plan)
        if (iptables.family, iptables.variant) not in chosen
    ]


def delete_emptied_tables(transitions: list[Transition]) -> list[str]:
    """On nf_tables, the chains and tables our rules needed are deleted again once they hold nothing, so the
    ruleset is as before us (legacy x_tables cannot unload a table); what was deleted, a line per family for
    the log. Only a warning when this fails: they are empty, packets pass them untouched."""
    lines = []
    for transition in transitions:
        if transition.iptables.variant is NFT and transition.emptying:
            family = transition.iptables.family
            from istio_iptables.backends.nft import delete_emptied  # noqa: PLC0415 (iptables-nft clean-ups only)

            try:
                deleted = delete_emptied(family, sorted(transition.emptying, key=lambda table: table.value))
            except (ApplyError, ValueError) as error:
                log.warning("%s: tables left empty stay: %s", family.label, error)
                continue
            if deleted:
                lines.append(f"{family.label}: deleted what our rules left empty: {deleted}")
    return lines


@record
class Observation:
    """One family: its iptables, the rules it should hold, and what it holds."""

    iptables: Iptables
    target: RuleSet
    live: dict[Table, TableState]

    @cached_property
    def expected(self) -> Layout:
        return planned_layout(self.target.rules, group_id)

    @cached_property
    def actual(self) -> Layout:
        return live_layout(self.live, group_id)

    @cached_property
    def differing(self) -> Chains:
        """Our chains whose rules differ from the plan. The common case costs no parsing: the save's text
        against the plan spelled as iptables-save prints it. Only chains whose texts differ are parsed and
        compared as rules."""
        as_saved = differing_chains(saved_as_planned(self.target.rules, group_id), live_layout(self.live, None))
        if not as_saved:
            return as_saved
        planned = planned_layout(self.target.rules, group_id, as_saved)
        return differing_chains(planned, live_layout(self.live, group_id, as_saved))

    @cached_property
    def in_sync(self) -> bool:
        return not self.differing

    @cached_property
    def difference(self) -> LayoutDiff:
        """What differs, by rule (for status): only the differing chains are compared."""
        only = self.differing
        return compare(planned_layout(self.target.rules, group_id, only), live_layout(self.live, group_id, only))


def observe(config: Config, plan: Plan, environment: dict[str, str]) -> list[Observation]:
    """Every family's state next to its target: the plan's rules, or none for a clean-up. A family the plan
    leaves out is looked at too (stale rules of an earlier configuration), when its iptables exists."""
    families = [
        family for family in Family if family in plan.families or available(family, config.force_iptables_binary)
    ]
    observations = []
    for family in families:
        planned = plan.ruleset(family)
        target = RuleSet(family, ()) if config.cleanup_only or planned is None else planned
        # Without root, reading a legacy table creates it: read those the plan writes, or for a clean-up,
        # every table ours can be in.
        tables = WRITTEN if config.cleanup_only else frozenset(rule.table for rule in target.rules)
        try:
            iptables = _detect(config, family, environment, tables)
        except ApplyError:
            if family in plan.families:
                raise
            log.debug("%s: no usable iptables, so no stale rules to remove", family.label)
            continue
        live = locate(parse_tables(iptables.saved), reference_places(plan, family))
        observations.append(Observation(iptables, target, live))
    return observations


def reference_places(plan: Plan, family: Family) -> Places:
    """Where the plan of the given flags puts our rules in built-in chains; for a clean-up too, where it
    tells ours apart as Istio's clean-up does (its flags name what it removes)."""
    planned = plan.ruleset(family)
    return plan_places(planned.rules if planned else (), group_id)


def places(live: dict[Table, TableState]) -> Places:
    return {table: state.places for table, state in live.items()}


def touched(payload: str) -> frozenset[Table]:
    """The tables a restore payload changes."""
    return frozenset(table for table in Table if f"* {table.value}\n" in payload)


def plan_transitions(config: Config, observations: list[Observation]) -> list[Transition]:
    """What each family needs; raises DriftError (nothing changed) if repair is needed but not allowed."""
    transitions, drifts = [], []
    for seen in observations:
        if seen.in_sync and not config.force_apply:
            continue
        if (
            not seen.in_sync
            and any(map(holds_own, seen.live.values()))
            and not (config.reconcile or config.cleanup_only)
        ):
            label = f"{seen.target.family.label} ({seen.iptables.variant.value})"
            drifts.append(f"{label}:\n" + "\n".join(drift(seen.expected, seen.actual)))
            continue
        payload = render_transition(seen.target, seen.live)
        tables = touched(payload)
        emptying = tables - {rule.table for rule in seen.target.rules}
        transitions.append(Transition(seen.iptables, payload, tables, places(seen.live), emptying))
    if drifts:
        raise DriftError(
            "live rules differ from the plan and --no-reconcile forbids repairing them:\n" + "\n".join(drifts)
        )
    return transitions


def _detect(config: Config, family: Family, environment: dict[str, str], tables: frozenset[Table]) -> Iptables:
    if config.backend is Backend.LIBIPTC:
        from istio_iptables.backends import libiptc  # noqa: PLC0415 (python-iptables is an optional extra)

        return libiptc.detect(family, environment)
    return detect(family, config.force_iptables_binary, environment, tables)


def rollback_notes(attempted: list[Transition]) -> list[str]:
    """Put our rules back as they were in every table a restore changed, naming no other rule (another
    program may have added one meanwhile: it stays); one note per family put back."""
    notes = []
    for transition in reversed(attempted):
        iptables = transition.iptables
        try:
            before = locate(parse_tables(iptables.saved), transition.places)
            now = locate(parse_tables(iptables.save()), transition.places)
            payload = "".join(
                render_undo(table, before.get(table, TableState()), now.get(table, TableState()))
                for table in sorted(transition.tables, key=lambda table: table.value)
            )
            if payload:
                iptables.restore(payload)
                notes.append(f"{iptables.family.label} rules restored")
        except ApplyError as error:
            notes.append(f"ROLLBACK FAILED for {iptables.family.label}: {error}")
    return notes


def group_id(group: int | str) -> int | str:
    """Group names as the kernel stores them: iptables resolves a name to its id when it reads a rule."""
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return group


SYSTEM_XTABLES_LOCK = "/run/xtables.lock"


def xtables_environment() -> dict[str, str]:
    """Legacy iptables takes the system's xtables lock (``XTABLES_LOCKFILE``, else /run/xtables.lock), as
    every other writer of legacy tables does (``iptables -w``): a legacy write replaces a whole table, so
    two writers in one namespace under different locks lose each other's rules. Only where that lock
    cannot be opened at all (not root, no ``XTABLES_LOCKFILE``) does legacy get one in our lock directory."""
    if "XTABLES_LOCKFILE" in os.environ or _can_open(SYSTEM_XTABLES_LOCK):
        return {}
    return {"XTABLES_LOCKFILE": os.path.join(_lock_directory(), "xtables.lock")}


def namespace_lock_path() -> str:
    """One file for every namespace (each run locks the byte of its own namespace): in /run, else beside
    the xtables lock (the image's emptyDir), else in the temporary directory."""
    if os.access("/run", os.W_OK):
        return RUN_LOCK
    xtables_lock = os.environ.get("XTABLES_LOCKFILE")
    if xtables_lock:
        return f"{xtables_lock}.istio-iptables"
    return os.path.join(_lock_directory(), os.path.basename(RUN_LOCK))


RUN_LOCK = "/run/istio-iptables.lock"


@contextmanager
def namespace_lock() -> Iterator[None]:
    """Serialise runs in one namespace, however each entered it: read state, decide and write must not
    interleave with another run. Keyed by the namespace's identity, not by a name or a path to it."""
    with locks.held(
        namespace_lock_path(),
        LOCK_TIMEOUT,
        "the lock file",
        "; point XTABLES_LOCKFILE at a writable directory",
        byte=netns.identity(),
    ):
        yield


def _can_open(path: str) -> bool:
    """Whether iptables could open (or create) the lock file, without creating it."""
    if os.path.exists(path):
        return os.access(path, os.R_OK)
    return os.access(os.path.dirname(path), os.W_OK | os.X_OK)


def _lock_directory() -> str:
    if os.access("/run", os.W_OK):
        return "/run"
    import tempfile  # noqa: PLC0415 (with shutil and random, 3 ms of start-up that only this case needs)

    return tempfile.gettempdir()
