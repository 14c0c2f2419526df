"""The CNI plugin as containerd's CRI runs it (RunPodSandbox, StopPodSandbox, RemovePodSandbox): the rules of
a representative part of Istio's injection corpus equal the init container's, both DELs succeed (the second
without a netns), a bad annotation fails RunPodSandbox naming it and leaves nothing, ten pods start at once.

The plugin (the console script) is in the node's CNI bin dir behind a recorder, a shell script that appends
each call (command, whether a netns and a ``prevResult`` came, the pod's DNS config, the exit code) to a file:
what containerd sent, and what the plugin answered, without changing either. The conflist entry is the one
``cni install`` writes. The full corpus runs on the tests' own runtime (tests/kernel/test_cni_exact.py), and
CHECK there too: containerd 1.6 never sends CHECK.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from istio_iptables.cni import cri, install
from tests.kernel import cnilab
from tests.kernel.test_cni_exact import (
    CNI,
    INIT_MODE,
    corpus_input,
    init_container,
    run_init_container,
    tables,
    workloads,
)
from tests.lab import node as lab_node

pytestmark = pytest.mark.kernel

PLUGIN = "istio-iptables-cni"
CLUSTER_DNS = ("198.18.96.10",)
SEARCHES = ("default.svc.cluster.local",)
CASES = [
    "hello",
    "proxy-override-runas",
    "explicit-security-context",
    "reroute-virtual-interfaces_list",
    "traffic-annotations-empty-includes",
    "status_annotations",
    "native-sidecar-opt-in",
    "init-no-intercept-no-native-sidecar",
    "gateway",
    "hello-host-network-with-ns",
]
"""Cases of the corpus whose settings are the defaults (one conflist for all), chosen to cover the proxy UID,
the interface and port annotations, the status port, native sidecars, and pods left alone."""
DNS_AND_UID = """\
apiVersion: v1
kind: Pod
metadata:
  name: dns
  annotations:
    proxy.istio.io/config: |
      proxyMetadata:
        ISTIO_META_DNS_CAPTURE: "true"
spec:
  containers:
  - {name: app, image: app:1}
  - {name: istio-proxy, image: proxy:1, securityContext: {runAsUser: 1500, runAsGroup: 1500}}
