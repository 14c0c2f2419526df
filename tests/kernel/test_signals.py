"""SIGINT and SIGTERM at random moments of an apply: the namespace ends as it was or as planned, never a mix.

Each round starts from one configuration (REDIRECT, both families) and applies another (TPROXY, both
families, with its ip rules and routes: three steps that must all happen or none), sending one signal at a
random moment between the program's start (once its handlers are in place, which /proc shows) and its end.
Half the signals go to the program alone (kubelet's SIGTERM), half to its process group, children
included (a terminal's Ctrl-C). Afterwards the whole state (both families' rules, ip rules, table-133
routes, ``lo``'s addresses) equals the state before or the planned one; the exit code is 0 (the signal came
too late to matter) with the planned state, or 130/143 with one line saying what happened; never a traceback.
The loop is bounded in rounds and time. iptables-legacy, iptables-nft and native nftables.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.kernel.namespaces import CLI, Pod, iptables_save, needs_root, normalized_save, run_cli

pytestmark = [pytest.mark.kernel, needs_root]

BEFORE = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
BEFORE += ["-d", "15090,15021,15020", "--ipv6"]
PLANNED = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-x", "198.19.0.0/24"]
PLANNED += ["-b", "*", "-d", "15090", "--drop-invalid", "-o", "5432", "--ipv6"]
BACKENDS = {
    "legacy": ["--force-iptables-binary", "legacy"],
    "nft": ["--force-iptables-binary", "nft"],
    "native": ["--native-nftables"],
}
ROUNDS = 16
TIME_LIMIT = 150.0
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def snapshot(pod: Pod, variant: str) -> str:
    """Everything an apply of these flags may change in the namespace."""
    if variant == "native":
        parts = [pod.run(["nft", "list", "ruleset"]).stdout]
    else:
        parts = [normalized_save(iptables_save(pod, variant, family)) for family in (4, 6)]
    for family in ("-4", "-6"):
        parts.append(pod.run(["ip", family, "rule"]).stdout)
        parts.append(pod.run(["ip", family, "route", "show", "table", "133"]).stdout)
    parts.append(pod.run(["ip", "-6", "-o", "addr", "show", "dev", "lo"]).stdout)
    return "\n".join(parts)


def start(pod: Pod, variant: str) -> tuple[subprocess.Popen[str], bool]:
    """The planned apply, in a session of its own (so its process group is it and its children), and
    whether it has put its SIGTERM handler in place (False: it ended, or 30 s passed, without one)."""
    process = subprocess.Popen(
        [CLI, "--network-namespace", pod.name, *BACKENDS[variant], *PLANNED],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with open(f"/proc/{process.pid}/status", encoding="ascii") as status:
                caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            caught = 0
        if caught & SIGTERM_BIT:
            return process, True
        time.sleep(0.001)
    return process, False


@pytest.mark.parametrize("variant", list(BACKENDS))
def test_signals_at_random_moments_leave_the_state_before_or_the_plan(pod: Pod, variant: str) -> None:
    if variant == "native" and shutil.which("nft") is None:
        pytest.skip("native nftables needs the nft binary")
    assert run_cli(pod, [*BACKENDS[variant], *PLANNED]).returncode == 0
    planned = snapshot(pod, variant)
    assert run_cli(pod, [*BACKENDS[variant], *BEFORE]).returncode == 0
    before = snapshot(pod, variant)
    assert before != planned

    # How long a run lasts from its handlers to its end: the span the random moments are drawn from.
    process, handled = start(pod, variant)
    ready = time.monotonic()
    assert process.wait(timeout=60) == 0, process.communicate()[1]
    span = time.monotonic() - ready
    assert handled, "the program never put a SIGTERM handler in place"

    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    outcomes = []
    deadline = time.monotonic() + TIME_LIMIT
    for round_number in range(ROUNDS):
        if time.monotonic() > deadline:
            break
        reset = run_cli(pod, [*BACKENDS[variant], *BEFORE])
        assert reset.returncode == 0, reset.stderr
        assert snapshot(pod, variant) == before
        number = (signal.SIGINT, signal.SIGTERM)[round_number % 2]
        to_group = round_number % 4 >= 2
        process, _ = start(pod, variant)
        time.sleep(rng.uniform(0, span * 1.2))
        sent = process.poll() is None
        if sent:
            (os.killpg if to_group else os.kill)(process.pid, number)
        _, stderr = process.communicate(timeout=60)
        after = snapshot(pod, variant)
        context = f"seed {seed}, round {round_number}, {number.name} to the {'group' if to_group else 'process'}"
        context += f", exit {process.returncode}, stderr:\n{stderr}"
        assert "Traceback" not in stderr, context
        if process.returncode == 0:
            assert after == planned, context
        else:
            assert sent and process.returncode == 128 + number, context
            assert stderr.splitlines()[-1].startswith(f"istio-iptables: stopped by {number.name}: "), context
            assert after in (before, planned), context
        outcomes.append((process.returncode, after == planned))
    assert len(outcomes) >= ROUNDS // 2, f"only {len(outcomes)} rounds in {TIME_LIMIT:.0f} s"
    assert any(code != 0 for code, _ in outcomes), f"no round was interrupted (seed {seed}): {outcomes}"
