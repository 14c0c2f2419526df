"""The CNI plugin as containerd's CRI runs it (RunPodSandbox, StopPodSandbox, RemovePodSandbox).

CNI mode is exact: for every case of Istio's injection corpus (and a few run again with DNS capture on), the
rules the plugin applies (the pod injected with ``components.cni.enabled=true``, its annotations and DNS
config handed over by containerd, the case's values and mesh config in the plugin's conflist entry) equal
the rules the same pod's ``istio-init`` container applies in init mode (its argv and environment as
``inject`` writes them, reading the resolv.conf containerd wrote), in two sandboxes of the same node. Cases
the injector refuses fail RunPodSandbox the same way. The cases run grouped by their settings: one conflist
per group, rewritten between groups.

Then what a runtime does with the plugin: capture through a proxy (each iptables variant), older spec
versions, the excluded-CIDR annotation, pods left alone, a bad annotation failing RunPodSandbox, both DELs
(the second without a netns), ten pods at once, a list where the plugin comes first, DNS capture with and
without the ``dns`` capability, and the self-contained build on a node without Python (each variant). What
containerd cannot make happen stays on the tests' own runtime (tests/kernel/test_cni.py).

The plugin is in the node's CNI bin dir behind a recorder, a shell script that runs it and appends each call
(command, pod, whether a netns and a ``prevResult`` came, the plugin's settings as it got them, its answer
and exit code, and after a DEL what of ours is left in the pod) to a file: what containerd sent and what the
plugin answered, without changing either. The conflist entry is the one ``cni install`` writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from istio_iptables.cni import cri, install
from istio_iptables.kube.capture import load_settings
from istio_iptables.kube.inject import INIT_CONTAINER, Injector, inject_documents, pod_paths
from istio_iptables.kube.template import parse_config
from tests.conformance.test_istio_inject import CASES, CORPUS
from tests.kernel import cnilab, netlab
from tests.kernel import conftest as kernel_fixtures
from tests.lab import node as lab_node
from tests.lab.conftest import LabImages
from tests.lab.kubelet import Pod
from tests.lab.workloads import CLIENT, connect, idle_command, proxy_command, wait_for_log, with_programs

pytestmark = pytest.mark.kernel

PLUGIN = cnilab.PLUGIN_NAME
CLUSTER_DNS = ("198.18.96.10",)
SEARCHES = ("default.svc.cluster.local",)
REMOTE = "198.18.97.10"
"""An address outside the node that nothing answers: where the app's captured connections go."""
CNI = "components.cni.enabled=true"
INIT_MODE = "components.cni.enabled=false"
"""The same pod in init mode (some cases of the corpus are injected for CNI mode)."""
DNS_CAPTURE = "meshConfig.defaultConfig.proxyMetadata.ISTIO_META_DNS_CAPTURE=true"
EXTRA = [
    ("hello", (DNS_CAPTURE,)),
    ("hello-tproxy", (DNS_CAPTURE,)),
    ("proxy-override-runas", (DNS_CAPTURE,)),
]
"""Cases run again with DNS capture on (the corpus has none): the servers come from the pod's DNS config."""
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
"""DNS capture turned on by the pod's own annotation, and a proxy UID that is not 1337."""
SAVES = ("iptables-nft-save", "ip6tables-nft-save")
DNS_MESH_CONFIG = {"defaultConfig": {"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}}}
RELOAD_TIMEOUT = 30.0
APP = """\
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: default}
spec:
  containers:
  - {name: app, image: app:1, securityContext: {runAsUser: 1000}}
  - {name: istio-proxy, image: proxy:1, securityContext: {runAsUser: 1337, runAsGroup: 1337}}
"""
"""A pod with the annotations of ``cnilab.INJECTED`` added: an app, and the stand-in proxy on 15001/15006."""
APP_PORT = 8080
SERVER = """\
import socket, sys
listener = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    connection, peer = listener.accept()
    connection.sendall(f"server from={peer[0]}\\n".encode())
    connection.close()
"""
"""A server that answers every connection with its peer's address (the stand-in proxy needs a redirect)."""

# Runs after the plugin, with its stdin; argv: the plugin's exit code and its answer. Prints one JSON line.
# After a DEL that had a netns, what of ours is still in the pod: rules of every iptables backend and of
# nftables, and policy routing rules beyond the kernel's three.
LOGGER = """\
import json, os, re, subprocess, sys
stdin = json.load(sys.stdin)
netns = os.environ.get("CNI_NETNS", "")
def run(argv):
    return subprocess.run(["nsenter", "--net=" + netns, *argv], capture_output=True, text=True).stdout.splitlines()
after = None
if os.environ["CNI_COMMAND"] == "DEL" and netns:
    after = [line for tool in ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save",
             "ip6tables-nft-save") for line in run([tool]) if "ISTIO" in line]
    after += [line for line in run(["nft", "list", "ruleset"]) if "istio" in line.lower()]
    after += [line for family in ("-4", "-6") for line in run(["ip", family, "rule"])
              if not re.match(r"^(0|32766|32767):", line)]
try:
    answer = json.loads(sys.argv[2])
except ValueError:
    answer = sys.argv[2]
arguments = dict(item.split("=", 1) for item in os.environ.get("CNI_ARGS", "").split(";") if "=" in item)
record = {
    "command": os.environ["CNI_COMMAND"], "container": os.environ["CNI_CONTAINERID"],
    "pod": arguments.get("K8S_POD_NAME"), "netns": bool(netns), "prev_result": stdin.get("prevResult"),
    "runtime_config": stdin.get("runtimeConfig", {}), "exit": int(sys.argv[1]), "answer": answer, "after": after,
    "library_path": os.environ.get("LD_LIBRARY_PATH", "unset"),
    "config": {key: value for key, value in stdin.items() if key not in ("prevResult", "runtimeConfig")}}
# One write(2) per record: loggers of pods set up at once append to the same file, and print's buffered
# writes of a long record (the plugin's settings with values) could interleave with another's.
os.write(1, (json.dumps(record) + "\\n").encode())
"""


class Recorded:
    """The recorder's file: one JSON object per plugin call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[dict[str, Any]]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        return [json.loads(line) for line in lines]

    def calls(self, container_id: str, command: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.all() if c["container"] == container_id and command in (None, c["command"])]

    def of_pod(self, name: str, command: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.all() if c["pod"] == name and command in (None, c["command"])]


@dataclass
class PluginNode:
    """The session's node with the plugin behind the recorder. :meth:`configure` sets the conflist's entry
    for the plugin (and returns once containerd runs that one); :meth:`use` sets the program the recorder runs."""

    lab: lab_node.Node
    record: Recorded
    folder: Path
    conflist: dict[str, object] | None = None

    def use(self, plugin: Sequence[str], path: Path | None = None) -> None:
        """The recorder runs ``plugin`` (a command: the console script, or the self-contained build behind a
        wrapper), with ``path`` first on its PATH. containerd runs the file anew on every call."""
        logger = self.folder / "logger.py"
        logger.write_text(LOGGER)
        prefix = f"PATH={shlex.quote(str(path))}:$PATH " if path else ""
        recorder = self.lab.paths.cni_bin / PLUGIN
        temporary = recorder.with_suffix(".tmp")
        temporary.write_text(
            "#!/bin/sh\ninput=$(cat)\n"
            f"answer=$(printf '%s' \"$input\" | {prefix}{shlex.join(plugin)})\n"
            "code=$?\nprintf '%s' \"$answer\"\n"
            f'printf \'%s\' "$input" | {shlex.quote(sys.executable)} {shlex.quote(str(logger))} "$code" "$answer"'
            f" >>{shlex.quote(str(self.record.path))}\n"
            "exit $code\n"
        )
        temporary.chmod(0o755)
        temporary.rename(recorder)

    def configure(
        self, settings: Mapping[str, Any], *, version: str = "1.0.0", alone: bool = False, dns: bool = True
    ) -> None:
        """The node's list: the bridge (unless ``alone``), then our entry with ``settings``, at ``version``,
        without the ``dns`` capability if not ``dns``. containerd reloads its conf dir a moment after a
        change: a probe pod's ADD shows when it has."""
        entry = install.plugin_entry(settings)
        if not dns:
            entry["capabilities"] = {cnilab.ANNOTATIONS_CAPABILITY: True}
        conflist = lab_node.bridge_conflist(self.lab.subnets)
        plugins = conflist["plugins"]
        assert isinstance(plugins, list)
        conflist["plugins"] = [entry] if alone else [*plugins, entry]
        conflist["cniVersion"] = version
        if conflist == self.conflist:
            return
        self.lab.write_conflist(conflist)
        expected = {"cniVersion": version, "name": lab_node.NETWORK_NAME, **entry}
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while True:
            name = f"probe-{uuid.uuid4().hex[:8]}"
            # A list where our plugin comes first fails every pod: its ADD is recorded all the same.
            with contextlib.suppress(cri.CriError):
                removed(self.lab, run_sandbox(self.lab, {}, name=name))
            if [call["config"] for call in self.record.of_pod(name, "ADD")] == [expected]:
                self.conflist = conflist
                return
            assert time.monotonic() < deadline, f"containerd did not load {expected} in {RELOAD_TIMEOUT:g} s"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def node(lab: lab_node.Node, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginNode]:
    """The session's node with the plugin (the console script) after its bridge, behind the recorder; its
    network put back after."""
    folder = tmp_path_factory.mktemp("cni")
    plugin_node = PluginNode(lab, Recorded(folder / "calls.jsonl"), folder)
    plugin_node.use([str(cnilab.CONSOLE_PLUGIN)])
    try:
        yield plugin_node
    finally:
        lab_node.remove_sandboxes(lab.runtime)
        lab.use_subnets(lab.subnets)
        (lab.paths.cni_bin / PLUGIN).unlink(missing_ok=True)


variant = kernel_fixtures.variant
"""Each iptables variant (the kernel tests' fixture)."""


@pytest.fixture
def default_node(node: PluginNode) -> PluginNode:
    """The node with the plugin's default settings (nft)."""
    node.configure({"iptables": "nft"})
    return node


def variant_settings(variant: str) -> dict[str, object]:
    """The plugin's settings that pick ``variant``, as an operator writes them."""
    if variant == "native":
        return {"values": {"global": {"nativeNftables": True}}}
    return {"iptables": variant}


def run_sandbox(lab: lab_node.Node, annotations: Mapping[str, str], name: str = "", namespace: str = "default") -> str:
    """RunPodSandbox as a kubelet sends it for a pod with ``dnsPolicy: ClusterFirst``."""
    uid = str(uuid.uuid4())
    name = name or f"pod-{uid[:8]}"
    config = cri.SandboxConfig(
        name=name,
        namespace=namespace,
        uid=uid,
        labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace},
        annotations=dict(annotations),
        hostname=name,
        cgroup_parent=f"{lab.cgroup_parent}/pod{uid}",
        dns_servers=CLUSTER_DNS,
        dns_searches=SEARCHES,
    )
    return lab.runtime.run_sandbox(config)


def in_pod(lab: lab_node.Node, sandbox: str, argv: list[str]) -> str:
    netns = lab.runtime.sandbox_status(sandbox).netns_of_pid
    return subprocess.run(
        ["nsenter", f"--net={netns}", "--", *argv], capture_output=True, text=True, timeout=30, check=True
    ).stdout


def pod_tables(lab: lab_node.Node, sandbox: str) -> str:
    return tables(lambda argv: in_pod(lab, sandbox, argv))


def tables(run: Callable[[list[str]], str]) -> str:
    """A pod's tables (both families) and policy routing, counters and comments left out; ``run`` runs a
    command in the pod's network namespace and returns its output."""
    lines = []
    for tool in SAVES:
        lines += [
            re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in run([tool]).splitlines() if not line.startswith("#")
        ]
    for family in ("-4", "-6"):
        lines += run(["ip", family, "rule"]).splitlines()
    return "\n".join(lines)


def removed(lab: lab_node.Node, *sandboxes: str) -> None:
    """StopPodSandbox and RemovePodSandbox, as a kubelet deletes a pod."""
    for sandbox in sandboxes:
        lab.runtime.stop_sandbox(sandbox)
        lab.runtime.remove_sandbox(sandbox)


def assert_both_dels_passed(
    record: Recorded, sandbox: str, *, left_nothing: bool = True, cached_result: bool = True
) -> None:
    """StopPodSandbox's DEL (netns, and the cached result unless not ``cached_result``: DEL gets it from
    spec 0.4.0 on) and RemovePodSandbox's (neither) passed; the first left no rule in the pod (unless not
    ``left_nothing``)."""
    deletes = record.calls(sandbox, "DEL")
    assert [(call["netns"], call["prev_result"] is not None, call["exit"]) for call in deletes] == [
        (True, cached_result, 0),
        (False, False, 0),
    ]
    if left_nothing:
        assert deletes[0]["after"] == []


# --- the corpus ---------------------------------------------------------------------------------------------


def workloads(documents: list[Any], sets: list[str] | None) -> list[dict[str, Any]]:
    """The workloads of ``documents`` injected with ``sets`` (None: as written), each as the ``metadata`` and
    ``spec`` of its pod."""
    if sets is not None:
        # The corpus's pods bring no proxy: the capture alone is what is compared.
        documents = inject_documents(documents, Injector(load_settings(sets), capture_only=True))
    return pods_of(documents)


def pods_of(documents: list[Any]) -> list[dict[str, Any]]:
    """The ``metadata`` and ``spec`` of each workload's pod in ``documents``."""
    found = []
    for document in _flattened(documents):
        paths = pod_paths(document) if isinstance(document, Mapping) else None
        if paths is not None:
            found.append(
                {key: _at(document, path) or {} for key, path in zip(("metadata", "spec"), paths, strict=True)}
            )
    return found


def corpus_input(case: str) -> list[Any]:
    return list(yaml.safe_load_all((CORPUS / case / "input.yaml").read_text()))


def _flattened(documents: list[Any]) -> Iterator[Any]:
    for document in documents:
        if isinstance(document, Mapping) and document.get("kind") == "List":
            yield from _flattened(document.get("items") or [])
        else:
            yield document


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, Mapping) else None
    return tree


