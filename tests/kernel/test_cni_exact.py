"""CNI mode is exact: for every case of Istio's injection corpus, the rules the plugin applies (the pod
injected with ``components.cni.enabled=true``, its annotations and DNS config handed over by the runtime)
equal the rules the same pod's ``istio-init`` container applies in init mode (its argv and environment as
``inject`` writes them, its resolv.conf as the runtime writes it), in two sandboxes the same runtime set up.

The same again with a template whose proxy has other listeners, ports and UID than Istio's, the plugin run
with the chart's defaults: what it must know of the proxy comes from the annotations the injector recorded.

Through the tests' runtime (cnilab.py), all cases in one lab: one node runs the list with the plugin, the
other the same list without it, where the init container's command runs as an init container would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from istio_iptables.kube.capture import load_settings
from istio_iptables.kube.inject import INIT_CONTAINER, Injector, inject_documents, pod_paths
from istio_iptables.kube.template import parse_config
from tests.conformance.test_istio_inject import CASES, CORPUS
from tests.kernel import cnilab, netlab
from tests.kernel.cnilab import CniError, CniLab, PodSandbox, Runtime

pytestmark = pytest.mark.kernel

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
SAVES = ("iptables-nft-save", "ip6tables-nft-save")


@pytest.fixture(scope="module")
def nodes(lab_unavailable: str | None) -> Iterator[tuple[Runtime, Runtime]]:
    """The node whose list ends with the plugin, and the node with the same list without it."""
    reason = lab_unavailable or cnilab.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    if not CASES:
        pytest.skip(f"Istio's injection goldens are not there: {CORPUS} is absent")
    with CniLab() as lab:
        plugin = cnilab.make_runtime(lab, cnilab.CONSOLE_PLUGIN, {}, "node")
        init = cnilab.make_runtime(lab, cnilab.CONSOLE_PLUGIN, {}, "initnode")
        init.chained = False
        yield plugin, init


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


def rules(runtime: Runtime, pod: PodSandbox) -> str:
    return tables(lambda argv: runtime.lab.sh(pod.netns, argv))


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


def entries() -> list[Any]:
    listed = [pytest.param(case, (), id=case) for case in CASES]
    return listed + [pytest.param(case, sets, id=f"{case}+dns-capture") for case, sets in EXTRA if case in CASES]


@pytest.mark.parametrize(("case", "extra"), entries())
def test_the_plugin_applies_the_init_containers_rules(
    nodes: tuple[Runtime, Runtime], case: str, extra: tuple[str, ...], tmp_path: Path
) -> None:
    plugin_node, _ = nodes
    folder = CORPUS / case
    spec = json.loads((folder / "case.json").read_text())
    sets = [*spec["sets"], *extra]
    cni_settings = load_settings([*sets, CNI])
    plugin_node.plugin_config = {"iptables": "nft", "values": cni_settings.values, "mesh_config": cni_settings.mesh}
    if spec["expect"] == "error":
        _refused_alike(plugin_node, case, spec["error"])
        return
    init_pods = workloads(corpus_input(case), [*(item for item in sets if item != CNI), INIT_MODE])
    cni_pods = workloads(corpus_input(case), [*sets, CNI])
    _same_rules(nodes, init_pods, cni_pods, tmp_path)


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
def test_the_plugin_applies_the_init_containers_rules_with_a_custom_proxy(
    nodes: tuple[Runtime, Runtime], case: str, tmp_path: Path
) -> None:
    plugin_node, _ = nodes
    sets = json.loads((CORPUS / case / "case.json").read_text())["sets"]
    plugin_settings = load_settings([*sets, CNI])
    plugin_node.plugin_config = {
        "iptables": "nft",
        "values": plugin_settings.values,
        "mesh_config": plugin_settings.mesh,
    }
    listeners = ["meshConfig.proxyListenPort=16001", "meshConfig.proxyInboundListenPort=16006"]
    config = parse_config({"templates": {"sidecar": CUSTOM_PROXY}}, "custom")

    def injected(mode: str) -> list[dict[str, Any]]:
        injector = Injector(load_settings([*sets, *listeners, mode]), config=config)
        return pods_of(inject_documents(corpus_input(case), injector))

    _same_rules(nodes, injected(INIT_MODE), injected(CNI), tmp_path)


def _same_rules(
    nodes: tuple[Runtime, Runtime], init_pods: list[dict[str, Any]], cni_pods: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Each pod injected for CNI mode, captured by the plugin, has the tables of the same pod injected for
    init mode, captured by its init container's command."""
    plugin_node, init_node = nodes
    assert len(init_pods) == len(cni_pods)
    for init_pod, cni_pod in zip(init_pods, cni_pods, strict=True):
        captured = plugin_node.new_pod(cni_pod["metadata"].get("annotations") or {})
        reference = init_node.new_pod()
        try:
            plugin_node.add(captured)
            init_node.add(reference)
            # A pod injected before keeps its istio-init whatever the mode (injection leaves it as it is).
            for pod, spec_of in ((captured, cni_pod), (reference, init_pod)):
                container = init_container(spec_of["spec"])
                if container is not None:
                    resolv_conf = tmp_path / f"{pod.netns}-resolv.conf"
                    resolv_conf.write_text(pod.resolv_conf())
                    run_init_container(container, pod.netns_path, str(resolv_conf))
            assert rules(plugin_node, captured) == rules(init_node, reference)
            plugin_node.delete(captured)
            plugin_node.delete(captured, removing=True)
        finally:
            for runtime, pod in ((plugin_node, captured), (init_node, reference)):
                runtime.remove_netns(pod)


def _refused_alike(runtime: Runtime, case: str, error: str) -> None:
    """The injector refused the workload's annotation; a pod carrying it, injected for CNI mode, fails its
    ADD the same way, naming the annotation, and keeps no rule."""
    status = json.dumps({"initContainers": ["istio-validation"]})
    for pod_spec in workloads(corpus_input(case), None):
        annotations = {**(pod_spec["metadata"].get("annotations") or {}), "sidecar.istio.io/status": status}
        pod = runtime.new_pod(annotations)
        try:
            with pytest.raises(CniError) as failure:
                runtime.add(pod)
            answer = failure.value.invocation.json()
            assert answer["code"] == 100
            assert error in str(answer["msg"]).lower()
            assert "annotation 'traffic.sidecar.istio.io/" in str(answer["msg"])
            assert "ISTIO" not in rules(runtime, pod)
        finally:
            runtime.remove_netns(pod)
