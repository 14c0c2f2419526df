"""The lab's node itself: containerd's CRI answers, a sandbox carries the pod's identity and gets a network
from the node's CNI chain, and clean-up leaves nothing behind, also when the test fails or containerd dies."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys

import pytest

from istio_iptables.cni import cri
from tests.lab import images as lab_images
from tests.lab import node as lab_node
from tests.lab.kubelet import Kubelet

pytestmark = pytest.mark.kernel

PAUSE_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "idle",
        "namespace": "shop",
        "labels": {"app": "idle"},
        "annotations": {"sidecar.istio.io/status": '{"initContainers":["istio-init"]}'},
    },
    "spec": {"containers": [{"name": "idle", "image": lab_images.PAUSE_IMAGE}]},
}


def test_the_runtime_is_containerd_over_cri(lab: lab_node.Node) -> None:
    assert lab.runtime.version().startswith("containerd 1.")


def test_a_sandbox_carries_the_pods_identity_and_a_network_of_the_chain(lab: lab_node.Node) -> None:
    kubelet = Kubelet(lab)
    try:
        pod = kubelet.run_pod(PAUSE_POD)
        (listed,) = [s for s in lab.runtime.list_sandboxes() if s.id == pod.sandbox_id]
        assert (listed.name, listed.namespace, listed.state) == ("idle", "shop", cri.SandboxState.READY)
        assert listed.annotations == PAUSE_POD["metadata"]["annotations"]  # type: ignore[index]
        assert listed.labels["app"] == "idle"
        assert listed.labels["io.kubernetes.pod.uid"] == pod.config.uid
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(lab_node.SUBNET)
        # The pod's namespace is the pause process's, not the node's nor this one's.
        assert os.stat(pod.netns).st_ino not in {
            os.stat("/proc/self/ns/net").st_ino,
            os.stat(f"/run/netns/{lab.netns}").st_ino,
        }
        assert f"inet {pod.ip}/24" in pod.in_netns("ip", "-4", "addr", "show", "eth0").stdout
        assert pod.container("idle").state == cri.ContainerState.RUNNING
    finally:
        kubelet.remove_all()
    assert all(s.id != pod.sandbox_id for s in lab.runtime.list_sandboxes())


def test_clean_up_after_a_failing_test_leaves_nothing() -> None:
    reason = lab_node.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    tag = ""
    with pytest.raises(RuntimeError, match="the test failed"), lab_node.Node() as node:
        tag = node.tag
        node.import_image(lab_images.pause_image().archive)
        Kubelet(node).run_pod(PAUSE_POD)
        assert lab_node.leftovers(tag)  # there is something to clean up
        raise RuntimeError("the test failed")
    assert lab_node.leftovers(tag) == []


def test_clean_up_after_containerd_died_leaves_nothing() -> None:
    """containerd killed: no CRI to remove the sandboxes; shims and pods are found by cgroup and argv."""
    reason = lab_node.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    node = lab_node.Node()
    try:
        node.start()
        node.import_image(lab_images.pause_image().archive)
        pod = Kubelet(node).run_pod(PAUSE_POD)
        pause = pod.pid
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=10)
        assert os.path.exists(f"/proc/{pause}")  # the pod outlives its runtime, as on a node
    finally:
        node.close()
    assert lab_node.leftovers(node.tag) == []


def test_a_stale_node_of_a_killed_run_is_swept() -> None:
    """The sweep tears down a node whose test process is gone (here: a child that started one, then was
    killed with SIGKILL before its clean-up)."""
    reason = lab_node.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    script = (
        "import os, sys\n"
        "from tests.lab import node, images\n"
        "from tests.lab.kubelet import Kubelet\n"
        "from tests.lab.test_node import PAUSE_POD\n"
        "n = node.Node(); n.start(); n.import_image(images.pause_image().archive); Kubelet(n).run_pod(PAUSE_POD)\n"
        "print(n.tag, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=lab_images.ROOT, check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    tag = child.stdout.strip()
    assert lab_node.leftovers(tag)
    assert tag in lab_node.sweep_stale_nodes()
    assert lab_node.leftovers(tag) == []
