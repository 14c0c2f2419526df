"""Every case of Istio's iptables goldens, run through the CLI, must print Istio's payloads.

The cases and their flags are read from ``../shared/conformance/istio/CASES.md``; the goldens are compared in
place, never copied. IPv6 addresses are compared in canonical form (Istio's test feeds ``::127.0.0.53``
verbatim, which no resolver would print).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import SHARED, canonical_lines, run_cli

CONFORMANCE = SHARED / "conformance" / "istio"
pytestmark = pytest.mark.skipif(
    not (CONFORMANCE / "CASES.md").is_file(), reason=f"Istio's goldens are not there: {CONFORMANCE} is absent"
)


@dataclass(frozen=True)
class Case:
    name: str
    args: list[str]
    env: dict[str, str]
    nameservers: list[str]


def load_cases() -> list[Case]:
    if not (CONFORMANCE / "CASES.md").is_file():
        return []
    text = (CONFORMANCE / "CASES.md").read_text()
    base = shlex.split(re.search(r"^istio-iptables (-n .*)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
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


CASES = load_cases()


def golden_path(case: Case) -> Path:
    return CONFORMANCE / "iptables" / f"{case.name}.golden"


@pytest.mark.parametrize("case", [c for c in CASES if golden_path(c).exists()], ids=lambda case: case.name)
def test_payloads_match_istio(case: Case, tmp_path: Path) -> None:
    args = list(case.args)
    if case.nameservers:
        resolv = tmp_path / "resolv.conf"
        resolv.write_text("".join(f"nameserver {server}\n" for server in case.nameservers))
        args += ["--resolv-conf", str(resolv)]
    command_log = tmp_path / "dry-run.log"
    result = run_cli(args, env={**case.env, "DRY_RUN_FILE_PATH": str(command_log)})
    assert result.code == 0, result.stderr

    golden = golden_path(case).read_text().splitlines()
    payloads = [line for line in golden if line not in ("iptables-save", "ip6tables-save")]
    printed = [line for line in result.stdout.splitlines() if not line.startswith("# ")]
    assert canonical_lines(printed) == canonical_lines(payloads)
    # DRY_RUN_FILE_PATH holds Istio's whole command log, save commands included.
    assert canonical_lines(command_log.read_text().splitlines()) == canonical_lines(golden)


def test_every_case_has_a_golden_and_flags() -> None:
    assert CASES, "no case parsed from CASES.md"
    golden_names = {path.stem for path in (CONFORMANCE / "iptables").glob("*.golden")}
    assert golden_names == {case.name for case in CASES}
