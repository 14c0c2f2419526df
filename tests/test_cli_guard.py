"""The guard against changing the host's own network: without --network-namespace, outside Kubernetes,
applying (or cleaning up) in what may be the machine's own namespace is refused (kernel tests: a container,
the machine, an unreadable /proc/1, in tests/kernel/test_host_guard.py).

These tests never reach the kernel: ``apply.apply`` is replaced by a recorder that fails the test if called,
so a broken guard cannot change this machine's network.
"""

from __future__ import annotations

import os

import pytest

from istio_iptables import apply as apply_module
from istio_iptables.capture.config import Config
from istio_iptables.capture.model import Plan
from istio_iptables.host import netns
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


HOST_NET, HOST_PID, POD_NET, POD_PID = netns.INITIAL_NET_NAMESPACE, netns.INITIAL_PID_NAMESPACE, 0xF0000123, 0xF0000456
OLD_KERNEL_HOST_NET = 0xF0000098
"""Before Linux 6.18 the machine's own network namespace had a dynamic number like any other."""


@pytest.mark.parametrize(
    ("net", "pid", "pid1_net", "doubt"),
    [
        (HOST_NET, HOST_PID, HOST_NET, "the machine's own network namespace"),
        (HOST_NET, POD_PID, POD_NET, "the machine's own network namespace"),  # --network host, own PID ns
        (OLD_KERNEL_HOST_NET, HOST_PID, OLD_KERNEL_HOST_NET, "the network namespace of the machine's PID 1"),
        (OLD_KERNEL_HOST_NET, HOST_PID, PermissionError(13, "Permission denied"), "cannot read /proc/1/ns/net"),
        (POD_NET, HOST_PID, PermissionError(13, "Permission denied"), "cannot read /proc/1/ns/net (Permission"),
        (POD_NET, HOST_PID, OLD_KERNEL_HOST_NET, None),  # ip netns exec on a host
        (POD_NET, POD_PID, POD_NET, None),  # a container: its PID 1 shares its network
        (POD_NET, POD_PID, PermissionError(13, "Permission denied"), None),  # its /proc/1 is not the machine's
    ],
)
def test_host_namespace_doubt(
    monkeypatch: pytest.MonkeyPatch, net: int, pid: int, pid1_net: int | OSError, doubt: str | None
) -> None:
    inodes: dict[str, int | OSError] = {"/proc/self/ns/net": net, "/proc/self/ns/pid": pid, "/proc/1/ns/net": pid1_net}

    def stat(path: str) -> os.stat_result:
        inode = inodes[path]
        if isinstance(inode, OSError):
            raise inode
        return os.stat_result((0, inode, 0, 0, 0, 0, 0, 0, 0, 0))

    monkeypatch.setattr(netns.os, "stat", stat)
    found = netns.host_namespace_doubt()
    assert found == doubt if doubt is None else (found is not None and doubt in found)


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
