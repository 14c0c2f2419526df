"""The CNI plugin run as a runtime runs it, with the reference plugins, on a node namespace of the test's own
(cnilab.py): real pods get real rules, and real traffic through a real proxy (uid 1337) shows the capture.

Each test names the iptables variant through the plugin's configuration (``iptables``, or
``values.global.nativeNftables`` for native nftables), as an operator would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from istio_iptables.kube.capture import init_args, load_settings
from tests import fake_kube_api
from tests.kernel import cnilab, netlab
from tests.kernel.cnilab import GATEWAY, INJECTED, CniError, CniLab, PodSandbox, Runtime

pytestmark = pytest.mark.kernel

NODE_PORT = 8080
APP_PORT = 8080


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
    """The self-contained plugin as ``scripts/build-cni-plugin`` makes it (scripts/test runs it first), built
    again here when any source file is newer than the build."""
    build = netlab.ROOT / "dist" / cnilab.PLUGIN_NAME
    executable = build / cnilab.PLUGIN_NAME
    package = netlab.ROOT / "istio_iptables"
    sources = [*package.rglob("*.py"), *package.rglob("*.json"), netlab.ROOT / "scripts" / "build-cni-plugin"]
    sources += (netlab.ROOT / "cni-client").glob("*.c")
    if not executable.exists() or executable.stat().st_mtime < max(path.stat().st_mtime for path in sources):
        built = subprocess.run(
            [str(netlab.ROOT / "scripts" / "build-cni-plugin")],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**os.environ, "PYTHON": sys.executable},
        )
        assert built.returncode == 0, built.stderr[-3000:]
    return build


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


def start(runtime: Runtime, pod: PodSandbox) -> netlab.Actor:
    """An echo server on the node (the rest of the cluster), the app (uid 1000), the proxy (uid 1337)."""
    lab = runtime.lab
    actors = [
        lab.echo(runtime.node, "node", [NODE_PORT]),
        lab.echo(pod.netns, "app", [APP_PORT], uid=netlab.APP_UID),
        proxy := lab.proxy(ns=pod.netns),
    ]
    lab.wait_ready(*actors)
    return proxy


def test_add_captures_outbound_and_inbound_through_the_proxy(runtime: Runtime) -> None:
    lab = runtime.lab
    pod = runtime.new_pod(INJECTED)
    result = runtime.add(pod)
    proxy = start(runtime, pod)

    # Outbound: the app's connection to the node goes through the proxy's 15001 and on, as uid 1337, direct.
    answer = lab.client(GATEWAY, NODE_PORT, ns=pod.netns, data="out")
    assert answer == f"PROXY15001|node:{pod.address}:{GATEWAY}:{NODE_PORT}:out"
    # Inbound: the node's connection to the app arrives through the proxy's 15006, from 127.0.0.6.
    answer = lab.client(pod.address, APP_PORT, ns=runtime.node, uid=0, data="in")
    assert answer == f"PROXY15006|app:127.0.0.6:{pod.address}:{APP_PORT}:in"
    events = lab.events(proxy)
    assert [event["listener"] for event in events] == [15001, 15006]
    assert events[0]["original_dst"] == [GATEWAY, NODE_PORT]
    # The bridge plugin's result reached the runtime unchanged.
    assert result["ips"][0]["address"].startswith("198.18.64.")  # type: ignore[index]


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_older_spec_versions_chain_the_same_way(cni_lab: CniLab, version: str) -> None:
    runtime = cnilab.make_runtime(cni_lab, cnilab.CONSOLE_PLUGIN, plugin_config("nft"))
    runtime.version = version
    pod = runtime.new_pod(INJECTED)
    result = runtime.add(pod)
    bridge_result = next(i for i in runtime.log if i.plugin == "bridge" and i.command == "ADD").json()
    assert result == bridge_result
    assert result["cniVersion"] == version
    assert our_rules(runtime, pod)
    check = runtime.ours(pod, "CHECK")
    if version == "0.3.1":  # CHECK came with 0.4.0
        assert check.returncode != 0
        assert check.json() == {"cniVersion": "0.3.1", "code": 1, "msg": "config version 0.3.1 does not allow CHECK"}
    else:
        assert check.returncode == 0, check.stdout
    runtime.delete(pod)
    assert our_rules(runtime, pod) == ""


def test_an_excluded_cidr_annotation_bypasses_the_proxy(runtime: Runtime) -> None:
    lab = runtime.lab
    captured = runtime.new_pod(INJECTED)
    bypassing = runtime.new_pod({**INJECTED, "traffic.sidecar.istio.io/excludeOutboundIPRanges": f"{GATEWAY}/32"})
    runtime.add(captured)
    runtime.add(bypassing)
    start(runtime, bypassing)
    assert lab.client(GATEWAY, NODE_PORT, ns=bypassing.netns) == f"node:{bypassing.address}:{GATEWAY}:{NODE_PORT}:hello"
    # The other pod, same node, default annotations: captured (its proxy is not running, so it is refused).
    assert lab.try_client(GATEWAY, NODE_PORT, ns=captured.netns).returncode != 0


@pytest.mark.parametrize(
    ("namespace", "annotations"),
    [
        ("default", {}),
        ("default", {**INJECTED, "sidecar.istio.io/inject": "false"}),
        ("kube-system", INJECTED),
        ("default", {**INJECTED, "sidecar.istio.io/status": json.dumps({"initContainers": ["istio-init"]})}),
        ("default", {**INJECTED, "sidecar.istio.io/interceptionMode": "NONE"}),
    ],
    ids=["uninjected", "opted-out", "excluded-namespace", "init-container-mode", "mode-none"],
)
def test_pods_left_alone_keep_no_rules_and_get_the_result(
    runtime: Runtime, namespace: str, annotations: dict[str, str]
) -> None:
    pod = runtime.new_pod(annotations, namespace=namespace)
    result = runtime.add(pod)
    assert our_rules(runtime, pod) == ""
    bridge_result = next(i for i in runtime.log if i.plugin == "bridge" and i.command == "ADD").json()
    assert result == bridge_result
    assert all(i.returncode == 0 for i in runtime.check(pod))


def test_a_bad_annotation_fails_the_add_naming_it_and_leaves_no_rules(runtime: Runtime) -> None:
    pod = runtime.new_pod({**INJECTED, "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"})
    with pytest.raises(CniError) as failure:
        runtime.add(pod, delete_on_failure=False)
    error = error_of(failure.value)
    assert error["code"] == 100
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges" in str(error["msg"])
    assert "10.0.0.0/33" in str(error["msg"])
    assert our_rules(runtime, pod) == ""


def test_a_plugin_placed_before_the_addresses_says_so_in_the_plugins_terms(runtime: Runtime) -> None:
    """Our plugin alone, before any plugin gave the pod an address: the error speaks of the conflist, not of
    the CLI's --ipv6 flags that no plugin user can pass."""
    pod = runtime.new_pod(INJECTED)
    invocation = runtime.ours(pod, "ADD")
    assert invocation.returncode != 0
    message = str(invocation.json()["msg"])
    assert "must come after the plugin that gives pods their addresses" in message
    assert "--" not in message
    assert our_rules(runtime, pod) == ""


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


