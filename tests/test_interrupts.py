"""How SIGINT and SIGTERM stop a run (interrupts.py), each case in a process of its own so the test runner's
handlers stay untouched. The kernel test (tests/kernel/test_signals.py) sends them to real applies."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

PRELUDE = """
import os, signal, sys
from istio_iptables.host import interrupts
from istio_iptables.errors import ApplyError, IstioIptablesError
interrupts.install()
interrupts.start()
def send(number):
    os.kill(os.getpid(), number)
def report(body):
    try:
        body()
        print("completed")
    except IstioIptablesError as error:
        print(f"{error.exit_code} {error}")
"""


def run(script: str, *, ignore_sigint: bool = False) -> subprocess.CompletedProcess[str]:
    # An ignored disposition is inherited across fork and exec. It is set here, around the call, rather than
    # in a preexec_fn: Python code between fork and exec breaks when threads run in this process (gRPC's,
    # once the kubelet lab's tests have run).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if ignore_sigint else None
    try:
        return subprocess.run(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_outside_a_change_the_run_stops_at_once(name: str, code: int) -> None:
    result = run(f"""
        def body():
            send(signal.{name})
            print("not reached")
        report(body)
    """)
    assert result.stdout == f"{code} stopped by {name}: nothing was changed\n", result.stderr


def test_inside_a_change_the_signal_waits_for_its_end() -> None:
    result = run("""
        def body():
            with interrupts.held():
                send(signal.SIGTERM)
                print("change finished")
            print("not reached")
        report(body)
    """)
    assert result.stdout == "change finished\n143 stopped by SIGTERM: the change in progress was completed first\n"


def test_a_failed_change_reports_its_error_and_rollback() -> None:
    result = run("""
        def body():
            with interrupts.held():
                send(signal.SIGINT)
                raise ApplyError("iptables-restore failed (ipv4 rules restored)")
        report(body)
    """)
    assert result.stdout == "130 stopped by SIGINT: iptables-restore failed (ipv4 rules restored)\n"


def test_checkpoint_stops_before_the_first_change() -> None:
    result = run("""
        def body():
            with interrupts.held():
                send(signal.SIGINT)
                print("still reading")
                interrupts.checkpoint()
                print("not reached")
        report(body)
    """)
    assert result.stdout == "still reading\n130 stopped by SIGINT: nothing was changed\n"


def test_after_a_completed_change_the_signal_says_so() -> None:
    result = run("""
        def body():
            with interrupts.held():
                pass
            send(signal.SIGINT)
        report(body)
    """)
    assert result.stdout == "130 stopped by SIGINT: the change was already complete\n"


def test_before_the_run_the_process_ends_with_one_line() -> None:
    result = run("""
        interrupts._process.running = False
        send(signal.SIGTERM)
        print("not reached")
    """)
    assert (result.returncode, result.stdout) == (143, "")
    assert result.stderr == "istio-iptables: stopped by SIGTERM: nothing was changed\n"


def test_once_the_run_has_its_result_signals_wait_and_the_result_stands() -> None:
    result = run("""
        interrupts.finish()
        send(signal.SIGINT)
        send(signal.SIGTERM)
        print("result")
        sys.exit(3)
    """)
    assert (result.returncode, result.stdout, result.stderr) == (3, "result\n", "")


def test_a_signal_the_parent_ignores_stays_ignored() -> None:
    result = run(
        """
        def body():
            send(signal.SIGINT)
            print("ignored")
        report(body)
        """,
        ignore_sigint=True,
    )
    assert result.stdout == "ignored\ncompleted\n", result.stderr
