"""The iptables-restore backend: the legacy or nft variant per family, one restore per family.

Detection (better than Istio's, reference 5.1): the variant that already holds rules in this namespace wins,
else nft, else legacy. Legacy holds nothing when the kernel lists no legacy table for this namespace, which
costs no process to find out. A variant's ``-save`` is both the probe and the state we diff against, so it
runs once. Kernel features are probed only when a restore is refused, to name what is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable

from istio_iptables.capture.config import IptablesVariant
from istio_iptables.capture.model import Family, Table
from istio_iptables.errors import ApplyError, HostError
from istio_iptables.host import interrupts, netlink, netns
from istio_iptables.host.hostfacts import which
from istio_iptables.log import Log
from istio_iptables.records import record

log = Log(__name__)

LEGACY, NFT = IptablesVariant.LEGACY, IptablesVariant.NFT
_LEGACY_TABLES = {Family.V4: "/proc/net/ip_tables_names", Family.V6: "/proc/net/ip6_tables_names"}
_FAILED_LINE = re.compile(r"line (\d+) failed|Error occurred at line: (\d+)")
_TIMEOUT = 60.0
LOSSLESS = "surrogateescape"
"""How the kernel's text is read and written back: its bytes need not be UTF-8 (a foreign rule's comment
may hold any), and every byte must survive a save read and restored."""

# What a rule needs from the kernel, by the spelling of its match or target, with the module providing it.
_FEATURE_PROBES: dict[str, tuple[Table, str, str]] = {
    "owner": (Table.NAT, "-m owner --uid-owner 0 -j RETURN", "xt_owner"),
    "multiport": (Table.NAT, "-p tcp -m multiport --dports 1,2 -j RETURN", "xt_multiport"),
    "conntrack": (Table.MANGLE, "-m conntrack --ctstate INVALID -j RETURN", "xt_conntrack"),
    "mark": (Table.MANGLE, "-m mark --mark 1 -j RETURN", "xt_mark"),
    "connmark": (Table.MANGLE, "-m connmark --mark 1 -j RETURN", "xt_connmark"),
    "REDIRECT": (Table.NAT, "-p tcp -j REDIRECT --to-ports 1", "xt_REDIRECT (nf_nat)"),
    "TPROXY": (Table.MANGLE, "-p tcp -j TPROXY --on-port 1 --tproxy-mark 1/1", "xt_TPROXY (nf_tproxy)"),
    "MARK": (Table.MANGLE, "-j MARK --set-mark 1", "xt_mark"),
    "CONNMARK": (Table.MANGLE, "-j CONNMARK --save-mark", "xt_connmark"),
    "CT": (Table.RAW, "-j CT --zone 1", "xt_CT"),
}
_TABLE_MODULES = {
    Table.NAT: "iptable_nat / nft_chain_nat",
    Table.MANGLE: "iptable_mangle",
    Table.RAW: "iptable_raw",
    Table.FILTER: "iptable_filter",
}
PROBE_CHAIN = "ISTIO_PROBE"
WRITTEN = frozenset({Table.MANGLE, Table.NAT, Table.RAW})
"""The tables rules of ours can be in."""


def command(family: Family, variant: IptablesVariant, tool: str = "") -> str:
    """``iptables-nft-save``, ``ip6tables-legacy-restore``, ``iptables-nft``..."""
    return f"{'ip6tables' if family is Family.V6 else 'iptables'}-{variant.value}" + (f"-{tool}" if tool else "")


@record
class Iptables:
    """One family's iptables, with the state it had when detected."""

    family: Family
    variant: IptablesVariant
    saved: str
    environment: dict[str, str]
    """The environment of every command: XTABLES_LOCKFILE where the system's xtables lock cannot be opened."""
    reason: str = ""
    """Why detection chose this variant."""
    tables: frozenset[Table] = WRITTEN
    """The tables to read one by one where legacy's list of tables cannot be read (not root): reading a
    legacy table creates it, so only those the run needs are read."""

    def restore(self, payload: str) -> None:
        arguments = self._restore_command()
        result = _run(arguments, payload, self.environment)
        if result.returncode != 0:
            raise ApplyError(self._refusal(arguments, payload, result.stderr))

    def save(self) -> str:
        return _save(self.family, self.variant, self.environment, self.tables)

    def _restore_command(self) -> list[str]:
        arguments = [command(self.family, self.variant, "restore"), "--noflush"]
        if self.variant is LEGACY:
            # nft takes no lock; legacy waits for it rather than failing when another writer holds it.
            arguments.append("--wait")
        return arguments

    def _refusal(self, arguments: list[str], payload: str, stderr: str) -> str:
        """The error of a refused restore: the command, the line it refused, and what the kernel lacks."""
        message = f"{' '.join(arguments)} failed: {stderr.strip() or 'no error message'}"
        failed = _FAILED_LINE.search(stderr)
        if failed:
            lines = payload.splitlines()
            number = int(failed.group(1) or failed.group(2))
            if 0 < number <= len(lines):
                message += f"; refused line {number}: {lines[number - 1]}"
                missing = self.missing_features(_table_of_line(lines, number), lines[number - 1])
                if missing:
                    message += "; the kernel lacks " + ", ".join(missing)
        return message

    def missing_features(self, table: Table | None, line: str) -> list[str]:
        """Name what the kernel lacks among the table, matches and targets of one refused line."""
        return [feature.label for feature, present in self.probe(features_of(table, [line])) if not present]

    def probe(self, features: list[Feature]) -> list[tuple[Feature, bool]]:
        """Whether the kernel takes each feature: a rule using it is added to a scratch chain, which is
        deleted again in a second commit of the same restore (a refused rule commits nothing). Each probe
        runs in a namespace of its own where this process may create one, so that not even the table it
        needed stays behind (a legacy table, once there, stays for the namespace's life)."""
        enter_scratch = netns.scratch_entry()
        results = []
        for feature in features:
            payload = (
                f"*{feature.table.value}\n:{PROBE_CHAIN} - [0:0]\n-A {PROBE_CHAIN} {feature.rule}\nCOMMIT\n"
                f"*{feature.table.value}\n:{PROBE_CHAIN} - [0:0]\n-X {PROBE_CHAIN}\nCOMMIT\n"
            )
            with interrupts.held():  # legacy commits the two separately: never stop between them
                taken = _run(self._restore_command(), payload, self.environment, enter_scratch).returncode == 0
            results.append((feature, taken))
        return results


