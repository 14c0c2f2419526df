"""The run lock: one byte of one shared file per namespace, so namespaces never wait for each other and no
file is left per namespace; a second holder of the same byte waits, then gives up with a clear error."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from istio_iptables.errors import ApplyError
from istio_iptables.host import locks

HOLD = """
import sys, time
from istio_iptables.host import locks
with locks.held(sys.argv[1], 5, "the lock file", byte=int(sys.argv[2])):
    print("held", flush=True)
    time.sleep(float(sys.argv[3]))
"""


def holder(path: Path, byte: int, seconds: float) -> subprocess.Popen[str]:
    """Another process holding one byte of the file (record locks never conflict within one process)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(byte), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "held\n"
    return process


def test_another_namespace_byte_does_not_wait(tmp_path: Path) -> None:
    path = tmp_path / "istio-iptables.lock"
    other = holder(path, 4026531840, 30)
    try:
        started = time.monotonic()
        with locks.held(str(path), 5, "the lock file", byte=4026531841):
            assert time.monotonic() - started < 1
    finally:
        other.kill()
        other.wait()
    assert sorted(os.listdir(tmp_path)) == ["istio-iptables.lock"]


def test_the_same_namespace_byte_waits_then_times_out(tmp_path: Path) -> None:
    path = tmp_path / "istio-iptables.lock"
    other = holder(path, 1 << 34 | 4026531840, 30)
    try:
        same = locks.held(str(path), 0.3, "the lock file", byte=1 << 34 | 4026531840)
        with pytest.raises(ApplyError, match="another run held the lock file"), same:
            pass
    finally:
        other.kill()
        other.wait()
    with locks.held(str(path), 1, "the lock file", byte=1 << 34 | 4026531840):
        pass  # free again once its holder is gone