def run_init_container(container: Mapping[str, Any], netns: str, resolv_conf: str) -> None:
    """The init container's command in the pod: its args and env, with the resolv.conf the runtime wrote
    for the pod (as the container sees it: ``/etc/resolv.conf``)."""
    args = container["args"]
    assert args[0] == "istio-iptables"
    argv = [str(netlab.ISTIO_IPTABLES), *args[1:], "--network-namespace", netns]
    argv += ["--resolv-conf", resolv_conf, "--force-iptables-binary", "nft"]
    env = {"PATH": os.environ["PATH"], **{item["name"]: item["value"] for item in container.get("env") or []}}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=90, check=False)
    assert run.returncode == 0, f"{argv}: {run.stderr}"


def init_container(spec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return next((c for c in spec.get("initContainers") or [] if c.get("name") == INIT_CONTAINER), None)


@dataclass(frozen=True)
class Case:
    documents: list[Any]
    sets: tuple[str, ...]
    error: str | None = None
    """The word the injector's refusal names (an ``expect: error`` case of the corpus)."""

    @property
    def plugin_settings(self) -> dict[str, object]:
        """The conflist entry's settings: the values and mesh config the pod would be injected with."""
        settings = load_settings([*self.sets, CNI])
        return {"iptables": "nft", "values": settings.values, "mesh_config": settings.mesh}


def corpus_cases() -> list[Any]:
    """Every case of the corpus, those of :data:`EXTRA` again, and :data:`DNS_AND_UID`, ordered by their
    plugin settings so that the conflist changes once per group."""
    cases = []
    for name, extra in [(name, ()) for name in CASES] + [entry for entry in EXTRA if entry[0] in CASES]:
        spec = json.loads((CORPUS / name / "case.json").read_text())
        case = Case(corpus_input(name), (*spec["sets"], *extra), spec.get("error"))
        cases.append(pytest.param(case, id=name + ("+dns-capture" if extra else "")))
    cases.append(pytest.param(Case(list(yaml.safe_load_all(DNS_AND_UID)), ()), id="dns-capture-and-proxy-uid-1500"))
    return sorted(cases, key=lambda param: json.dumps(param.values[0].plugin_settings, sort_keys=True))


@pytest.mark.skipif(not CASES, reason=f"Istio's injection goldens are not there: {CORPUS} is absent")
@pytest.mark.parametrize("case", corpus_cases())
def test_the_plugin_applies_the_init_containers_rules(node: PluginNode, case: Case) -> None:
    """The same pod in two sandboxes of the node: injected for CNI mode, set up by the plugin; injected for
    init mode, set up by its init container's command (a pod injected before keeps its istio-init whatever
    the mode). Both DELs of the captured pod pass, the first leaving nothing."""
    node.configure(case.plugin_settings)
    if case.error is not None:
        _refused_alike(node, case)
        return
    init_pods = workloads(case.documents, [*(item for item in case.sets if item != CNI), INIT_MODE])
    cni_pods = workloads(case.documents, [*case.sets, CNI])
    same_rules(node, init_pods, cni_pods)


CUSTOM_PROXY = {
    "nativeSidecar": True,
    "listeners": {"outbound": 16001, "inbound": 16006},
    "proxyPorts": [9000],
    "proxy": {
        "name": "istio-proxy",
        "image": "proxy:1",
        "ports": [{"containerPort": 9901}, {"containerPort": 8081}],
        "securityContext": {"runAsUser": 2001, "runAsGroup": 2002},
    },
    "tproxy": {"securityContext": {"runAsUser": 0, "capabilities": {"add": ["NET_ADMIN"]}}},
}
"""A template whose proxy captures on other listeners, declares other ports and runs as another UID than
Istio's: the injector's settings name its listeners; the plugin runs with the chart's defaults."""
CUSTOM_CASES = ("hello", "hello-tproxy", "traffic-params", "status_params", "kubevirtInterfaces")


@pytest.mark.parametrize("case", [case for case in CUSTOM_CASES if case in CASES])
def test_the_plugin_applies_the_init_containers_rules_with_a_custom_proxy(node: PluginNode, case: str) -> None:
    """What the plugin must know of the proxy (its listeners, ports and UID) comes from the annotations the
    injector recorded, not from the plugin's settings."""
    sets = json.loads((CORPUS / case / "case.json").read_text())["sets"]
    node.configure(Case([], tuple(sets)).plugin_settings)
    listeners = ["meshConfig.proxyListenPort=16001", "meshConfig.proxyInboundListenPort=16006"]
    config = parse_config({"templates": {"sidecar": CUSTOM_PROXY}}, "custom")

    def injected(mode: str) -> list[dict[str, Any]]:
        injector = Injector(load_settings([*sets, *listeners, mode]), config=config)
        return pods_of(inject_documents(corpus_input(case), injector))

    same_rules(node, injected(INIT_MODE), injected(CNI))


def same_rules(node: PluginNode, init_pods: list[dict[str, Any]], cni_pods: list[dict[str, Any]]) -> None:
    """Each pod injected for CNI mode, set up by the plugin, has the tables of the same pod injected for init
    mode, set up by its init container's command; both DELs of the captured pod pass, the first leaving
    nothing of the plugin's."""
    assert len(init_pods) == len(cni_pods) > 0
    lab, record = node.lab, node.record
    for init_pod, cni_pod in zip(init_pods, cni_pods, strict=True):
        with ThreadPoolExecutor(2) as pool:
            captured, reference = pool.map(
                lambda pod: run_sandbox(lab, pod["metadata"].get("annotations") or {}), (cni_pod, init_pod)
            )
        try:
            (add,) = record.calls(captured, "ADD")
            assert add["runtime_config"]["dns"]["Servers"] == list(CLUSTER_DNS)  # containerd 1.6 spells it so
            with ThreadPoolExecutor(2) as pool:
                found, expected = pool.map(
                    lambda sandbox, spec: set_up_by_init_container(lab, sandbox, spec),
                    (captured, reference),
                    (cni_pod["spec"], init_pod["spec"]),
                )
            assert found == expected
        finally:
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda sandbox: removed(lab, sandbox), (captured, reference)))
        # The rules of a pod whose istio-init ran are that container's: the plugin's DEL leaves them.
        assert_both_dels_passed(record, captured, left_nothing=init_container(cni_pod["spec"]) is None)


