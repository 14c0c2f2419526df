"""Repair on a real runtime: a pod injected for CNI mode whose sandbox was created while the node's
configuration lacked the plugin fails validation with 126; ``istio-iptables cni repair``, run as the node
agent runs (in the node's network namespace, talking to containerd's CRI socket, with only the privileges
the repair manifest grants and no cluster credentials), captures it in place with the plugin's plan; the
restarted ``istio-validation`` then exits 0 and the app's traffic reaches the proxy. Pods that are not
injected, and pods that hold rules of ours already, keep their rules byte for byte."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import run_cli
from tests.lab import node as lab_node
from tests.lab.conftest import LabImages
from tests.lab.kubelet import Kubelet, Pod
from tests.lab.workloads import (
    APP_WITH_PROXY,
    CLIENT,
    REMOTE,
    connect,
    idle_command,
    proxy_command,
    wait_for_log,
    with_programs,
)

pytestmark = pytest.mark.kernel

ISTIO_IPTABLES = Path(sys.prefix, "bin", "istio-iptables")
REPAIR_MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "istio-iptables-cni-repair.yaml"
FOREIGN_RULE = ["-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP"]
"""A rule of someone else's, which a pod that is not ours must keep."""


def injected_for_cni(images: LabImages, tmp_path: Path, name: str) -> dict[str, Any]:
    source = tmp_path / f"{name}.yaml"
    source.write_text(APP_WITH_PROXY.replace("name: shop, namespace", f"name: {name}, namespace"))
    result = run_cli(["inject", "-f", str(source), "--set", "components.cni.enabled=true"])
    assert result.code == 0, result.stderr
    document: dict[str, Any] = yaml.safe_load(result.stdout)
    assert [init["name"] for init in document["spec"]["initContainers"]] == ["istio-validation"]
    programs = {"shop": idle_command(), "istio-proxy": proxy_command(15001, 15006)}
    return with_programs(document, images.init, programs)


