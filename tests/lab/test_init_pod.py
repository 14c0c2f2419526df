"""The project's init container pod (deploy/istio-init-pod.yaml, the image built from the Dockerfile) on a real
runtime: istio-init (non-root, file capabilities, read-only root, the lock on an emptyDir) exits 0, the rules in
the pod's namespace are the plan of its args, and real connections of the app reach the proxy container."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.lab import node as lab_node
from tests.lab.conftest import LabImages
from tests.lab.kubelet import Pod
from tests.lab.workloads import CLIENT, REMOTE, connect, idle_command, proxy_command, wait_for_log, with_programs

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
POD = ROOT / "deploy" / "istio-init-pod.yaml"
ISTIO_IPTABLES = Path(sys.prefix, "bin", "istio-iptables")


def status(pod: Pod, args: list[str]) -> subprocess.CompletedProcess[str]:
    """``istio-iptables ARGS status`` in the pod's namespace: exit 0 when its rules are the plan of ARGS, the
    plan ``--dry-run`` renders (iptables-save prints the same rules in its own token order, with ``-m tcp``:
    status compares them parsed, rule by rule)."""
    argv = [str(ISTIO_IPTABLES), "--network-namespace", pod.netns, *args, "status"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_the_init_container_pod_captures_an_apps_real_traffic(
    lab: lab_node.Node, images: LabImages, run_pod: Callable[..., Pod]
) -> None:
    document: dict[str, Any] = yaml.safe_load(POD.read_text())
    (init,) = document["spec"]["initContainers"]
    assert init["image"] == images.init
    spec = with_programs(document, images.init, {"hello": idle_command(), "istio-proxy": proxy_command(15001, 15006)})
    pod = run_pod(spec)
    assert pod.exit_code("istio-init") == 0, pod.logs("istio-init")

    in_sync = status(pod, init["args"])
    assert in_sync.returncode == 0, in_sync.stdout + in_sync.stderr
    other_port = ["-p", "15002", *init["args"][2:]]  # the same args but the proxy's port: not what is there
    assert init["args"][:2] == ["-p", "15001"]
    assert status(pod, other_port).returncode == 1

    wait_for_log(pod, "istio-proxy", "listening")
    # Outbound: the app's connection (UID 65534) to an address nothing routes reaches the proxy's 15001.
    assert connect(pod, "hello", REMOTE, 80) == f"proxy:15001 original_dst={REMOTE}:80 from={pod.ip}"
    # The proxy's own connections (UID 1337) are left alone: nothing answers them.
    assert connect(pod, "istio-proxy", REMOTE, 80).startswith("error: ")
    # Inbound: a connection from the node to the pod's port 8080 reaches the proxy's 15006.
    inbound = lab.in_node("python3", "-c", CLIENT, pod.ip, "8080").stdout.strip()
    assert inbound == f"proxy:15006 original_dst={pod.ip}:8080 from={lab.gateway}"