def set_up_by_init_container(lab: lab_node.Node, sandbox: str, spec: Mapping[str, Any]) -> str:
    """The pod's istio-init command, when it has one, run as its init container would; the pod's tables."""
    container = init_container(spec)
    if container is not None:
        pid = lab.runtime.sandbox_status(sandbox).pid
        run_init_container(container, f"/proc/{pid}/ns/net", f"/proc/{pid}/root/etc/resolv.conf")
    return pod_tables(lab, sandbox)


def _refused_alike(node: PluginNode, case: Case) -> None:
    """The injector refused the workload's annotation; a pod carrying it, injected for CNI mode, fails
    RunPodSandbox the same way: the plugin's ADD answers code 100 naming the annotation, containerd's DEL
    after it leaves nothing, no sandbox remains."""
    status = json.dumps({"initContainers": ["istio-validation"]})
    for pod_spec in workloads(case.documents, None):
        annotations = {**(pod_spec["metadata"].get("annotations") or {}), "sidecar.istio.io/status": status}
        name = f"refused-{uuid.uuid4().hex[:8]}"
        with pytest.raises(cri.CriError) as failure:
            run_sandbox(node.lab, annotations, name=name)
        (add,) = node.record.of_pod(name, "ADD")
        assert (add["exit"], add["answer"]["code"]) == (1, 100)
        assert case.error is not None and case.error in str(add["answer"]["msg"]).lower()
        assert "annotation 'traffic.sidecar.istio.io/" in str(add["answer"]["msg"])
        assert str(add["answer"]["msg"]) in str(failure.value)
        assert [call["after"] for call in node.record.of_pod(name, "DEL") if call["netns"]] == [[]]
        assert name not in {sandbox.name for sandbox in node.lab.runtime.list_sandboxes()}