@record
class Feature:
    """Something a rule needs from the kernel, and a rule that uses only it."""

    label: str
    table: Table
    rule: str


def features_of(table: Table | None, lines: list[str]) -> list[Feature]:
    """The table and every match and target the lines use, each once."""
    found = [Feature(f"table {table.value} ({_TABLE_MODULES[table]})", table, "-j RETURN")] if table else []
    used = {name for line in lines for name in re.findall(r"-[mj] (\S+)", line)}
    found += [
        Feature(f"{'target' if name.isupper() else 'match'} {name} ({module})", probe_table, rule)
        for name, (probe_table, rule, module) in _FEATURE_PROBES.items()
        if name in used
    ]
    return found


def payload_features(payload: str) -> list[Feature]:
    """Every feature a whole payload needs, table by table."""
    found: list[Feature] = []
    table: Table | None = None
    lines: list[str] = []
    for line in [*payload.splitlines(), "* "]:
        if line.startswith("*"):
            found += [feature for feature in features_of(table, lines) if feature not in found]
            table = next((t for t in Table if t.value == line[1:].strip()), None)
            lines = []
        else:
            lines.append(line)
    return found


def detect(
    family: Family, forced: IptablesVariant | None, environment: dict[str, str], tables: frozenset[Table] = WRITTEN
) -> Iptables:
    """The iptables to use for one family, and its current state (``tables``: see ``Iptables.tables``)."""
    fresh = not holds_legacy_tables(family) and nft_tables_in_use(family) is False
    if fresh and which(command(family, forced or NFT, "restore")):
        # Nothing holds a rule here yet: the state is known without running a -save.
        reason = "forced with --force-iptables-binary" if forced else "no rules here yet; nft is preferred"
        return Iptables(family, forced or NFT, "", environment, reason, tables)
    if forced is not None:
        saved = _save(family, forced, environment, tables)
        return Iptables(family, forced, saved, environment, "forced with --force-iptables-binary", tables)
    errors = []
    saves: dict[IptablesVariant, str] = {}
    unreadable: IncompatibleTableError | None = None
    for variant in (LEGACY, NFT):
        if variant is LEGACY and not holds_legacy_tables(family):
            continue
        try:
            saves[variant] = _save(family, variant, environment, tables)
        except IncompatibleTableError as error:
            unreadable = error
        except ApplyError as error:
            errors.append(str(error))
    for variant in (LEGACY, NFT):
        if _holds_rules(saves.get(variant, "")):
            reason = "it holds this namespace's rules"
            log.info("%s: using %s: %s", family.label, command(family, variant), reason)
            return Iptables(family, variant, saves[variant], environment, reason, tables)
    if unreadable:
        # Not a reason to fall back to legacy: the nft table may hold our rules, unseen.
        raise unreadable
    if NFT in saves:
        reason = "no variant holds rules here; nft is preferred"
        return Iptables(family, NFT, saves[NFT], environment, reason, tables)
    if LEGACY not in saves and which(command(family, LEGACY, "save")):
        reason = "nft is unusable here: " + ("; ".join(errors) or "not installed")
        return Iptables(family, LEGACY, _save(family, LEGACY, environment, tables), environment, reason, tables)
    raise ApplyError(f"no usable iptables for {family.label}: " + ("; ".join(errors) or "no iptables binary found"))