def plain_pod(images: LabImages, name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(
        APP_WITH_PROXY.replace("name: shop, namespace", f"name: {name}, namespace")
    )
    return with_programs(document, images.init, {"shop": idle_command(), "istio-proxy": idle_command()})


def manifest_privileges(without: str = "") -> list[str]:
    """``setpriv`` giving a command the repair container's privileges in deploy/istio-iptables-cni-repair.yaml:
    root with only the capabilities it adds (bounding set, hence permitted and effective), nothing inherited,
    and no privilege escalation. ``without``: one capability left out."""
    documents = yaml.safe_load_all(REPAIR_MANIFEST.read_text())
    daemonset = next(document for document in documents if document["kind"] == "DaemonSet")
    spec = daemonset["spec"]["template"]["spec"]
    assert (
        spec["hostNetwork"] is True and spec["hostPID"] is True
    )  # what running from the node's PID namespace stands for
    container = next(container for container in spec["containers"] if container["name"] == "repair")
    context = container["securityContext"]
    assert context["runAsUser"] == 0 and context["capabilities"]["drop"] == ["ALL"]
    assert context["allowPrivilegeEscalation"] is False
    assert not without or without in context["capabilities"]["add"]
    added = ",".join(f"+{name.lower()}" for name in context["capabilities"]["add"] if name != without)
    return ["setpriv", f"--bounding-set=-all,{added}", "--inh-caps=-all", "--no-new-privs", "--"]


def repair(node: lab_node.Node, tmp_path: Path, *args: str, without: str = "") -> subprocess.CompletedProcess[str]:
    """One cycle of the node agent's repair as the repair manifest runs it: in the node's network namespace
    (a hostNetwork pod), in the node's PID namespace (hostPID), with the container's capabilities only."""
    settings = tmp_path / "plugin.json"
    settings.write_text(json.dumps({"log_level": "debug"}))
    argv = [str(ISTIO_IPTABLES), "cni", "repair", "--once", f"--cri-socket=unix://{node.paths.socket}"]
    argv += [f"--plugin-config={settings}", *args]
    return subprocess.run(
        ["nsenter", f"--net=/run/netns/{node.netns}", "--", *manifest_privileges(without), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def rules(pod: Pod) -> str:
    """The pod's rules of every table and both variants, without counters (which traffic changes)."""
    saved = [pod.in_netns(tool).stdout for tool in ("iptables-legacy-save", "iptables-nft-save")]
    saved.append(pod.in_netns("nft", "list", "ruleset").stdout)
    return re.sub(
        r"\[\d+:\d+\]", "", "\n".join(line for text in saved for line in text.splitlines() if line[:1] != "#")
    )


def uncaptured(kubelet: Kubelet, spec: dict[str, Any]) -> Pod:
    """The pod as the kubelet leaves it when the plugin did not capture it: Init:Error, the app not started."""
    pod = kubelet.run_pod(spec, check=False)
    assert pod.failed_init == "istio-validation"
    assert pod.exit_code("istio-validation") == 126, pod.logs("istio-validation")
    assert "shop" not in pod.containers
    return pod


def test_repair_captures_a_pod_created_without_the_plugin_and_leaves_other_pods_alone(
    lab: lab_node.Node, images: LabImages, kubelet: Kubelet, tmp_path: Path
) -> None:
    conflist = json.loads((lab.paths.cni_conf / lab_node.CONFLIST).read_text())
    assert [plugin["type"] for plugin in conflist["plugins"]] == ["bridge"]  # the plugin is absent
    missed = uncaptured(kubelet, injected_for_cni(images, tmp_path, "shop"))
    other = kubelet.run_pod(plain_pod(images, "plain"))
    other.in_netns("iptables-legacy", *FOREIGN_RULE)
    other_rules = rules(other)

    first = repair(lab, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "pod default/shop: captured in place (1 this cycle, 1 since start)" in first.stderr
    about_plain = [line for line in first.stderr.splitlines() if "pod default/plain" in line]
    assert all("left alone" in line and "not injected" in line for line in about_plain), first.stderr  # not looked into
    assert rules(other) == other_rules

    kubelet.restart_init(missed)  # the kubelet's next attempt, in the same sandbox
    assert missed.exit_code("istio-validation") == 0, missed.logs("istio-validation")
    wait_for_log(missed, "istio-proxy", "listening")
    assert connect(missed, "shop", REMOTE, 80) == f"proxy:15001 original_dst={REMOTE}:80 from={missed.ip}"
    assert connect(missed, "istio-proxy", REMOTE, 80).startswith("error: ")  # the proxy's own: left alone
    inbound = lab.in_node("python3", "-c", CLIENT, missed.ip, "8080").stdout.strip()
    assert inbound == f"proxy:15006 original_dst={missed.ip}:8080 from={lab.gateway}"

    # A new agent (a restarted DaemonSet pod) finds the pod captured: nothing changes.
    captured_rules = rules(missed)
    second = repair(lab, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "pod default/shop: already captured" in second.stderr
    assert "captured in place" not in second.stderr
    assert rules(missed) == captured_rules
    assert rules(other) == other_rules


def test_repair_leaves_a_pod_holding_rules_of_ours_as_it_is(
    lab: lab_node.Node, images: LabImages, kubelet: Kubelet, tmp_path: Path
) -> None:
    """A pod captured by another plan (here: another proxy port) is not the repair's to rewrite."""
    pod = uncaptured(kubelet, injected_for_cni(images, tmp_path, "elsewhere"))
    applied = subprocess.run(
        [str(ISTIO_IPTABLES), "--network-namespace", pod.netns, "-p", "15002", "-z", "15006", "-u", "1337"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert applied.returncode == 0, applied.stderr
    before = rules(pod)
    result = repair(lab, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "pod default/elsewhere: holds rules of ours that differ from its plan: left alone" in result.stderr
    assert rules(pod) == before


def test_repair_reports_a_pod_it_cannot_capture_without_credentials_to_delete_it(
    lab: lab_node.Node, images: LabImages, kubelet: Kubelet, tmp_path: Path
) -> None:
    """An annotation that gives no capture (the plugin would have failed the pod's ADD): without --kubeconfig
    the pod is reported, and nothing in it changes."""
    spec = injected_for_cni(images, tmp_path, "broken")
    spec["metadata"]["annotations"]["traffic.sidecar.istio.io/includeInboundPorts"] = "not-a-port"
    pod = uncaptured(kubelet, spec)
    before = rules(pod)
    result = repair(lab, tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"pod default/broken: cannot be captured in place \(.*includeInboundPorts.*\), and no --kubeconfig",
        result.stderr,
    )
    assert rules(pod) == before


def test_an_agent_that_may_not_enter_the_pod_says_so_and_deletes_nothing(
    lab: lab_node.Node, images: LabImages, kubelet: Kubelet, tmp_path: Path
) -> None:
    """Without CAP_SYS_PTRACE the pause process's namespace cannot be opened: the agent's own lack, not the
    pod's, so it is named and the pod is neither captured nor given to the fallback (which would delete it)."""
    pod = uncaptured(kubelet, injected_for_cni(images, tmp_path, "guarded"))
    before = rules(pod)
    kubeconfig = tmp_path / "kubeconfig"  # present, so that only the verdict keeps the fallback away
    kubeconfig.write_text('{"clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}]}')
    result = repair(lab, tmp_path, f"--kubeconfig={kubeconfig}", without="SYS_PTRACE")
    assert result.returncode == 0, result.stderr
    assert re.search(rf"pod default/guarded: cannot open /proc/{pod.pid}/ns/net: Permission denied", result.stderr)
    assert "cannot be captured in place" not in result.stderr
    assert rules(pod) == before
