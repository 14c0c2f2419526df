"""Every case of Istio's nftables goldens, run through the CLI with ``--native-nftables``, must print Istio's
nft transaction line for line.

The flags come from ``../shared/conformance/istio/CASES.md`` (``tests/conformance/cases.py``); the goldens are
compared in place. IPv6 addresses are compared in canonical form, as in the iptables conformance test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.cases import ABSENT, CASES_FILE, CONFORMANCE, Case, command_line, load_nftables_cases
from tests.helpers import canonical_lines, run_cli

pytestmark = pytest.mark.skipif(not CASES_FILE.is_file(), reason=ABSENT)

GOLDENS = CONFORMANCE / "nftables"
CASES = load_nftables_cases()


def golden_path(case: Case) -> Path:
    return GOLDENS / f"{case.name}.golden"


@pytest.mark.parametrize("case", [c for c in CASES if golden_path(c).exists()], ids=lambda case: case.name)
def test_transaction_matches_istio(case: Case, tmp_path: Path) -> None:
    # The base command line already has -n (--dry-run); said again here so the test reads on its own.
    result = run_cli([*command_line(case, tmp_path), "--dry-run", "--native-nftables"], env=case.env)
    assert result.code == 0, result.stderr
    printed = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert canonical_lines(printed) == canonical_lines(golden_path(case).read_text().splitlines())


def test_every_golden_has_a_case() -> None:
    goldens = {path.stem for path in GOLDENS.glob("*.golden")}
    assert goldens, f"no golden in {GOLDENS}"
    assert goldens <= {case.name for case in CASES}