def available(family: Family, variant: IptablesVariant | None) -> bool:
    candidates = [variant] if variant else [NFT, LEGACY]
    return any(which(command(family, candidate, "save")) for candidate in candidates)


def holds_legacy_tables(family: Family) -> bool:
    """Whether any legacy (x_tables) table exists in this namespace; none means legacy holds no rule.
    Unreadable (the file is root's; a non-root run with capabilities cannot read it) means maybe."""
    try:
        with open(_LEGACY_TABLES[family], encoding="ascii") as names:
            return bool(names.read().strip())
    except PermissionError:
        return True
    except OSError:
        return False


_IPTABLES_NFT_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
_NFPROTO = {Family.V4: 2, Family.V6: 10}


def nft_tables_in_use(family: Family) -> bool | None:
    """Whether nf_tables holds a table iptables-nft would show for this family; None when the kernel
    cannot say (no nf_tables, no permission), which sends detection the long way, through the saves."""
    try:
        tables = netlink.nft_tables(_NFPROTO[family])
    except HostError:
        return None
    return any(name in _IPTABLES_NFT_TABLES for _, name in tables)


def _holds_rules(saved: str) -> bool:
    return any(
        line.startswith("-A ") or (line.startswith(":") and line.split()[1:2] == ["-"]) for line in saved.splitlines()
    )


def _save(
    family: Family, variant: IptablesVariant, environment: dict[str, str], tables: frozenset[Table] = WRITTEN
) -> str:
    arguments = [command(family, variant, "save")]
    result = _run(arguments, None, environment)
    if result.returncode != 0 and variant is LEGACY and "Permission denied" in result.stderr:
        # Legacy save lists tables from a root-only /proc file; without root, name each table the run needs
        # (naming one creates it: the others are left alone).
        named = [_run([*arguments, "-t", table.value], None, environment) for table in Table if table in tables]
        if all(table.returncode == 0 for table in named):
            return "".join(table.stdout for table in named)
    if result.returncode != 0:
        raise ApplyError(f"{arguments[0]} failed: {result.stderr.strip()}")
    incompatible = _INCOMPATIBLE.findall(result.stdout)
    if incompatible:
        raise IncompatibleTableError(
            f"{family.label}: nf_tables table {', '.join(incompatible)} holds rules {arguments[0]} cannot read "
            f'(it prints "Table `{incompatible[0]}\' is incompatible": written with nft, not iptables); our rules '
            "cannot be read or changed safely beside them, so nothing was changed: move those rules to an nft "
            "table of another name (iptables-nft owns the ip and ip6 tables filter, nat, mangle, raw and security)"
        )
    return result.stdout


class IncompatibleTableError(ApplyError):
    """iptables-nft cannot read a table written with ``nft``: its rules (ours among them, maybe) are unknown."""


_INCOMPATIBLE = re.compile(r"^# Table `(\w+)' is incompatible", re.MULTILINE)


def _run(
    arguments: list[str],
    stdin: str | None,
    environment: dict[str, str],
    before_exec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            arguments,
            input=stdin,
            capture_output=True,
            text=True,
            errors=LOSSLESS,
            env={**os.environ, **environment},
            preexec_fn=before_exec,
            timeout=_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise ApplyError(f"{arguments[0]} not found: install iptables (legacy and nft variants)") from None
    except subprocess.TimeoutExpired:
        raise ApplyError(f"{arguments[0]} did not finish within {_TIMEOUT:.0f} s") from None


def _table_of_line(lines: list[str], number: int) -> Table | None:
    for line in reversed(lines[:number]):
        if line.startswith("*"):
            name = line[1:].strip()
            return next((table for table in Table if table.value == name), None)
    return None
