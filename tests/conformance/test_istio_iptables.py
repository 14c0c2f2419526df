"""Every case of Istio's iptables goldens, run through the CLI, must print Istio's payloads.

The cases and their flags are read from ``../shared/conformance/istio/CASES.md``; the goldens are compared in
place, never copied. IPv6 addresses are compared in canonical form (Istio's test feeds ``::127.0.0.53``
verbatim, which no resolver would print).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.cases import ABSENT, CASES_FILE, CONFORMANCE, Case, command_line, load_cases
from tests.helpers import canonical_lines, run_cli

pytestmark = pytest.mark.skipif(not CASES_FILE.is_file(), reason=ABSENT)


CASES = load_cases()


def golden_path(case: Case) -> Path:
    return CONFORMANCE / "iptables" / f"{case.name}.golden"


@pytest.mark.parametrize("case", [c for c in CASES if golden_path(c).exists()], ids=lambda case: case.name)
def test_payloads_match_istio(case: Case, tmp_path: Path) -> None:
    args = command_line(case, tmp_path)
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
