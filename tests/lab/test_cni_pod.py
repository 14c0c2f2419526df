"""CNI mode on a real runtime: the CNI image's own installer puts the plugin into the node's bin and conf dirs
(after the bridge / host-local chain), containerd runs it for every pod, and the injected ``istio-validation``
container (Istio's template: the proxy's UID, drop ALL, no privilege escalation, read-only root) exits 0 in a
pod the plugin captured and 126 in one it left alone."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from istio_iptables.cni import cri
from tests.helpers import run_cli
from tests.lab import node as lab_node
from tests.lab.conftest import LabImages
from tests.lab.kubelet import Kubelet, Pod, PodError
from tests.lab.workloads import (
    APP_WITH_PROXY,
    REMOTE,
    connect,
    idle_command,
    proxy_command,
    wait_for_log,
    with_programs,
)

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "deploy" / "istio-iptables-cni.yaml"
PLUGIN = "istio-iptables-cni"


@contextlib.contextmanager
def installed_plugin(lab: lab_node.Node, images: LabImages) -> Iterator[None]:
    """The plugin installed on ``lab``'s network by the CNI image's installer, as the DaemonSet of
    deploy/istio-iptables-cni.yaml runs it (without --watch, so that it exits, and without
    --write-kubeconfig: there is no API server here, and containerd passes the pods' annotations). The
    node's own network is put back afterwards."""
    documents = list(yaml.safe_load_all(DAEMONSET.read_text()))
    daemonset = next(d for d in documents if d["kind"] == "DaemonSet")
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    spec = daemonset["spec"]["template"]["spec"]
    (installer,) = [container for container in spec["containers"] if container["name"] == "install-cni"]
    assert installer["image"] == images.cni
    installer["args"] = [arg for arg in installer["args"] if arg not in {"--watch", "--write-kubeconfig"}]
    # The installer alone (its --agent-socket kept: the file names a socket no agent listens on, and the
    # plugin runs the bundle); the agent container is tests/lab/test_cni_agent_runtime.py's.
    spec["containers"] = [installer]
    mounted = {mount["name"] for mount in installer["volumeMounts"]}
    spec["volumes"] = [volume for volume in spec["volumes"] if volume["name"] in mounted]
    kubelet = Kubelet(lab)
    try:
        pod = kubelet.run_pod(daemonset, config_maps={config_map["metadata"]["name"]: config_map["data"]})
        status = pod.wait("install-cni")
        assert status.exit_code == 0, pod.logs("install-cni")
        yield
    finally:
        kubelet.remove_all()
        lab.use_subnets(lab.subnets)
        (lab.paths.cni_bin / PLUGIN).unlink(missing_ok=True)
        (lab.paths.cni_bin / f"{PLUGIN}.agent").unlink(missing_ok=True)
        shutil.rmtree(lab.paths.cni_bin / f"{PLUGIN}.d", ignore_errors=True)


@pytest.fixture(scope="module")
def cni_node(lab: lab_node.Node, images: LabImages) -> Iterator[lab_node.Node]:
    """The session's node with the plugin installed (:func:`installed_plugin`)."""
    with installed_plugin(lab, images):
        yield lab


def injected_for_cni(images: LabImages, tmp_path: Path) -> dict[str, Any]:
    source = tmp_path / "shop.yaml"
    source.write_text(APP_WITH_PROXY)
    result = run_cli(["inject", "-f", str(source), "--set", "components.cni.enabled=true"])
    assert result.code == 0, result.stderr
    document: dict[str, Any] = yaml.safe_load(result.stdout)
    (validation,) = document["spec"]["initContainers"]
    assert validation["name"] == "istio-validation"
    assert validation["image"] == images.init
    programs = {"shop": idle_command(), "istio-proxy": proxy_command(15001, 15006)}
    return with_programs(document, images.init, programs)


def test_the_installer_chains_the_plugin_after_the_nodes_network(cni_node: lab_node.Node) -> None:
    conflist = json.loads((cni_node.paths.cni_conf / lab_node.CONFLIST).read_text())
    assert [plugin["type"] for plugin in conflist["plugins"]] == ["bridge", PLUGIN]
    entry = conflist["plugins"][-1]
    assert entry["capabilities"] == {"io.kubernetes.cri.pod-annotations": True, "dns": True}
    assert entry["exclude_namespaces"] == ["kube-system", "istio-iptables-cni"]  # from the ConfigMap
    assert (cni_node.paths.cni_bin / PLUGIN).stat().st_mode & 0o111
    assert (cni_node.paths.cni_bin / f"{PLUGIN}.d").is_dir()


def test_validation_passes_in_a_captured_pod_whose_app_reaches_the_proxy(
    cni_node: lab_node.Node, images: LabImages, run_pod: Callable[..., Pod], tmp_path: Path
) -> None:
    pod = run_pod(injected_for_cni(images, tmp_path))
    assert pod.exit_code("istio-validation") == 0, pod.logs("istio-validation")
    wait_for_log(pod, "istio-proxy", "listening")
    assert connect(pod, "shop", REMOTE, 80) == f"proxy:15001 original_dst={REMOTE}:80 from={pod.ip}"
    assert connect(pod, "istio-proxy", REMOTE, 80).startswith("error: ")


def test_validation_fails_with_126_in_a_pod_the_plugin_left_alone(
    cni_node: lab_node.Node, images: LabImages, run_pod: Callable[..., Pod], tmp_path: Path
) -> None:
    spec = injected_for_cni(images, tmp_path)
    # Without the injector's status annotation the plugin leaves the pod alone (not injected).
    del spec["metadata"]["annotations"]["sidecar.istio.io/status"]
    pod = run_pod(spec, check=False)
    assert pod.failed_init == "istio-validation"
    assert pod.exit_code("istio-validation") == 126, pod.logs("istio-validation")
    assert "shop" not in pod.containers  # Init:Error: the app never starts
    assert "-A ISTIO_OUTPUT" not in pod.in_netns("iptables-save").stdout


def test_the_capable_interpreter_cannot_start_without_its_capabilities(
    lab: lab_node.Node, images: LabImages, run_pod: Callable[..., Pod], tmp_path: Path
) -> None:
    """Why the image's entrypoint picks its interpreter: the console script on the interpreter with file
    capabilities (the entrypoint before) is refused by the kernel in istio-validation's security context."""
    spec = injected_for_cni(images, tmp_path)
    validation = spec["spec"]["initContainers"][0]
    validation["command"] = ["/opt/istio-iptables/bin/istio-iptables"]
    with pytest.raises((cri.CriError, PodError), match="operation not permitted"):
        run_pod(spec)
