"""The native nftables backend (``--native-nftables``): the ``nft`` binary, one transaction per run.

Reading is one process, ``nft -j list ruleset``, which is at once the probe (the binary runs, the kernel has
nf_tables, its version is in the listing) and the state. Writing is one ``nft -f -`` whose transaction the
kernel commits whole or not at all, so a refused script changes nothing and a killed run leaves every table
as before or as planned. A rollback is one more transaction, ``nft -j -f -``, that puts our tables back from
the JSON read before. Kernel features are probed (in a scratch table created and deleted in one
transaction, so nothing is ever visible) only to name what is missing when a script is refused, and by
``preflight``.

The iptables side needs to know only whether our tables exist (``netlink.own_nft_tables``): one netlink
dump, no process, and none of this module.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterable

from istio_iptables.backends.restore import LOSSLESS
from istio_iptables.capture.model import NFT_TABLE_NAMES, Family, Table
from istio_iptables.errors import ApplyError
from istio_iptables.host.hostfacts import which
from istio_iptables.log import Log
from istio_iptables.records import record
from istio_iptables.state.nft import FAMILY, NftState, parse_ruleset, restore_document

log = Log(__name__)

MINIMUM_VERSION = (1, 0, 1)
"""What Istio's knftables needs, and what the transactions here are tested with (``nft -f -`` of add,
flush, delete and insert by index)."""
_TIMEOUT = 60.0
_FAILED_LINE = re.compile(r"^/dev/stdin:(\d+):", re.MULTILINE)
PROBE_TABLE = "istio-proxy-probe"


@record
class Feature:
    """Something a transaction needs from the kernel, with what provides it and a chain and rule using it."""

    label: str
    pattern: str
    """A regular expression finding its use in a script."""
    chain: str
    rule: str


# The probes run in a scratch inet table; each feature's chain is the hook its rules need.
_FILTER_PREROUTING = "type filter hook prerouting priority -150 ;"
_NAT_OUTPUT = "type nat hook output priority -100 ;"
FEATURES = (
    Feature("nf_tables inet tables (nf_tables)", r"add table inet", _FILTER_PREROUTING, "counter return"),
    Feature("nat chains (nft_chain_nat)", r"type nat hook", _NAT_OUTPUT, "counter return"),
    Feature("route chains (nf_tables route hook)", r"type route hook", "type route hook output priority -150 ;", ""),
    Feature("redirect (nft_redir)", r"\bredirect to\b", _NAT_OUTPUT, "meta l4proto tcp redirect to :1"),
    Feature("tproxy (nft_tproxy)", r"\btproxy\b", _FILTER_PREROUTING, "meta l4proto tcp tproxy ip to :1 accept"),
    Feature("socket owner skuid/skgid (nft_meta)", r"\bsk[ug]id\b", _NAT_OUTPUT, "meta skuid 0 meta skgid 0 return"),
    Feature("conntrack state and mark (nft_ct)", r"\bct (state|mark)\b", _FILTER_PREROUTING, "ct state invalid return"),
    Feature("conntrack zones (nft_ct)", r"\bct zone set\b", _FILTER_PREROUTING, "ct zone set 1"),
    Feature("packet mark (nft_meta)", r"\bmark\b", _FILTER_PREROUTING, "meta mark 1 meta mark set 2"),
)


def features_of(script: str) -> list[Feature]:
    """The features a transaction uses."""
    return [feature for feature in FEATURES if re.search(feature.pattern, script)]


@record
class Nft:
    """The nft binary, with the state it listed when detected."""

    binary: str
    saved: NftState

    def apply(self, script: str) -> None:
        """Commit one transaction; refused, it committed nothing. An nft killed by a signal (a Ctrl-C to the
        process group) may have committed its batch before it died, so our tables are then put back as they
        were listed: refused either way, nothing committed."""
        result = _run([self.binary, "-f", "-"], script)
        if result.returncode < 0:
            self.restore(self.saved)
            raise ApplyError(f"nft -f - was killed by signal {-result.returncode}; our tables were put back as listed")
        if result.returncode != 0:
            raise ApplyError(self._refusal(script, result.stderr))

    def read(self) -> NftState:
        return read(self.binary)

    def restore(self, before: NftState) -> None:
        """Put our tables back as ``before`` listed them, in one transaction."""
        present = list(self.read().tables)
        if not present and not before.objects:
            return
        result = _run([self.binary, "-j", "-f", "-"], restore_document(before, present))
        if result.returncode != 0:
            raise ApplyError(f"nft -j -f - failed: {_first_lines(result.stderr)}")

    def probe(self, features: list[Feature]) -> list[tuple[Feature, bool]]:
        """Whether the kernel takes each feature: a scratch table with a rule using it, created and deleted in
        one transaction. The kernel loads and checks the rule's expressions as it is added, so a missing
        module refuses the transaction; nothing is ever visible."""
        results = []
        for feature in features:
            where = f"{FAMILY} {PROBE_TABLE}"
            script = f"add table {where}\nadd chain {where} probe {{ {feature.chain} }}\n"
            script += f"add rule {where} probe {feature.rule}\n" if feature.rule else ""
            script += f"delete table {where}\n"
            results.append((feature, _run([self.binary, "-f", "-"], script).returncode == 0))
        return results

    def _refusal(self, script: str, stderr: str) -> str:
        """The error of a refused transaction: nft's own message (which quotes the line), and for a kernel
        refusal, the features of that line the kernel lacks."""
        message = f"nft -f - failed: {_first_lines(stderr)}"
        failed = _FAILED_LINE.search(stderr)
        lines = script.splitlines()
        if failed and 0 < int(failed.group(1)) <= len(lines):
            line = lines[int(failed.group(1)) - 1]
            if "Error: Could not process rule" in stderr:
                missing = [feature.label for feature, present in self.probe(features_of(line)) if not present]
                if missing:
                    message += "; the kernel lacks " + ", ".join(missing)
        return message


def detect() -> Nft:
    """The nft binary and the namespace's ruleset; ApplyError saying what is missing when either is."""
    binary = which("nft")
    if binary is None:
        raise ApplyError(
            "--native-nftables needs the nft binary (nftables >= 1.0.1) and there is none on PATH: "
            "install nftables, or leave out --native-nftables to use iptables"
        )
    return Nft(binary, read(binary))