# --- what a runtime does with the plugin ---------------------------------------------------------------------


def test_both_dels_succeed_the_second_without_a_netns(default_node: PluginNode) -> None:
    lab, record = default_node.lab, default_node.record
    sandbox = run_sandbox(lab, {**cnilab.INJECTED, "sidecar.istio.io/interceptionMode": "TPROXY"})
    assert "-A ISTIO_OUTPUT" in pod_tables(lab, sandbox)
    assert "lookup 133" in in_pod(lab, sandbox, ["ip", "rule"])
    removed(lab, sandbox)
    assert_both_dels_passed(record, sandbox)
    assert all(cnilab.ANNOTATIONS_CAPABILITY in call["runtime_config"] for call in record.calls(sandbox, "DEL"))


def test_a_bad_annotation_fails_run_pod_sandbox_naming_it_and_leaves_nothing(default_node: PluginNode) -> None:
    lab, record = default_node.lab, default_node.record
    bad = {**cnilab.INJECTED, "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"}
    before = {sandbox.id for sandbox in lab.runtime.list_sandboxes()}
    with pytest.raises(cri.CriError) as failure:
        run_sandbox(lab, bad, name="bad-annotation")
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges" in str(failure.value)
    assert "10.0.0.0/33" in str(failure.value)
    assert {sandbox.id for sandbox in lab.runtime.list_sandboxes()} == before
    calls = record.of_pod("bad-annotation")
    assert [(call["command"], call["exit"]) for call in calls][:2] == [("ADD", 1), ("DEL", 0)]
    assert calls[0]["answer"]["code"] == 100
    assert calls[1]["after"] == []
    assert all(call["exit"] == 0 for call in calls[1:])


