"""scripts/apt-get-waiting, which the scripts install system packages through: while another run holds apt's
lock it waits, within a bound, instead of failing at once. apt-get here works on package lists, a cache and a
repository of its own in a temporary directory (options given after the script's), so the test holds that
directory's lock and never the machine's."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WAITING = ROOT / "scripts" / "apt-get-waiting"

needs_apt = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None, reason="needs root and apt-get (Debian/Ubuntu)"
)


@pytest.fixture
def apt_dirs(tmp_path: Path) -> list[str]:
    """apt-get options that make an update read a one-package repository in ``tmp_path`` into lists there."""
    for directory in ("lists/partial", "cache/archives/partial", "parts", "repo"):
        (tmp_path / directory).mkdir(parents=True)
    (tmp_path / "lists" / "lock").touch()
    (tmp_path / "repo" / "Packages").write_text("Package: example\nVersion: 1\nArchitecture: all\n\n")
    (tmp_path / "sources.list").write_text(f"deb [trusted=yes] file:{tmp_path / 'repo'} ./\n")
    return [
        *("-o", f"Dir::State::Lists={tmp_path / 'lists'}", "-o", f"Dir::Cache={tmp_path / 'cache'}"),
        *(
            "-o",
            f"Dir::Etc::sourcelist={tmp_path / 'sources.list'}",
            "-o",
            f"Dir::Etc::sourceparts={tmp_path / 'parts'}",
        ),
        *("-o", "APT::Sandbox::User=root"),
    ]


@pytest.fixture
def held_lists_lock(tmp_path: Path, apt_dirs: list[str]) -> Iterator[int]:
    """The lock another ``apt-get update`` would hold (apt takes it with fcntl); the descriptor, to release."""
    descriptor = os.open(tmp_path / "lists" / "lock", os.O_RDWR)
    fcntl.lockf(descriptor, fcntl.LOCK_EX)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def start(apt_dirs: list[str], bound: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(WAITING), "-qq", *apt_dirs, "update"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "APT_LOCK_SECONDS": bound},
    )


@needs_apt
def test_an_update_waits_for_the_lists_lock(apt_dirs: list[str], held_lists_lock: int, tmp_path: Path) -> None:
    """apt-get alone gives up at once (exit 100), with or without DPkg::Lock::Timeout."""
    alone = subprocess.run(
        ["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=60", *apt_dirs, "update"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert alone.returncode == 100
    assert "Could not get lock" in alone.stderr
    waiting = start(apt_dirs, "120")
    try:
        time.sleep(3)
        assert waiting.poll() is None, waiting.communicate()
        fcntl.lockf(held_lists_lock, fcntl.LOCK_UN)
        _, errors = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
        waiting.wait()
    assert waiting.returncode == 0, errors
    assert any("example" in path.name or "Packages" in path.name for path in (tmp_path / "lists").iterdir())


@needs_apt
def test_the_wait_is_bounded(apt_dirs: list[str], held_lists_lock: int) -> None:
    waiting = start(apt_dirs, "1")
    try:
        _, errors = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
        waiting.wait()
    assert waiting.returncode == 100
    assert errors.splitlines()[-1] == (
        "scripts/apt-get-waiting: another package manager run held its lock for 1 s; try again later"
    )


@pytest.mark.parametrize("script", ["test", "demo", "bench"])
def test_the_scripts_install_through_it(script: str) -> None:
    text = (ROOT / "scripts" / script).read_text()
    assert "scripts/apt-get-waiting" in text
    runs_apt_get = re.compile(r"(^|[;&|(]|\bthen|\bdo|\belse)\s*([A-Z_]+=\S*\s+)*apt-get\s", re.MULTILINE)
    assert not runs_apt_get.search(text), f"scripts/{script} runs apt-get itself"
