"""The demo README offers as its first command does what README says: it applies the init container's default
flags (nothing added, so no warning), and both requests come back through the proxy. It builds and removes its
own namespaces (tests/kernel/netlab.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.kernel

DEFAULT_FLAGS = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020"


def test_the_demo_applies_the_init_container_s_default_flags(lab_unavailable: str | None) -> None:
    if lab_unavailable:
        pytest.skip(lab_unavailable)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout + done.stderr
    command = next(line for line in done.stdout.splitlines() if line.startswith("$ "))
    assert command.endswith(" " + DEFAULT_FLAGS) and "--no-ipv6" not in command, command
    assert "\twarn\t" not in printed and "\terror\t" not in printed, printed
    assert "PROXY15001|peer:" in done.stdout and "PROXY15006|app:" in done.stdout, done.stdout