def test_ten_pods_created_at_once_each_get_their_rules(default_node: PluginNode) -> None:
    lab = default_node.lab
    with ThreadPoolExecutor(10) as pool:
        sandboxes = list(pool.map(lambda number: run_sandbox(lab, cnilab.INJECTED, name=f"many-{number}"), range(10)))
    try:
        found = [pod_tables(lab, sandbox) for sandbox in sandboxes]
        assert "-A ISTIO_OUTPUT" in found[0]
        assert all(table == found[0] for table in found[1:])
        assert len({lab.runtime.sandbox_status(sandbox).ips for sandbox in sandboxes}) == 10
    finally:
        removed(lab, *sandboxes)


@pytest.mark.parametrize(
    ("namespace", "annotations"),
    [
        ("default", {}),
        ("default", {**cnilab.INJECTED, "sidecar.istio.io/inject": "false"}),
        ("kube-system", cnilab.INJECTED),
        ("default", {**cnilab.INJECTED, "sidecar.istio.io/status": json.dumps({"initContainers": ["istio-init"]})}),
        ("default", {**cnilab.INJECTED, "sidecar.istio.io/interceptionMode": "NONE"}),
    ],
    ids=["uninjected", "opted-out", "excluded-namespace", "init-container-mode", "mode-none"],
)
def test_pods_left_alone_keep_no_rules_and_get_the_result(
    default_node: PluginNode, namespace: str, annotations: dict[str, str]
) -> None:
    lab, record = default_node.lab, default_node.record
    sandbox = run_sandbox(lab, annotations, namespace=namespace)
    try:
        assert "ISTIO" not in pod_tables(lab, sandbox)
        (add,) = record.calls(sandbox, "ADD")
        assert add["exit"] == 0
        assert add["answer"] == add["prev_result"]  # the bridge's result, unchanged
        assert add["answer"]["ips"]
    finally:
        removed(lab, sandbox)


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_older_spec_versions_chain_the_same_way(node: PluginNode, version: str) -> None:
    """A list at an older ``cniVersion``: the plugin captures, answers the bridge's result in that version,
    and both DELs leave nothing. (CHECK, which 0.3.1 refuses, is a small-runtime test: containerd 1.6
    never sends it.)"""
    node.configure({"iptables": "nft"}, version=version)
    lab, record = node.lab, node.record
    sandbox = run_sandbox(lab, cnilab.INJECTED)
    try:
        assert "-A ISTIO_OUTPUT" in pod_tables(lab, sandbox)
        (add,) = record.calls(sandbox, "ADD")
        assert add["answer"] == add["prev_result"]
        assert add["answer"]["cniVersion"] == version
    finally:
        removed(lab, sandbox)
    assert_both_dels_passed(record, sandbox, cached_result=version != "0.3.1")