"""
"""DNS capture (servers from the pod's DNS config) and a proxy UID that is not 1337."""


class Recorded:
    """The recorder's file: one JSON object per plugin call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return [json.loads(line) for line in lines]

    def calls(self, container_id: str) -> list[dict[str, Any]]:
        return [call for call in self.all() if call["container"] == container_id]


@pytest.fixture(scope="module")
def node(lab: lab_node.Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[lab_node.Node, Recorded]]:
    """The session's node with the plugin after its bridge, behind the recorder; its network put back after."""
    record = Recorded(tmp_path_factory.mktemp("cni") / "calls.jsonl")
    recorder = lab.paths.cni_bin / PLUGIN
    recorder.write_text(recorder_script(cnilab.CONSOLE_PLUGIN, record.path))
    recorder.chmod(0o755)
    conflist = lab_node.bridge_conflist(lab.subnets)
    plugins = conflist["plugins"]
    assert isinstance(plugins, list)
    plugins.append(install.plugin_entry({"iptables": "nft"}))
    lab.write_conflist(conflist)
    try:
        wait_for_the_plugin(lab, record)
        yield lab, record
    finally:
        lab_node.remove_sandboxes(lab.runtime)
        lab.use_subnets(lab.subnets)
        recorder.unlink(missing_ok=True)


def recorder_script(plugin: Path, log: Path) -> str:
    return f"""#!/bin/sh
input=$(cat)
printf '%s' "$input" | {shlex.quote(str(plugin))}
code=$?
printf '%s' "$input" | python3 -c '
import json, os, sys
stdin = json.load(sys.stdin)
print(json.dumps({{"command": os.environ["CNI_COMMAND"], "container": os.environ["CNI_CONTAINERID"],
    "netns": bool(os.environ.get("CNI_NETNS")), "prev_result": "prevResult" in stdin,
    "runtime_config": stdin.get("runtimeConfig", {{}}), "exit": int(sys.argv[1])}}))' "$code" >>{shlex.quote(str(log))}
exit $code
"""


def wait_for_the_plugin(lab: lab_node.Node, record: Recorded) -> None:
    """containerd reloads its conf dir when a file changes, a moment later: pods wait until it has."""
    deadline = time.monotonic() + 30
    while True:
        sandbox = run_sandbox(lab, {})
        called = record.calls(sandbox)
        lab.runtime.stop_sandbox(sandbox)
        lab.runtime.remove_sandbox(sandbox)
        if called:
            return
        assert time.monotonic() < deadline, "containerd did not load the conflist with the plugin in 30 s"
        time.sleep(0.5)


def run_sandbox(lab: lab_node.Node, annotations: Mapping[str, str], name: str = "") -> str:
    """RunPodSandbox as a kubelet sends it for a pod with ``dnsPolicy: ClusterFirst``."""
    uid = str(uuid.uuid4())
    name = name or f"pod-{uid[:8]}"
    config = cri.SandboxConfig(
        name=name,
        namespace="default",
        uid=uid,
        labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": "default"},
        annotations=dict(annotations),
        hostname=name,
        cgroup_parent=f"{lab.cgroup_parent}/pod{uid}",
        dns_servers=CLUSTER_DNS,
        dns_searches=SEARCHES,
    )
    return lab.runtime.run_sandbox(config)


def pod_tables(lab: lab_node.Node, sandbox: str) -> str:
    netns = lab.runtime.sandbox_status(sandbox).netns_of_pid

    def run(argv: list[str]) -> str:
        return subprocess.run(
            ["nsenter", f"--net={netns}", "--", *argv], capture_output=True, text=True, timeout=30, check=True
        ).stdout

    return tables(run)


def removed(lab: lab_node.Node, *sandboxes: str) -> None:
    """StopPodSandbox and RemovePodSandbox, as a kubelet deletes a pod."""
    for sandbox in sandboxes:
        lab.runtime.stop_sandbox(sandbox)
        lab.runtime.remove_sandbox(sandbox)


def corpus_entries() -> list[Any]:
    entries = [pytest.param(corpus_input(case), id=case) for case in CASES]
    return [*entries, pytest.param(list(yaml.safe_load_all(DNS_AND_UID)), id="dns-capture-and-proxy-uid-1500")]


@pytest.mark.parametrize("documents", corpus_entries())
def test_the_plugin_applies_the_init_containers_rules(
    node: tuple[lab_node.Node, Recorded], documents: list[Any]
) -> None:
    """The same pod in two sandboxes of the node: injected for CNI mode, set up by the plugin; injected for
    init mode, set up by its init container's command (reading the resolv.conf containerd wrote)."""
    lab, record = node
    for init_pod, cni_pod in zip(workloads(documents, [INIT_MODE]), workloads(documents, [CNI]), strict=True):
        captured = run_sandbox(lab, cni_pod["metadata"].get("annotations") or {})
        reference = run_sandbox(lab, init_pod["metadata"].get("annotations") or {})
        try:
            (add,) = [call for call in record.calls(captured) if call["command"] == "ADD"]
            assert add["runtime_config"]["dns"]["Servers"] == list(CLUSTER_DNS)  # containerd 1.6 spells it so
            for sandbox, spec in ((captured, cni_pod["spec"]), (reference, init_pod["spec"])):
                container = init_container(spec)
                if container is not None:
                    pid = lab.runtime.sandbox_status(sandbox).pid
                    run_init_container(container, f"/proc/{pid}/ns/net", f"/proc/{pid}/root/etc/resolv.conf")
            assert pod_tables(lab, captured) == pod_tables(lab, reference)
        finally:
            removed(lab, captured, reference)


def test_both_dels_succeed_the_second_without_a_netns(node: tuple[lab_node.Node, Recorded]) -> None:
    lab, record = node
    sandbox = run_sandbox(lab, cnilab.INJECTED)
    assert "-A ISTIO_OUTPUT" in pod_tables(lab, sandbox)
    removed(lab, sandbox)
    deletes = [call for call in record.calls(sandbox) if call["command"] == "DEL"]
    shape = [(call["netns"], call["prev_result"], call["exit"]) for call in deletes]
    assert shape == [(True, True, 0), (False, False, 0)]
    assert all(cnilab.ANNOTATIONS_CAPABILITY in call["runtime_config"] for call in deletes)


def test_a_bad_annotation_fails_run_pod_sandbox_naming_it_and_leaves_nothing(
    node: tuple[lab_node.Node, Recorded],
) -> None:
    lab, record = node
    bad = {**cnilab.INJECTED, "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"}
    before = {sandbox.id for sandbox in lab.runtime.list_sandboxes()}
    with pytest.raises(cri.CriError) as failure:
        run_sandbox(lab, bad, name="bad-annotation")
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges" in str(failure.value)
    assert "10.0.0.0/33" in str(failure.value)
    assert {sandbox.id for sandbox in lab.runtime.list_sandboxes()} == before
    mine = [call for call in record.all() if call["runtime_config"].get(cnilab.ANNOTATIONS_CAPABILITY) == bad]
    assert [(call["command"], call["exit"]) for call in mine][:2] == [("ADD", 1), ("DEL", 0)]
    assert all(call["exit"] == 0 for call in mine[1:])


def test_ten_pods_created_at_once_each_get_their_rules(node: tuple[lab_node.Node, Recorded]) -> None:
    lab, _ = node
    with ThreadPoolExecutor(10) as pool:
        sandboxes = list(pool.map(lambda number: run_sandbox(lab, cnilab.INJECTED, name=f"many-{number}"), range(10)))
    try:
        found = [pod_tables(lab, sandbox) for sandbox in sandboxes]
        assert "-A ISTIO_OUTPUT" in found[0]
        assert all(table == found[0] for table in found[1:])
        assert len({lab.runtime.sandbox_status(sandbox).ips for sandbox in sandboxes}) == 10
    finally:
        removed(lab, *sandboxes)