def read(binary: str) -> NftState:
    result = _run([binary, "-j", "list", "ruleset"], None)
    if result.returncode != 0:
        raise ApplyError(_listing_error(result.stderr))
    try:
        state = parse_ruleset(result.stdout)
    except ValueError as error:
        raise ApplyError(f"nft -j list ruleset printed no JSON the program can read: {error}") from None
    version = tuple(int(part) for part in re.findall(r"\d+", state.version)[:3])
    if version and version < MINIMUM_VERSION:
        raise ApplyError(f"nft {state.version} is too old for --native-nftables: nftables >= 1.0.1 is needed")
    for table, rule in state.unparsed:
        log.info(
            "nftables: a rule the model cannot express, in %s %s: %s", NFT_TABLE_NAMES[table], rule.chain, rule.text
        )
    return state


def _listing_error(stderr: str) -> str:
    text = _first_lines(stderr)
    if "not supported" in text.lower() or "no such file or directory" in text.lower():
        loaded = os.path.exists("/sys/module/nf_tables")
        hint = "" if loaded else " (no /sys/module/nf_tables: modprobe nf_tables, or build the kernel with it)"
        return f"the kernel offers no nf_tables here{hint}: nft -j list ruleset failed: {text}"
    if "json" in text.lower() and "support" in text.lower():
        return f"this nft was built without JSON support, which --native-nftables needs: {text}"
    if "permitted" in text.lower():
        return f"nft -j list ruleset failed: {text} (CAP_NET_ADMIN is needed)"
    return f"nft -j list ruleset failed: {text}"


def delete_tables(tables: list[Table]) -> bool:
    """Delete some of our tables in one transaction (the copy an earlier --native-nftables run left); False,
    with a warning, when there is no nft binary to do it with."""
    binary = which("nft")
    if binary is None:
        names = ", ".join(NFT_TABLE_NAMES[table] for table in tables)
        log.warning("nftables tables of an earlier --native-nftables run stay (%s): no nft binary here", names)
        return False
    script = "".join(f"delete table {FAMILY} {NFT_TABLE_NAMES[table]}\n" for table in tables)
    result = _run([binary, "-f", "-"], script)
    if result.returncode != 0:
        raise ApplyError(f"nft -f - failed: {_first_lines(result.stderr)}")
    log.info("nftables: deleted %s", ", ".join(NFT_TABLE_NAMES[table] for table in tables))
    return True


def delete_emptied(family: Family, tables: Iterable[Table]) -> str:
    """In these iptables-nft tables, delete the hooked chains that hold no rule and accept, and each table
    left with nothing else: iptables-nft creates them as rules need them, and recreates them so. One
    transaction deletes each chain by name before its table; the kernel refuses to delete a chain that
    holds a rule, so a rule another program added meanwhile makes it change nothing. Returns what it
    deleted, in nft's words ("" for nothing)."""
    binary = which("nft")
    if binary is None:
        log.info("%s: emptied tables stay (no nft binary to delete them with)", family.label)
        return ""
    where = {Family.V4: "ip", Family.V6: "ip6"}[family]
    script = ""
    for table in tables:
        listed = _run([binary, "-j", "list", "table", where, table.value], None)
        if listed.returncode != 0:
            continue  # no such table (any more)
        import json  # noqa: PLC0415 (only this step of a clean-up reads nft's JSON here)

        objects = [item for item in json.loads(listed.stdout).get("nftables", []) if "metainfo" not in item]
        used = {item["rule"]["chain"] for item in objects if "rule" in item}
        chains = [item["chain"] for item in objects if "chain" in item]
        empty = [c["name"] for c in chains if "hook" in c and c.get("policy") == "accept" and c["name"] not in used]
        script += "".join(f"delete chain {where} {table.value} {name}\n" for name in empty)
        if len(objects) == 1 + len(empty):  # the table and its empty chains: nothing else
            script += f"delete table {where} {table.value}\n"
    if script:
        result = _run([binary, "-f", "-"], script)
        if result.returncode != 0:
            raise ApplyError(f"nft -f - failed: {_first_lines(result.stderr)}")
    return script.replace("\n", "; ").strip("; ")


def _first_lines(stderr: str, count: int = 6) -> str:
    lines = [line.rstrip() for line in stderr.strip().splitlines()]
    return "\n".join(lines[:count]) or "no error message"


def _run(arguments: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            arguments, input=stdin, capture_output=True, text=True, errors=LOSSLESS, timeout=_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise ApplyError(f"{arguments[0]} not found: install nftables") from None
    except OSError as error:
        raise ApplyError(f"cannot run {arguments[0]}: {os.strerror(error.errno or errno.EIO)}") from None
    except subprocess.TimeoutExpired:
        raise ApplyError(f"{' '.join(arguments)} did not finish within {_TIMEOUT:.0f} s") from None