def test_a_list_where_the_plugin_comes_first_says_so_in_the_plugins_terms(node: PluginNode) -> None:
    """Our plugin before any plugin gave the pod an address: RunPodSandbox fails with an error that speaks
    of the conflist, not of the CLI's --ipv6 flags that no plugin user can pass."""
    node.configure({"iptables": "nft"}, alone=True)
    with pytest.raises(cri.CriError) as failure:
        run_sandbox(node.lab, cnilab.INJECTED, name="plugin-first")
    (add,) = node.record.of_pod("plugin-first", "ADD")
    message = str(add["answer"]["msg"])
    assert "must come after the plugin that gives pods their addresses" in message
    assert "--" not in message
    assert message in str(failure.value)
    assert [call["after"] for call in node.record.of_pod("plugin-first", "DEL") if call["netns"]] == [[]]


@pytest.mark.parametrize("dns", [True, False], ids=["dns-capability", "no-dns-capability"])
def test_dns_capture_takes_the_pods_servers_from_the_dns_capability(node: PluginNode, dns: bool) -> None:
    """The pod's servers (its DNS config, what its resolv.conf holds), not the node's; all DNS when the
    conflist entry does not declare the capability (containerd then passes no DNS config)."""
    node.configure({"iptables": "nft", "mesh_config": DNS_MESH_CONFIG}, dns=dns)
    lab, record = node.lab, node.record
    sandbox = run_sandbox(lab, cnilab.INJECTED)
    try:
        rules = pod_tables(lab, sandbox)
        (add,) = record.calls(sandbox, "ADD")
    finally:
        removed(lab, sandbox)
    node_servers = [
        line.split()[1] for line in Path("/etc/resolv.conf").read_text().splitlines() if line.startswith("nameserver")
    ]
    assert not [server for server in node_servers if server in rules]
    assert ("dns" in add["runtime_config"]) == dns
    if dns:
        assert (
            f"-A ISTIO_OUTPUT_DNS -d {CLUSTER_DNS[0]}/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in rules
        )
    else:
        assert "-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in rules
        assert CLUSTER_DNS[0] not in rules


