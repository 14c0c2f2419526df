"""The rules a flow meets in a namespace, for ``trace --live``: whichever copy holds ours (native nftables,
iptables-nft, iptables-legacy), found whatever the flags say, with the members of the sets its rules look up,
and what else is hooked where the packet passes, which the trace does not walk and so cannot vouch for.

Reads only: one netlink dump of nf_tables' table names, then ``nft -j list ruleset`` if there are tables, and
the ``*-save`` of each iptables variant that may hold rules (and ``ipset save`` when they look sets up).
"""

from __future__ import annotations

from istio_iptables.backends import ipset
from istio_iptables.backends import nft as native
from istio_iptables.backends.restore import LEGACY, NFT, available, detect, holds_legacy_tables
from istio_iptables.capture.model import AddressSet, Family, PortSet, Table
from istio_iptables.errors import ApplyError, HostError
from istio_iptables.host import netlink
from istio_iptables.host.hostfacts import which
from istio_iptables.log import Log
from istio_iptables.records import record
from istio_iptables.state import TableState, holds_own, parse_tables
from istio_iptables.state.nft import NftState

log = Log(__name__)

WALKED_HOOKS = ("PREROUTING", "OUTPUT", "INPUT")
"""The hooks the trace walks (POSTROUTING and FORWARD decide nothing about capture)."""
_IPTABLES_TABLE_NAMES = frozenset(table.value for table in Table) | {"filter", "security"}
_NFT_FAMILY = {Family.V4: "ip", Family.V6: "ip6"}


@record
class Copy:
    """One copy of rules in the namespace, as one family's packets see it."""

    label: str
    """``native nftables``, ``iptables-nft`` or ``iptables-legacy``."""
    tables: dict[Table, TableState]
    sets: tuple[AddressSet | PortSet, ...]
    ours: bool
    """Whether it holds rules of this program."""

    @property
    def nft(self) -> bool:
        return self.label == NATIVE

    def hooked_rules(self, hook: str) -> int:
        """Its rules in the chains ``hook`` runs."""
        return sum(entry.chain == hook for state in self.tables.values() for entry in state.entries)


NATIVE = "native nftables"


@record
class LiveRules:
    """What ``trace`` walks for one family, and what it leaves out."""

    walked: Copy | None
    """The copy holding our rules (else the one holding any rule); None when the namespace has no rules."""
    not_walked: tuple[tuple[str, str], ...]
    """Every other copy or nftables chain with rules at a walked hook: (hook, description)."""


def read(family: Family, environment: dict[str, str]) -> LiveRules:
    """Every copy of rules ``family``'s packets meet in this namespace (``environment``: for the iptables
    binaries, as apply uses them)."""
    state = _nft_state()
    copies: list[Copy] = []
    if state is not None and state.tables:
        copies.append(Copy(NATIVE, state.family_tables(family), state.sets, True))
    for variant in (NFT, LEGACY):
        if variant is LEGACY:
            maybe = holds_legacy_tables(family)
        else:
            maybe = family in state.iptables_nft if state is not None else _nft_tables_exist()
        if not maybe or not available(family, variant):
            continue
        tables = parse_tables(detect(family, variant, environment).saved)
        ours = any(map(holds_own, tables.values()))
        copy = Copy(f"iptables-{variant.value}", tables, _ipset_members(tables), ours)
        if ours or any(map(copy.hooked_rules, WALKED_HOOKS)):
            copies.append(copy)
    walked = next((copy for copy in copies if copy.ours), copies[0] if copies else None)
    others = [
        (hook, f"{copy.label} ({family.label}): {count} rules in {hook}")
        for copy in copies
        if copy is not walked
        for hook in WALKED_HOOKS
        if (count := copy.hooked_rules(hook))
    ]
    return LiveRules(walked, tuple(others + _foreign_chains(state, family)))


def _nft_tables_exist() -> bool:
    try:
        return bool(netlink.nft_tables())
    except HostError:
        return False  # no nf_tables here (or no right to ask): then it holds no rules we could read either


def _nft_state() -> NftState | None:
    """The nftables ruleset, when there are tables at all (one netlink dump says) and nft can list them."""
    if not _nft_tables_exist():
        return None
    binary = which("nft")
    if binary is None:
        log.debug("nf_tables has tables but there is no nft binary: only iptables-nft can show them")
        return None
    return native.read(binary)


def _foreign_chains(state: NftState | None, family: Family) -> list[tuple[str, str]]:
    """Hooked nftables chains with rules that are neither ours nor iptables-nft's (a firewall's...)."""
    if state is None:
        return []
    found = []
    for chain in state.base_chains:
        iptables_nft = chain.family != "inet" and chain.table in _IPTABLES_TABLE_NAMES
        if chain.family not in ("inet", _NFT_FAMILY[family]) or iptables_nft or not chain.rules:
            continue
        if chain.hook.upper() in WALKED_HOOKS:
            where = f"nft table {chain.family} {chain.table}, chain {chain.chain}"
            found.append((chain.hook.upper(), f"{where} (hook {chain.hook}): {chain.rules} rules"))
    return found


def _ipset_members(tables: dict[Table, TableState]) -> tuple[AddressSet | PortSet, ...]:
    """The members of our ipsets, when the rules look sets up; none when ``ipset`` cannot say (the walk
    then calls those rules uncertain)."""
    if not any("--match-set" in entry.text for state in tables.values() for entry in state.entries):
        return ()
    try:
        return tuple(ipset.as_model(ipset.read()))
    except ApplyError as error:
        log.warning("cannot read the sets the rules look up: %s", error)
        return ()
