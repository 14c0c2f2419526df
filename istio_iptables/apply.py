"""Applying a plan: the order of the side effects, and the undo when one of them fails.

1. Hold this namespace's lock so runs never interleave (the CLI has entered ``--network-namespace``).
2. Per family, detect the iptables variant and read its state (one ``-save``).
3. Compare our rules there with the plan. In sync: nothing to do. Different: one ``iptables-restore
   --noflush`` per family turns them into the plan, each table in one atomic COMMIT, so no packet ever
   meets a half-written table or a gap in the capture (``--no-reconcile`` refuses instead, as Istio does).
4. Converge TPROXY routing and ``::6``.
If a step fails, every table already changed is restored whole from its save, and routing changes are
undone: the namespace ends as it started.
"""

from __future__ import annotations

import fcntl
import grp
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from . import netns, routes
from .backends.restore import Iptables, available, detect
from .config import Backend, Config
from .errors import ApplyError
from .model import Family, Plan, RuleSet, Table
from .render.restore import render_tables, render_transition, table_text
from .state import Layout, TableState, drift, holds_own, live_layout, parse_tables, planned_layout

log = logging.getLogger(__name__)

LOCK_TIMEOUT = 60.0


class DriftError(ApplyError):
    """Our rules differ from the plan and ``--no-reconcile`` forbids repairing them."""


@dataclass(frozen=True)
class Transition:
    iptables: Iptables
    payload: str
    tables: frozenset[Table]


def apply(config: Config, plan: Plan) -> None:
    """Make this namespace hold exactly the plan (or, with ``--cleanup-only``, nothing of ours)."""
    environment = xtables_environment(config)
    with namespace_lock(environment):
        transitions = plan_transitions(config, plan, environment)
        routing = routes.read()
        attempted: list[Transition] = []
        try:
            for transition in transitions:
                # A refused restore may still have committed the tables before the refused one.
                attempted.append(transition)
                transition.iptables.restore(transition.payload)
            routes.converge(plan, routing, cleanup=config.cleanup_only)
        except ApplyError as error:
            raise ApplyError(f"{error}{rollback(attempted)}") from None
    if not transitions:
        log.info("rules already as planned; nothing to change")


@dataclass(frozen=True)
class Observation:
    """One family: its iptables, the rules it should hold, and what it holds."""

    iptables: Iptables
    target: RuleSet
    live: dict[Table, TableState]
    expected: Layout
    actual: Layout

    @property
    def in_sync(self) -> bool:
        return self.expected == self.actual


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
        try:
            iptables = _detect(config, family, environment)
        except ApplyError:
            if family in plan.families:
                raise
            log.debug("%s: no usable iptables, so no stale rules to remove", family.label)
            continue
        live = parse_tables(iptables.saved)
        expected, actual = planned_layout(target.rules, group_id), live_layout(live, group_id)
        observations.append(Observation(iptables, target, live, expected, actual))
    return observations


def plan_transitions(config: Config, plan: Plan, environment: dict[str, str]) -> list[Transition]:
    """What each family needs; raises DriftError (nothing changed) if repair is needed but not allowed."""
    transitions, drifts = [], []
    for seen in observe(config, plan, environment):
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
        tables = frozenset(table for table in Table if f"* {table.value}\n" in payload)
        transitions.append(Transition(seen.iptables, payload, tables))
    if drifts:
        raise DriftError(
            "live rules differ from the plan and --no-reconcile forbids repairing them:\n" + "\n".join(drifts)
        )
    return transitions


def _detect(config: Config, family: Family, environment: dict[str, str]) -> Iptables:
    if config.backend is Backend.LIBIPTC:
        from .backends import libiptc  # noqa: PLC0415 (python-iptables is an optional extra)

        return libiptc.detect(family, environment)
    return detect(family, config.force_iptables_binary, environment)


def rollback(attempted: list[Transition]) -> str:
    """Put every table a restore changed back exactly as saved; returns what to add to the error."""
    notes = []
    for transition in reversed(attempted):
        iptables = transition.iptables
        try:
            now = iptables.save()
            changed = {
                table for table in transition.tables if table_text(now, table) != table_text(iptables.saved, table)
            }
            if changed:
                iptables.restore(render_tables(iptables.saved, changed), flush=True)
                notes.append(f"{iptables.family.label} rules restored")
        except ApplyError as error:
            notes.append(f"ROLLBACK FAILED for {iptables.family.label}: {error}")
    return f" ({'; '.join(notes)})" if notes else " (nothing was changed)"


def group_id(group: int | str) -> int | str:
    """Group names as the kernel stores them: iptables resolves a name to its id when it reads a rule."""
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return group


def xtables_environment(config: Config) -> dict[str, str]:
    """Working in another namespace, legacy iptables gets a lock of its own instead of the host's
    /run/xtables.lock, so it neither waits for nor blocks the host's writers (kube-proxy, ...)."""
    if not config.network_namespace or "XTABLES_LOCKFILE" in os.environ:
        return {}
    return {"XTABLES_LOCKFILE": os.path.join(_lock_directory(), f"xtables-netns-{netns.current_id()}.lock")}


def namespace_lock_path(environment: dict[str, str]) -> str:
    """Beside the xtables lock when there is one (the emptyDir of the image), else one per namespace."""
    xtables_lock = environment.get("XTABLES_LOCKFILE") or os.environ.get("XTABLES_LOCKFILE")
    if xtables_lock:
        return f"{xtables_lock}.istio-iptables"
    return os.path.join(_lock_directory(), f"istio-iptables-netns-{netns.current_id()}.lock")


@contextmanager
def namespace_lock(environment: dict[str, str]) -> Iterator[None]:
    """Serialise runs in one namespace: read state, decide and write must not interleave with another run."""
    path = namespace_lock_path(environment)
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise ApplyError(
            f"cannot open the lock file {path}: {error.strerror}; point XTABLES_LOCKFILE at a writable directory"
        ) from None
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ApplyError(f"another run held {path} for {LOCK_TIMEOUT:.0f} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(descriptor)


def _lock_directory() -> str:
    return "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()