# --- pods with processes: the capture seen by connections ----------------------------------------------------


def app_pod(images: LabImages, name: str, annotations: Mapping[str, str], proxy: bool = True) -> dict[str, Any]:
    """:data:`APP` named ``name`` with ``annotations``; the proxy container runs the stand-in proxy, or is
    idle (a captured connection then finds nothing listening)."""
    document: dict[str, Any] = yaml.safe_load(APP)
    document["metadata"].update(name=name, annotations=dict(annotations))
    programs = {"app": idle_command(), "istio-proxy": proxy_command(15001, 15006) if proxy else idle_command()}
    return with_programs(document, images.init, programs)


def from_the_node(lab: lab_node.Node, host: str, port: int) -> str:
    """A connection from the node (the rest of the cluster) to ``host``, answered or not."""
    return lab.in_node(sys.executable, "-c", CLIENT, host, str(port)).stdout.strip()


def assert_captured_through_the_proxy(lab: lab_node.Node, pod: Pod) -> None:
    wait_for_log(pod, "istio-proxy", "listening")
    # Outbound: the app's connection reaches the proxy's 15001 with its original destination.
    assert connect(pod, "app", REMOTE, 80) == f"proxy:15001 original_dst={REMOTE}:80 from={pod.ip}"
    # The proxy's own (uid 1337) is not captured: it goes out and finds no route.
    assert connect(pod, "istio-proxy", REMOTE, 80).startswith("error: ")
    # Inbound: the node's connection to the app arrives at the proxy's 15006.
    assert from_the_node(lab, pod.ip, APP_PORT) == f"proxy:15006 original_dst={pod.ip}:{APP_PORT} from={lab.gateway}"


