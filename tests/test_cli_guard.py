"""The guard against changing the host's own network: without --network-namespace, outside Kubernetes,
applying (or cleaning up) in what may be PID 1's namespace is refused.

These tests never reach the kernel: ``apply.apply`` is replaced by a recorder that fails the test if called,
so a broken guard cannot change this machine's network.
"""

from __future__ import annotations

import pytest

from istio_iptables import apply as apply_module
from istio_iptables import netns
from istio_iptables.config import Config
from istio_iptables.model import Plan
from tests.helpers import run_cli

FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*", "--no-ipv6"]


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    calls: list[Config] = []

    def record(config: Config, plan: Plan) -> None:
        calls.append(config)

    monkeypatch.setattr(apply_module, "apply", record)
    monkeypatch.setattr(netns, "enter", lambda name: None)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return calls


@pytest.mark.parametrize("extra", [[], ["--cleanup-only"], ["--force-apply"]])
def test_refuses_pid1_namespace_outside_kubernetes(applied: list[Config], extra: list[str]) -> None:
    result = run_cli([*FLAGS, *extra])
    assert result.code == 2
    assert "--network-namespace" in result.stderr and "--allow-host-namespace" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert applied == []


def test_unknown_pid1_namespace_counts_as_the_host(applied: list[Config], monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(path: str) -> None:
        raise PermissionError(path)

    monkeypatch.setattr(netns.os, "stat", unreadable)
    assert netns.may_be_pid1_namespace()


@pytest.mark.parametrize(
    ("extra", "env"),
    [
        (["--network-namespace", "pod"], {}),
        (["--allow-host-namespace"], {}),
        ([], {"ALLOW_HOST_NAMESPACE": "true"}),
        ([], {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}),
    ],
)
def test_allowed_in_a_pod_a_named_namespace_or_when_asked(
    applied: list[Config], extra: list[str], env: dict[str, str]
) -> None:
    result = run_cli([*FLAGS, *extra], env=env)
    assert result.code == 0, result.stderr
    assert len(applied) == 1


def test_dry_run_and_skip_rule_apply_change_nothing_and_need_no_permission(applied: list[Config]) -> None:
    assert run_cli([*FLAGS, "--dry-run"]).code == 0
    assert run_cli([*FLAGS, "--skip-rule-apply"]).code == 0
    assert applied == []
