"""The CNI plugin run as a runtime runs it, with the reference plugins, on a node namespace of the test's own
(cnilab.py), for what containerd cannot make happen: CHECK, a netns that is gone, a fault injected into the
plugin, annotations from an API server. Everything else runs through containerd in the kubelet lab
(tests/lab/test_cni_runtime.py); docs/development.md says why each test here stays.

Each test names the iptables variant through the plugin's configuration (``iptables``, or
``values.global.nativeNftables`` for native nftables), as an operator would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fake_kube_api
from tests.kernel import cnilab
from tests.kernel.cnilab import INJECTED, CniError, CniLab, PodSandbox, Runtime

pytestmark = pytest.mark.kernel


def plugin_config(variant: str, **extra: object) -> dict[str, object]:
    if variant == "native":
        return {"values": {"global": {"nativeNftables": True}}, **extra}
    return {"iptables": variant, **extra}


@pytest.fixture
def cni_lab(lab_unavailable: str | None) -> Iterator[CniLab]:
    reason = lab_unavailable or cnilab.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    with CniLab() as built:
        yield built


@pytest.fixture(scope="session")
def frozen_build() -> Path:
    return cnilab.frozen_build()


@pytest.fixture
def runtime(cni_lab: CniLab, variant: str) -> Runtime:
    return cnilab.make_runtime(cni_lab, cnilab.CONSOLE_PLUGIN, plugin_config(variant))


def our_rules(runtime: Runtime, pod: PodSandbox) -> str:
    """Every rule of ours in the pod, from every backend (empty when there are none)."""
    lines = []
    for tool in ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"):
        saved = runtime.lab.sh(pod.netns, [tool])
        lines += [f"{tool}: {line}" for line in saved.splitlines() if "ISTIO" in line]
    ruleset = runtime.lab.sh(pod.netns, ["nft", "list", "ruleset"])
    lines += [f"nft: {line}" for line in ruleset.splitlines() if "istio" in line.lower()]
    return "\n".join(lines)


def error_of(failure: CniError) -> dict[str, object]:
    """The CNI error object our plugin printed (and its exit was non-zero)."""
    assert failure.invocation.plugin == cnilab.PLUGIN_NAME, failure
    assert failure.invocation.returncode != 0
    return failure.invocation.json()


def test_a_missing_pod_namespace_is_named_by_its_cni_variable(runtime: Runtime) -> None:
    pod = runtime.new_pod(INJECTED)
    runtime.remove_netns(pod)
    invocation = runtime.ours(pod, "ADD")
    error = invocation.json()
    assert invocation.returncode != 0 and error["code"] == 4
    assert str(error["msg"]).startswith(f"CNI_NETNS '{pod.netns_path}'")
    assert "--network-namespace" not in str(error["msg"])


def test_a_failed_apply_leaves_no_rule_of_ours(cni_lab: CniLab, tmp_path: Path) -> None:
    """IPv4 goes in first; the IPv6 restore is refused; the IPv4 rules must be rolled back. (IPv6 is captured
    for a dual-stack pod when the proxy's metadata says ISTIO_DUAL_STACK, as in the init container.)"""
    refusing = tmp_path / "bin"
    refusing.mkdir()
    script = refusing / "ip6tables-legacy-restore"
    script.write_text("#!/bin/sh\necho 'ip6tables-restore: simulated refusal' >&2\nexit 1\n")
    script.chmod(0o755)
    dual_stack = {"defaultConfig": {"proxyMetadata": {"ISTIO_DUAL_STACK": "true"}}}
    runtime = cnilab.make_runtime(cni_lab, cnilab.CONSOLE_PLUGIN, plugin_config("legacy", mesh_config=dual_stack))
    runtime.dual_stack = True
    runtime.path = f"{refusing}:{runtime.path}"
    pod = runtime.new_pod(INJECTED)
    with pytest.raises(CniError) as failure:
        runtime.add(pod, delete_on_failure=False)  # what the failed ADD itself left
    error = error_of(failure.value)
    assert error["code"] == 101
    assert "simulated refusal" in str(error["msg"])
    assert "ipv4 rules restored" in str(error["msg"])
    assert our_rules(runtime, pod) == ""


def test_check_passes_then_reports_drift_and_a_repeated_add_repairs(runtime: Runtime, variant: str) -> None:
    pod = runtime.new_pod(INJECTED)
    runtime.add(pod)
    before = our_rules(runtime, pod)
    assert before
    assert [i.returncode for i in runtime.check(pod)] == [0, 0]
    left_alone = runtime.new_pod({})
    runtime.add(left_alone)
    assert [i.returncode for i in runtime.check(left_alone)] == [0, 0]
    if variant == "native":
        runtime.lab.sh(pod.netns, ["nft", "flush", "chain", "inet", "istio-proxy-nat", "istio-output"])
    else:
        runtime.lab.sh(pod.netns, [f"iptables-{variant}", "-t", "nat", "-F", "ISTIO_OUTPUT"])
    drifted = runtime.ours(pod, "CHECK")
    assert drifted.returncode != 0
    assert drifted.json()["code"] == 102
    assert "differ from its plan" in str(drifted.json()["msg"])
    again = runtime.ours(pod, "ADD")  # a runtime may repeat an ADD: ours converges (the bridge's refuses)
    assert again.returncode == 0, again.stderr
    assert again.json() == pod.result
    assert our_rules(runtime, pod) == before
    assert runtime.ours(pod, "CHECK").returncode == 0


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_check_follows_the_lists_spec_version(cni_lab: CniLab, version: str) -> None:
    """CHECK came with 0.4.0: a 0.3.1 list's CHECK is refused in 0.3.1's terms. (The lab runs older lists'
    ADD and DEL through containerd, which never sends CHECK.)"""
    runtime = cnilab.make_runtime(cni_lab, cnilab.CONSOLE_PLUGIN, plugin_config("nft"))
    runtime.version = version
    pod = runtime.new_pod(INJECTED)
    runtime.add(pod)
    check = runtime.ours(pod, "CHECK")
    if version == "0.3.1":
        assert check.returncode != 0
        assert check.json() == {"cniVersion": "0.3.1", "code": 1, "msg": "config version 0.3.1 does not allow CHECK"}
    else:
        assert check.returncode == 0, check.stdout


def test_del_removes_everything_and_succeeds_repeated_and_after_the_netns_is_gone(runtime: Runtime) -> None:
    on_node = set(os.listdir("/run"))
    pod = runtime.new_pod({**INJECTED, "sidecar.istio.io/interceptionMode": "TPROXY"})
    runtime.add(pod)
    assert our_rules(runtime, pod)
    assert "lookup 133" in runtime.lab.sh(pod.netns, ["ip", "rule"])
    runtime.delete(pod)
    assert our_rules(runtime, pod) == ""
    # The locks are one shared file (a byte per namespace) and the system's xtables lock: none per pod.
    left = set(os.listdir("/run")) - on_node - {"istio-iptables.lock", "xtables.lock"}
    assert not [name for name in left if "lock" in name], f"files a pod left on the node: {left}"
    assert "lookup 133" not in runtime.lab.sh(pod.netns, ["ip", "rule"])
    assert runtime.ours(pod, "DEL").returncode == 0
    runtime.remove_netns(pod)
    gone = runtime.ours(pod, "DEL")
    assert (gone.returncode, gone.stdout) == (0, "")
    runtime.delete(pod)  # the whole list, as a runtime retries it
    runtime.delete(pod, removing=True)  # containerd's second DEL: no CNI_NETNS, no prevResult


def test_foreign_rules_in_the_pod_are_no_drift_and_survive_del(runtime: Runtime, variant: str) -> None:
    """Another writer's rules in the pod (a chain named like ours included) are neither drift nor ours."""
    lab = runtime.lab
    pod = runtime.new_pod(INJECTED)
    runtime.add(pod)
    if variant == "native":
        foreign = ["nft", "list", "table", "inet", "istio-proxy-nat-other"]
        for command in ("add table inet istio-proxy-nat-other", "add chain inet istio-proxy-nat-other c"):
            lab.sh(pod.netns, ["nft", *command.split()])
    else:
        tool = f"iptables-{variant}"
        foreign = [tool, "-t", "nat", "-S", "ISTIO_OUTPUT_FOREIGN"]
        lab.sh(pod.netns, [tool, "-t", "nat", "-N", "ISTIO_OUTPUT_FOREIGN"])
        lab.sh(pod.netns, [tool, "-t", "nat", "-A", "ISTIO_OUTPUT_FOREIGN", "-d", "198.18.99.9/32", "-j", "RETURN"])
    before = lab.sh(pod.netns, foreign)
    assert runtime.ours(pod, "CHECK").returncode == 0
    runtime.delete(pod)
    assert lab.sh(pod.netns, foreign) == before


def frozen_runtime(cni_lab: CniLab, frozen_build: Path, config: dict[str, object]) -> Runtime:
    executable = cnilab.copy_frozen_plugin(frozen_build, cni_lab.tmp)
    runtime = cnilab.make_runtime(cni_lab, executable, config)
    runtime.wrapper = cnilab.without_python()
    cnilab.assert_python_hidden(runtime.wrapper)
    return runtime


def test_annotations_from_the_kubernetes_api_when_the_runtime_passes_none(cni_lab: CniLab, frozen_build: Path) -> None:
    """A runtime without the pod-annotations capability: the plugin asks the API server (a fake one in the
    node namespace, over HTTPS with a bearer token), and the pod's istio-proxy runAsUser becomes -u."""
    lab = cni_lab
    certificate, key = fake_kube_api.make_certificate(lab.tmp)
    kubeconfig = lab.tmp / "istio-iptables-cni.kubeconfig"
    kubeconfig.write_text(fake_kube_api.kubeconfig("https://127.0.0.1:6443", certificate, token="node-token"))
    runtime = frozen_runtime(cni_lab, frozen_build, plugin_config("nft", kubernetes={"kubeconfig": str(kubeconfig)}))
    runtime.pass_annotations = False
    pod = runtime.new_pod(INJECTED)
    pods = lab.tmp / "pods.json"
    pods.write_text(json.dumps({f"default/{pod.name}": fake_kube_api.pod("default", pod.name, INJECTED, 1500)}))
    argv = [sys.executable, "-m", "tests.fake_kube_api", str(pods), "--port", "6443", "--token", "node-token"]
    api = lab.spawn(runtime.node, [*argv, "--cert", str(certificate), "--key", str(key)], name="kube-api")
    api.listens = [("tcp", 6443)]
    lab.wait_ready(api)
    runtime.add(pod)
    assert cnilab.ANNOTATIONS_CAPABILITY not in runtime.log[-1].stdin["runtimeConfig"]  # type: ignore[operator]
    assert "--uid-owner 1500" in our_rules(runtime, pod)
    # Without a kubeconfig, such a pod fails closed: its ADD names what is missing.
    runtime.plugin_config = plugin_config("nft")
    other = runtime.new_pod(INJECTED)
    with pytest.raises(CniError) as failure:
        runtime.add(other, delete_on_failure=False)
    error = error_of(failure.value)
    assert error["code"] == 103
    assert "names no kubeconfig" in str(error["msg"])


def test_the_build_states_the_glibc_its_files_need_and_install_checks_it_on_this_node(
    frozen_build: Path, tmp_path: Path
) -> None:
    """scripts/build-cni-plugin writes the highest GLIBC_x.y symbol version of the bundle (objdump -T); the
    installer accepts this node (its glibc built the bundle) and runs the installed copy's VERSION."""
    import re  # noqa: PLC0415

    from istio_iptables.cni import install, nodecheck  # noqa: PLC0415

    contents = frozen_build / f"{cnilab.PLUGIN_NAME}.d"
    stated = json.loads((contents / nodecheck.REQUIREMENTS_FILE).read_text())["glibc"]
    files = [frozen_build / cnilab.PLUGIN_NAME, *(path for path in contents.rglob("*.so*") if path.is_file())]
    symbols = subprocess.run(["objdump", "-T", *map(str, files)], capture_output=True, text=True, check=False)
    versions = {tuple(map(int, found)) for found in re.findall(r"GLIBC_(\d+)\.(\d+)", symbols.stdout)}
    assert stated == "{}.{}".format(*max(versions))
    assert nodecheck.node_glibc(Path("/")) >= max(versions)  # type: ignore[operator]

    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    (conf_dir / "10-bridge.conflist").write_text('{"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "b"}]}')
    install.install(conf_dir, bin_dir, frozen_build / cnilab.PLUGIN_NAME, {})
    assert (bin_dir / f"{cnilab.PLUGIN_NAME}.d" / nodecheck.REQUIREMENTS_FILE).exists()
