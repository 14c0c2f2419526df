"""The thin client and the node agent on containerd's CRI: the build installed by ``cni install
--agent-socket`` (client, bundle, conflist entry, agent file), the agent (``cni agent``) running in the
node's network and mount namespaces as the DaemonSet's agent container does (it sees the pods' network
namespaces where containerd mounts them), and pods started with RunPodSandbox.

While the agent runs, the bundle is moved aside, so each pod below was set up by the agent alone: a captured
pod gets exactly its init container's rules, a pod left alone gets none. Then the agent stops (SIGTERM, its
socket goes) and the bundle is back: pods are still captured, by the client running the bundle.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from istio_iptables.cni import install
from tests.kernel import cnilab
from tests.kernel import test_cni as kernel_cni
from tests.lab import node as lab_node
from tests.lab.test_cni_runtime import (
    CNI,
    DNS_AND_UID,
    INIT_MODE,
    corpus_input,
    init_container,
    pod_tables,
    removed,
    run_init_container,
    run_sandbox,
    workloads,
)

pytestmark = pytest.mark.kernel

frozen_build = kernel_cni.frozen_build  # the fixture, here too
CLI = str(Path(sys.executable).with_name("istio-iptables"))
PLUGIN = cnilab.PLUGIN_NAME
BUNDLE = f"{PLUGIN}.d/{PLUGIN}"


class NodeAgent:
    """``istio-iptables cni agent`` in containerd's network and mount namespaces."""

    def __init__(self, lab: lab_node.Node, socket_path: Path, log: Path) -> None:
        self.socket_path = socket_path
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [*lab.joined(), CLI, "cni", "agent", "--socket", str(socket_path)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.log = log
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert self.process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the agent did not listen within 30 s: {log.read_text()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def agent_node(lab: lab_node.Node, frozen_build: Path) -> Iterator[tuple[lab_node.Node, NodeAgent]]:
    """The session's node with the build installed for an agent and the agent running; put back after."""
    socket_path = lab.paths.top / "istio-iptables-cni" / "agent.sock"
    settings = {"iptables": "nft"}
    agent = None
    try:
        install.install(
            lab.paths.cni_conf, lab.paths.cni_bin, frozen_build / PLUGIN, settings, agent_socket=str(socket_path)
        )
        agent = NodeAgent(lab, socket_path, lab.paths.top / "agent.log")
        yield lab, agent
    finally:
        if agent is not None:
            agent.stop()
        lab_node.remove_sandboxes(lab.runtime)
        install.uninstall(lab.paths.cni_conf, lab.paths.cni_bin)
        lab.use_subnets(lab.subnets)


@contextlib.contextmanager
def bundle_moved_aside(lab: lab_node.Node) -> Iterator[None]:
    """A pod set up meanwhile was set up by the agent: the client's fallback has nothing to run."""
    bundle = lab.paths.cni_bin / BUNDLE
    aside = bundle.with_name(f"{PLUGIN}.aside")
    bundle.rename(aside)
    try:
        yield
    finally:
        aside.rename(bundle)


def captured_like_its_init_container(lab: lab_node.Node, documents: list[Any]) -> None:
    """The pod injected for CNI mode, set up by the plugin, has the tables of the same pod injected for init
    mode, set up by its init container's command (tests/lab/test_cni_runtime.py's comparison)."""
    for init_pod, cni_pod in zip(workloads(documents, [INIT_MODE]), workloads(documents, [CNI]), strict=True):
        captured = run_sandbox(lab, cni_pod["metadata"].get("annotations") or {})
        reference = run_sandbox(lab, init_pod["metadata"].get("annotations") or {})
        try:
            container = init_container(init_pod["spec"])
            assert container is not None
            pid = lab.runtime.sandbox_status(reference).pid
            run_init_container(container, f"/proc/{pid}/ns/net", f"/proc/{pid}/root/etc/resolv.conf")
            tables = pod_tables(lab, captured)
            assert "-A ISTIO_OUTPUT" in tables
            assert tables == pod_tables(lab, reference)
        finally:
            removed(lab, captured, reference)


def wait_for_the_plugin(lab: lab_node.Node) -> None:
    """containerd reloads its conf dir a moment after a change: until a captured pod comes out captured."""
    deadline = time.monotonic() + 30
    while True:
        sandbox = run_sandbox(lab, cnilab.INJECTED)
        captured = "-A ISTIO_OUTPUT" in pod_tables(lab, sandbox)
        removed(lab, sandbox)
        if captured:
            return
        assert time.monotonic() < deadline, "containerd did not load the conflist with the plugin in 30 s"
        time.sleep(0.5)


def test_the_agent_sets_up_pods_exactly_and_without_it_the_bundle_does(
    agent_node: tuple[lab_node.Node, NodeAgent],
) -> None:
    lab, agent = agent_node
    wait_for_the_plugin(lab)
    with bundle_moved_aside(lab):
        for documents in (corpus_input("hello"), list(yaml.safe_load_all(DNS_AND_UID))):
            captured_like_its_init_container(lab, documents)
        alone = run_sandbox(lab, {})
        try:
            assert "ISTIO" not in pod_tables(lab, alone)
        finally:
            removed(lab, alone)
    assert agent.process.poll() is None, agent.log.read_text()

    agent.stop()
    assert agent.process.returncode == 0, agent.log.read_text()
    assert not agent.socket_path.exists()
    assert (lab.paths.cni_bin / install.AGENT_FILE).read_text() == f"{agent.socket_path}\n"  # still pointing
    captured_like_its_init_container(lab, corpus_input("hello"))
