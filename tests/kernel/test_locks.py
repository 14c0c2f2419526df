"""Runs in one namespace never interleave, however each entered it; legacy writes take the system's xtables
lock, as every ``iptables -w`` does; and the locks leave no file per namespace behind."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.namespaces import CLI, Pod, iptables_save, needs_root, normalized_save, run_cli

pytestmark = [pytest.mark.kernel, needs_root]

REDIRECT = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*", "--no-ipv6"]
TPROXY = ["-p", "15002", "-z", "15007", "-u", "1337", "-m", "TPROXY", "-i", "198.19.0.0/16", "-b", "*"]
TPROXY += ["--redirect-dns", "--drop-invalid", "--no-ipv6"]
ROUNDS = 30


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def state(pod: Pod, variant: str) -> str:
    return normalized_save(iptables_save(pod, variant, 4)) + pod.run(["ip", "rule"]).stdout


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_ip_netns_exec_and_network_namespace_runs_never_mix(pod: Pod, variant: str) -> None:
    """Two configurations applied at once, one through ``ip netns exec``, one through --network-namespace:
    each run must see the other's finished state, so the namespace ends as one of them applied it alone."""
    forced = ["--force-iptables-binary", variant]
    clean = {}
    for name, flags in (("redirect", REDIRECT), ("tproxy", TPROXY)):
        assert run_cli(pod, [*flags, *forced]).returncode == 0
        clean[name] = state(pod, variant)
        assert run_cli(pod, [*flags, *forced, "--cleanup-only"]).returncode == 0
    assert clean["redirect"] != clean["tproxy"]
    deadline = time.monotonic() + 300
    for round_ in range(ROUNDS):
        assert time.monotonic() < deadline, f"round {round_}: out of time"
        first, second = (REDIRECT, TPROXY) if round_ % 2 else (TPROXY, REDIRECT)
        processes = [
            subprocess.Popen(
                ["ip", "netns", "exec", pod.name, CLI, *first, *forced],
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "KUBERNETES_SERVICE_HOST": "198.18.255.1"},  # the host guard: this is a pod
            ),
            subprocess.Popen(
                [CLI, "--network-namespace", pod.name, *second, *forced], stderr=subprocess.PIPE, text=True
            ),
        ]
        errors = [process.communicate(timeout=120)[1] for process in processes]
        assert [process.returncode for process in processes] == [0, 0], (round_, errors)
        assert state(pod, variant) in clean.values(), round_


def test_legacy_writes_lose_no_concurrent_iptables_w_append(pod: Pod) -> None:
    """Another program appending with ``iptables -w`` while we apply: every one of its rules stays."""
    pod.run(["iptables-legacy", "-w", "-t", "nat", "-N", "FOREIGN_APPENDS"])
    appends = 400
    script = (
        f"i=0; while [ $i -lt {appends} ]; do "
        "iptables-legacy -w -t nat -A FOREIGN_APPENDS -s 198.19.$((i / 250)).$((i % 250))/32 -j RETURN || exit 1; "
        "i=$((i + 1)); done"
    )
    appender = subprocess.Popen(["ip", "netns", "exec", pod.name, "sh", "-c", script], stderr=subprocess.PIPE)
    try:
        runs, deadline = 0, time.monotonic() + 120
        while appender.poll() is None and time.monotonic() < deadline:
            flags = (REDIRECT, TPROXY)[runs % 2]
            result = run_cli(pod, [*flags, "--force-iptables-binary", "legacy"])
            assert result.returncode == 0, result.stderr
            runs += 1
    finally:
        appender.wait(timeout=120)
    assert appender.returncode == 0
    assert runs >= 2
    saved = iptables_save(pod, "legacy", 4)
    assert saved.count("-A FOREIGN_APPENDS ") == appends, f"{runs} runs"


def test_no_lock_file_per_namespace(tmp_path: Path) -> None:
    """Applies in five namespaces, with /run replaced by an empty directory (in a mount namespace of its
    own): the same files remain whatever the number of namespaces."""
    run = Path(tempfile.mkdtemp(prefix="iit-run-", dir="/tmp"))
    try:
        with Pod.create() as first, Pod.create() as second, Pod.create() as third:
            names = " ".join(pod.name for pod in (first, second, third))
            script = (
                'set -e; mkdir "$RUN/netns"; mount --rbind /run/netns "$RUN/netns"; mount --rbind "$RUN" /run; '
                f"for ns in {names}; do for variant in nft legacy; do "
                f'"$CLI" --network-namespace "$ns" {shlex.join(REDIRECT)} --force-iptables-binary $variant; '
                '"$CLI" --network-namespace "$ns" --cleanup-only; done; done; umount -R /run/netns'
            )
            result = subprocess.run(
                ["unshare", "--mount", "sh", "-c", script],
                env={**os.environ, "RUN": str(run), "CLI": CLI},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert result.returncode == 0, result.stderr
        left = sorted(path.name for path in run.iterdir() if path.name not in ("netns", "mount"))  # mount: utab
        assert left == ["istio-iptables.lock", "xtables.lock"]
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(run)], check=False)
