"""The host guard with real namespaces: a container outside Kubernetes may apply, the machine may not.

A container is played by ``unshare --pid --fork --mount-proc`` inside a namespace of the lab (entered with
``nsenter``): a PID namespace of its own whose PID 1 is the tool, or a shell that starts it, as with
``docker run --network container:app``. No run gets ``--network-namespace``, so each works where it stands.

The runs that must be refused stand in the machine's own namespace. They get a PATH without iptables, nft
or ipset and REDIRECT flags with ``--no-ipv6`` (no route, no address to add): a broken guard would fail
to find iptables instead of changing anything. The machine's rules are read before and after all the same.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

import pytest

from tests.kernel.netlab import BACKEND_FLAGS, ISTIO_IPTABLES, Lab
from tests.kernel.test_traffic import flags

pytestmark = pytest.mark.kernel

UNSHARE = "/usr/bin/unshare"
NSENTER = "/usr/bin/nsenter"
CONTAINER = [UNSHARE, "--pid", "--fork", "--mount-proc"]
TIMEOUT = 30.0


def run(lab: Lab, argv: Sequence[str], *, path: str | None = None) -> subprocess.CompletedProcess[str]:
    """``argv`` with the lab's xtables lock and outside Kubernetes (no KUBERNETES_SERVICE_HOST)."""
    env = {key: value for key, value in os.environ.items() if key != "KUBERNETES_SERVICE_HOST"}
    env["XTABLES_LOCKFILE"] = lab.env["XTABLES_LOCKFILE"]
    if path is not None:
        env["PATH"] = path
    return subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False)


def tool(variant: str) -> list[str]:
    return [str(ISTIO_IPTABLES), *BACKEND_FLAGS[variant], *flags(), "--no-ipv6"]


def in_pod(lab: Lab, *argv: str) -> list[str]:
    return [NSENTER, f"--net=/run/netns/{lab.pod}", *argv]


def machine_rules() -> str:
    """The rules of the namespace the tests run in, read only."""
    listings = [["iptables-legacy-save"], ["iptables-nft-save"], ["nft", "list", "ruleset"]]
    outputs = [subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False) for argv in listings]
    return "".join(line for out in outputs for line in out.stdout.splitlines(keepends=True) if not line.startswith("#"))


def assert_captured(lab: Lab, variant: str) -> None:
    listing = ["nft", "list", "ruleset"] if variant == "native" else [f"iptables-{variant}-save"]
    saved = lab.sh(lab.pod, listing)
    assert "ISTIO_OUTPUT" in saved or "istio-proxy-nat" in saved, saved


@pytest.mark.parametrize("shape", ["pid1", "child-of-pid1"])
def test_a_container_outside_kubernetes_may_apply(lab: Lab, variant: str, shape: str) -> None:
    before = machine_rules()
    # A shell as PID 1 that runs the tool as its child (no exec), or the tool as PID 1 itself.
    argv = tool(variant) if shape == "pid1" else ["/bin/sh", "-c", '"$@"; exit $?', "sh", *tool(variant)]
    result = run(lab, in_pod(lab, *CONTAINER, *argv))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert_captured(lab, variant)
    assert machine_rules() == before


@pytest.mark.parametrize("container", [False, True], ids=["as-is", "own-pid-namespace"])
def test_the_machines_own_namespace_is_still_refused(lab: Lab, container: bool) -> None:
    """Also from a PID namespace of its own (``docker run --network host``): the network is the machine's."""
    before = machine_rules()
    result = run(lab, [*(CONTAINER if container else []), *tool("nft")], path="/nonexistent")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert "machine's own network namespace" in line
    assert "--network-namespace" in line and "--allow-host-namespace" in line
    assert machine_rules() == before


def test_unreadable_pid1_namespace_is_refused_saying_so(lab: Lab) -> None:
    """In the machine's PID namespace, another network namespace whose /proc/1 cannot be read (hidden here
    by a tmpfs over /proc/1 in a mount namespace of its own): the guard cannot tell, says so and what to pass."""
    script = 'mount -t tmpfs none /proc/1 && exec "$@"'
    argv = [UNSHARE, "--mount", "/bin/sh", "-c", script, "sh", *in_pod(lab, *tool("nft"))]
    result = run(lab, argv)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert "cannot read /proc/1/ns/net (No such file or directory)" in line, line
    assert "--network-namespace" in line and "--allow-host-namespace" in line
    assert "ISTIO" not in lab.sh(lab.pod, ["iptables-nft-save"])
