"""Istio's conformance cases, read from ``../shared/conformance/istio/CASES.md``: the flags of each golden.

Shared by the iptables and the nftables conformance tests. The goldens stay where they are; nothing is copied.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import SHARED

CONFORMANCE = SHARED / "conformance" / "istio"
CASES_FILE = CONFORMANCE / "CASES.md"
ABSENT = f"Istio's goldens are not there: {CONFORMANCE} is absent"


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]
    env: dict[str, str]
    nameservers: list[str]


def _base(text: str) -> list[str]:
    return shlex.split(re.search(r"^istio-iptables (-n .*)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]


def load_cases() -> list[Case]:
    """The cases of the table in CASES.md (one per golden of ``iptables/``)."""
    if not CASES_FILE.is_file():
        return []
    text = CASES_FILE.read_text()
    base = _base(text)
    cases = []
    for line in text.splitlines():
        row = re.match(r"\| `([\w-]+)\.golden` \|[^|]*\| (.*) \|$", line)
        if not row:
            continue
        name, settings = row.groups()
        # "(or env ...)" lists equivalent spellings of the same case; the first spelling is the case.
        settings = re.sub(r"\(or .*?\)", "", settings)
        args: list[str] = list(base)
        env: dict[str, str] = {}
        nameservers: list[str] = []
        for segment in re.findall(r"`([^`]*)`", settings):
            if segment.startswith("nameserver "):
                nameservers.append(segment.split()[1])
            elif re.fullmatch(r"[A-Z_]+=.*", segment):
                key, _, value = segment.partition("=")
                env[key] = value
            elif segment.startswith("-") and args == base:
                # Later flag-like segments are prose ("`-d` is ignored because `-b` is not `*`").
                args += shlex.split(segment)
        args.append("--ipv6" if "IPv6 pod" in settings else "--no-ipv6")
        cases.append(Case(name, args, env, nameservers))
    return cases


def load_nftables_cases() -> list[Case]:
    """The table's cases, plus those CASES.md names for ``nftables/`` only, in the sentence form
    "`nftables/<name>.golden` is `<flags>`" (an IPv4 pod, like the base)."""
    if not CASES_FILE.is_file():
        return []
    text = CASES_FILE.read_text()
    cases = load_cases()
    named = {case.name for case in cases}
    for name, flags in re.findall(r"`nftables/([\w-]+)\.golden` is `([^`]*)`", text):
        if name not in named:
            cases.append(Case(name, [*_base(text), *shlex.split(flags), "--no-ipv6"], {}, []))
            named.add(name)
    return cases


def command_line(case: Case, folder: Path) -> list[str]:
    """The case's arguments; its DNS servers, if any, in a resolv.conf written to ``folder``."""
    if not case.nameservers:
        return list(case.args)
    resolv = folder / "resolv.conf"
    resolv.write_text("".join(f"nameserver {server}\n" for server in case.nameservers))
    return [*case.args, "--resolv-conf", str(resolv)]