def test_the_capture_goes_through_the_proxy(
    node: PluginNode, images: LabImages, run_pod: Callable[..., Pod], variant: str
) -> None:
    node.configure(variant_settings(variant))
    pod = run_pod(app_pod(images, "captured", cnilab.INJECTED))
    assert_captured_through_the_proxy(node.lab, pod)
    (add,) = node.record.calls(pod.sandbox_id, "ADD")
    assert add["answer"] == add["prev_result"]  # the bridge's result reached containerd unchanged


def test_an_excluded_cidr_annotation_bypasses_the_proxy(
    default_node: PluginNode, images: LabImages, run_pod: Callable[..., Pod]
) -> None:
    """A server pod the plugin leaves alone; of two pods whose proxies are not running, the one excluding
    the server's address reaches it directly, the other is captured (and refused)."""
    programs = {"app": ["python3.11", "-c", SERVER, str(APP_PORT)], "istio-proxy": idle_command()}
    server = run_pod(with_programs(yaml.safe_load(APP), images.init, programs))
    wait_for_log(server, "app", "listening")
    excluding = {**cnilab.INJECTED, "traffic.sidecar.istio.io/excludeOutboundIPRanges": f"{server.ip}/32"}
    bypassing = run_pod(app_pod(images, "bypassing", excluding, proxy=False))
    captured = run_pod(app_pod(images, "captured", cnilab.INJECTED, proxy=False))
    assert connect(bypassing, "app", server.ip, APP_PORT) == f"server from={bypassing.ip}"
    assert connect(captured, "app", server.ip, APP_PORT).startswith("error: ")


# --- the self-contained build, on a node without Python --------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_plugin(node: PluginNode) -> Path:
    """The self-contained build copied into the node's files (where :func:`cnilab.without_python` leaves it
    visible), as an installer copies it onto a node; the executable's path."""
    executable = cnilab.copy_frozen_plugin(cnilab.frozen_build(), node.folder)
    cnilab.assert_python_hidden(cnilab.without_python())
    return executable


def test_the_self_contained_plugin_captures_on_a_node_without_python(
    node: PluginNode, frozen_plugin: Path, images: LabImages, run_pod: Callable[..., Pod], variant: str
) -> None:
    """containerd runs the build with every Python interpreter, standard library and this project hidden.
    The binary that applies records the library path it was given: the one containerd gave the plugin, not
    the bundle's."""
    wrapper = cnilab.without_python()
    version = subprocess.run(
        [*wrapper, str(frozen_plugin)],
        input='{"cniVersion": "1.0.0"}',
        env={**os.environ, "CNI_COMMAND": "VERSION"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(version.stdout)["supportedVersions"] == ["0.3.1", "0.4.0", "1.0.0"], version.stderr
    tool = "nft" if variant == "native" else f"iptables-{variant}-restore"
    spy, seen = node.folder / f"spy-{variant}", node.folder / f"library-path-{variant}"
    spy.mkdir()
    (spy / tool).write_text(f'#!/bin/sh\necho "${{LD_LIBRARY_PATH-unset}}" >>{seen}\nexec {shutil.which(tool)} "$@"\n')
    (spy / tool).chmod(0o755)
    node.configure(variant_settings(variant))
    node.use([*wrapper, str(frozen_plugin)], path=spy)
    try:
        pod = run_pod(app_pod(images, "frozen", cnilab.INJECTED))
        assert_captured_through_the_proxy(node.lab, pod)
        (add,) = node.record.calls(pod.sandbox_id, "ADD")
        assert set(seen.read_text().splitlines()) == {add["library_path"]}
        assert frozen_plugin.parent.name not in add["library_path"]
        # TPROXY: routing changes, through pyroute2, in the bundle too; StopPodSandbox's DEL undoes them.
        tproxy = run_sandbox(node.lab, {**cnilab.INJECTED, "sidecar.istio.io/interceptionMode": "TPROXY"})
        assert "lookup 133" in in_pod(node.lab, tproxy, ["ip", "rule"])
        removed(node.lab, tproxy)
        assert_both_dels_passed(node.record, tproxy)
    finally:
        node.use([str(cnilab.CONSOLE_PLUGIN)])