def test_the_second_del_without_a_netns_succeeds_while_the_pod_still_exists(runtime: Runtime) -> None:
    """containerd's RemovePodSandbox DEL has no netns to enter: it succeeds, and StopPodSandbox's DEL removed
    our rules already."""
    pod = runtime.new_pod(INJECTED)
    runtime.add(pod)
    runtime.delete(pod)
    assert [i.returncode for i in runtime.delete(pod, removing=True)] == [0, 0]
    assert our_rules(runtime, pod) == ""


def test_dns_capture_takes_the_pods_servers_from_the_dns_capability(cni_lab: CniLab) -> None:
    """The pod's servers (its DNS config, what its resolv.conf holds), not the node's; all DNS when the
    runtime passes no dns capability."""
    dns = {"defaultConfig": {"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}}}
    runtime = cnilab.make_runtime(cni_lab, cnilab.CONSOLE_PLUGIN, plugin_config("nft", mesh_config=dns))
    node_servers = [
        line.split()[1] for line in Path("/etc/resolv.conf").read_text().splitlines() if line.startswith("nameserver")
    ]
    pod = runtime.new_pod(INJECTED)
    runtime.add(pod)
    rules = our_rules(runtime, pod)
    assert "-A ISTIO_OUTPUT_DNS -d 198.18.96.10/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in rules
    assert not [server for server in node_servers if server in rules]
    assert runtime.ours(pod, "CHECK").returncode == 0
    runtime.pass_dns = False
    everywhere = runtime.new_pod(INJECTED)
    runtime.add(everywhere)
    rules = our_rules(runtime, everywhere)
    assert "-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in rules
    assert "198.18.96.10" not in rules


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


def test_ten_pods_added_at_once_each_get_their_rules(runtime: Runtime) -> None:
    pods = [runtime.new_pod(INJECTED) for _ in range(10)]
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(runtime.add, pods))
    assert len({pod.address for pod in pods}) == 10
    assert all(result["ips"] for result in results)
    for pod in pods:
        assert runtime.ours(pod, "CHECK").returncode == 0, runtime.ours(pod, "CHECK").stdout
    reference = our_rules(runtime, pods[0])
    assert all(our_rules(runtime, pod) == reference for pod in pods[1:])


def test_the_validation_container_passes_in_a_pod_the_plugin_set_up_and_fails_elsewhere(runtime: Runtime) -> None:
    settings = load_settings(sets=["components.cni.enabled=true"])
    captured, uninjected = runtime.new_pod(INJECTED), runtime.new_pod({})
    runtime.add(captured)
    runtime.add(uninjected)
    argv = [str(netlab.ISTIO_IPTABLES), *init_args(INJECTED, settings)[1:], "--probe-timeout", "2s"]
    assert "--run-validation" in argv and "--skip-rule-apply" in argv
    passed = runtime.lab.run(captured.netns, argv, uid=netlab.PROXY_UID)
    assert passed.returncode == 0, passed.stderr
    failed = runtime.lab.run(uninjected.netns, argv, uid=netlab.PROXY_UID)
    assert failed.returncode == 126, failed.stderr


# --- the self-contained build, on a "node" without Python --------------------------------------------------


def frozen_runtime(cni_lab: CniLab, frozen_build: Path, config: dict[str, object]) -> Runtime:
    executable = cnilab.copy_frozen_plugin(frozen_build, cni_lab.tmp)
    runtime = cnilab.make_runtime(cni_lab, executable, config)
    runtime.wrapper = cnilab.without_python()
    # The hiding is real: no interpreter runs, no standard library or project file is there.
    probe = "python3 -c pass || python -c pass || exit 0; exit 1"
    hidden = subprocess.run([*runtime.wrapper, "sh", "-c", probe], capture_output=True, timeout=30, check=False)
    assert hidden.returncode == 0, "a Python interpreter still runs under without_python()"
    for path in (Path(sys.base_prefix, "lib"), netlab.ROOT / "istio_iptables", Path(sys.prefix, "bin")):
        listed = subprocess.run([*runtime.wrapper, "ls", "-A", str(path)], capture_output=True, timeout=30, check=False)
        assert listed.stdout == b"", f"{path} is still visible under without_python()"
    return runtime


def test_the_self_contained_plugin_captures_on_a_node_without_python(
    cni_lab: CniLab, frozen_build: Path, variant: str
) -> None:
    runtime = frozen_runtime(cni_lab, frozen_build, plugin_config(variant))
    # The binary that applies records the library path it was given: the node's, not the bundle's.
    tool = "nft" if variant == "native" else f"iptables-{variant}-restore"
    spy, seen = cni_lab.tmp / "spy", cni_lab.tmp / "library-path"
    spy.mkdir()
    (spy / tool).write_text(f'#!/bin/sh\necho "${{LD_LIBRARY_PATH-unset}}" >>{seen}\nexec {shutil.which(tool)} "$@"\n')
    (spy / tool).chmod(0o755)
    runtime.path = f"{spy}:{runtime.path}"
    version = runtime.invoke({"type": cnilab.PLUGIN_NAME}, "VERSION", runtime.new_pod(), None)
    assert json.loads(version.stdout)["supportedVersions"] == ["0.3.1", "0.4.0", "1.0.0"], version.stderr
    pod = runtime.new_pod(INJECTED)
    runtime.add(pod)
    start(runtime, pod)
    answer = runtime.lab.client(GATEWAY, NODE_PORT, ns=pod.netns, data="frozen")
    assert answer == f"PROXY15001|node:{pod.address}:{GATEWAY}:{NODE_PORT}:frozen"
    assert runtime.ours(pod, "CHECK").returncode == 0
    assert seen.read_text().splitlines()[0] == "unset"
    # TPROXY: routing changes, through pyroute2, in the bundle too.
    tproxy = runtime.new_pod({**INJECTED, "sidecar.istio.io/interceptionMode": "TPROXY"})
    runtime.add(tproxy)
    assert "lookup 133" in runtime.lab.sh(tproxy.netns, ["ip", "rule"])
    runtime.delete(tproxy)
    assert "lookup 133" not in runtime.lab.sh(tproxy.netns, ["ip", "rule"])
    assert our_rules(runtime, tproxy) == ""


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
