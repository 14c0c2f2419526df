"""Fixtures of the kernel tests: a fresh lab per test, always torn down; the iptables variant."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers import sigterm_interrupts
from tests.kernel import netlab


@pytest.fixture(scope="session")
def lab_unavailable() -> str | None:
    """Why no lab can be built here (None if one can). Creating a namespace can fail even as root (a
    container without CAP_SYS_ADMIN), so a throwaway lab is built and removed once per session."""
    reason = netlab.missing_prerequisites()
    if reason is None:
        try:
            with netlab.Lab():
                pass
        except (netlab.LabError, OSError, subprocess.SubprocessError) as error:
            reason = f"cannot build a network namespace lab here: {error}"
    return reason


@pytest.fixture(scope="session", autouse=True)
def _kernel_session() -> Iterator[None]:
    """Remove namespaces of killed earlier runs; turn SIGTERM into KeyboardInterrupt so teardown runs."""
    if netlab.missing_prerequisites() is None:
        netlab.sweep_stale_namespaces()
    with sigterm_interrupts():
        yield


@pytest.fixture(params=netlab.VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    reason = netlab.missing_prerequisites(name)
    if reason:
        pytest.skip(reason)
    return name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_failed_key] = report.failed


_failed_key = pytest.StashKey[bool]()


@pytest.fixture
def lab(request: pytest.FixtureRequest, lab_unavailable: str | None) -> Iterator[netlab.Lab]:
    if lab_unavailable:
        pytest.skip(lab_unavailable)
    with netlab.Lab() as built:
        try:
            yield built
        finally:
            if request.node.stash.get(_failed_key, False):
                # Shown with the failure (pytest prints captured output of the teardown section).
                print(built.report())
