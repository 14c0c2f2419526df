"""Our dry-run outputs for the cases of ``tests/golden/cases.py`` must equal their reviewed snapshots.

On a difference the test shows a unified diff; if the change is intended, run ``scripts/regen-goldens`` and
review the snapshot diff.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from tests.golden.cases import CASES
from tests.helpers import run_cli

GOLDEN = Path(__file__).resolve().parent / "golden"


def test_case_names_are_unique_and_argv_is_host_independent() -> None:
    names = [name for name, _ in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 30
    for name, argv in CASES:
        assert "--dry-run" in argv, name
        assert ("--ipv6" in argv) != ("--no-ipv6" in argv), name
        assert "-u" in argv, name


def test_every_snapshot_has_a_case() -> None:
    names = {name for name, _ in CASES}
    assert sorted(path.stem for path in GOLDEN.glob("*.txt") if path.stem not in names) == []


@pytest.mark.parametrize(("name", "argv"), CASES, ids=[name for name, _ in CASES])
def test_output_matches_snapshot(name: str, argv: list[str]) -> None:
    snapshot = GOLDEN / f"{name}.txt"
    assert snapshot.is_file(), f"no snapshot {snapshot}; run scripts/regen-goldens"
    result = run_cli(argv)
    assert result.code == 0, result.stderr
    expected = snapshot.read_text(encoding="utf-8")
    if result.stdout != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                result.stdout.splitlines(keepends=True),
                fromfile=f"tests/golden/{name}.txt (snapshot)",
                tofile=f"{name} (current output)",
            )
        )
        pytest.fail(f"dry-run output of {name} differs from its snapshot:\n{diff}", pytrace=False)
