"""Throwaway network namespaces for kernel tests, and the commands the tests run in them.

A Pod is a namespace with lo up and one veth to a peer namespace (198.18.0.2/24 and 2001:db8::2/64); both
are deleted on exit, also when the test fails.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("istio-iptables"))
_counter = itertools.count()

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "iptables-nft-save", "iptables-legacy-save")),
    reason="kernel tests need root, iproute2 and iptables (legacy and nft); scripts/test installs them",
)


@dataclass(frozen=True)
class Pod:
    name: str
    peer: str

    @classmethod
    @contextmanager
    def create(cls) -> Iterator[Pod]:
        number = next(_counter)
        pod = cls(f"iit-{os.getpid()}-{number}", f"iit-{os.getpid()}-{number}-peer")
        try:
            for namespace in (pod.name, pod.peer):
                _ip("netns", "add", namespace)
                _ip("-n", namespace, "link", "set", "lo", "up")
            veth = f"iv{os.getpid() % 100000}x{number}"
            _ip("link", "add", veth, "netns", pod.name, "type", "veth", "peer", "name", "eth0", "netns", pod.peer)
            for namespace, device, last in ((pod.name, veth, 2), (pod.peer, "eth0", 1)):
                _ip("-n", namespace, "addr", "add", f"198.18.0.{last}/24", "dev", device)
                _ip("-n", namespace, "addr", "add", f"2001:db8::{last}/64", "dev", device, "nodad")
                _ip("-n", namespace, "link", "set", device, "up")
            yield pod
        finally:
            for namespace in (pod.name, pod.peer):
                subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)

    def run(self, command: list[str], stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, *command],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command} failed: {result.stderr}")
        return result


def run_cli(pod: Pod, arguments: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real program, entering the pod's namespace itself (--network-namespace)."""
    return subprocess.run(
        [CLI, "--network-namespace", pod.name, *arguments],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def iptables_save(pod: Pod, variant: str, family: int) -> str:
    """The save output without its comment lines (they carry the time) and with policy counters zeroed
    (traffic, not rules, moves them)."""
    binary = f"{'ip6tables' if family == 6 else 'iptables'}-{variant}-save"
    lines = pod.run([binary]).stdout.splitlines()
    return "".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) + "\n" for line in lines if not line.startswith("#"))


def normalized_save(saved: str) -> str:
    """Save output without comments and without tables that hold nothing (legacy keeps a table once used;
    an empty table and no table filter alike)."""
    tables: list[list[str]] = []
    for line in saved.splitlines():
        if line.startswith("#"):
            continue
        if line.startswith("*"):
            tables.append([])
        if tables:
            tables[-1].append(line)
    kept = [
        table
        for table in tables
        if any(line.startswith("-A ") for line in table)
        or any(line.startswith(":") and line.split()[1] != "ACCEPT" for line in table)
    ]
    return "".join(line + "\n" for table in sorted(kept) for line in table)


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], capture_output=True, check=True, timeout=30)


@contextmanager
def as_image_user(pod: Pod) -> Iterator[Callable[[list[str]], subprocess.CompletedProcess[str]]]:
    """Runs of the CLI as the image's user (65532) with NET_ADMIN and NET_RAW as ambient capabilities and the
    xtables lock on a directory of its own (the emptyDir), inside the pod's namespace (no
    --network-namespace: entering one needs CAP_SYS_ADMIN, and an init container is in its pod's already)."""
    lock_directory = Path(tempfile.mkdtemp(prefix="iit-run-", dir="/tmp"))
    try:
        os.chown(lock_directory, 65532, 65532)
        caps = "+net_admin,+net_raw"
        command = ["setpriv", "--reuid", "65532", "--regid", "65532", "--clear-groups"]
        command += ["--inh-caps", f"-all,{caps}", "--ambient-caps", caps, "--bounding-set", f"-all,{caps}"]
        env = ["env", f"XTABLES_LOCKFILE={lock_directory}/xtables.lock", "KUBERNETES_SERVICE_HOST=198.18.255.1"]
        yield lambda arguments: pod.run([*env, *command, CLI, *arguments], check=False)
    finally:
        shutil.rmtree(lock_directory)
