"""The plugin's pure parts: its settings from the conflist, and which pods it captures (the truth table)."""

from __future__ import annotations

import json

import pytest

from istio_iptables.capture.config import Config, IptablesVariant, parse_address
from istio_iptables.cni.plugin import PodInfo, given_annotations, parse_plugin_config, pod_dns, skip_reason
from istio_iptables.cni.protocol import CniError, Request
from istio_iptables.log import LogLevel

STATUS = json.dumps({"initContainers": ["istio-validation"], "containers": ["istio-proxy"]})
INJECTED = {"sidecar.istio.io/status": STATUS}


def test_defaults() -> None:
    plugin = parse_plugin_config({"cniVersion": "1.0.0", "name": "k8s", "type": "istio-iptables-cni"})
    assert plugin.exclude_namespaces == ("kube-system",)
    assert (plugin.log_level, plugin.kubeconfig, plugin.iptables) == (LogLevel.INFO, "", None)


def test_settings() -> None:
    plugin = parse_plugin_config(
        {
            "type": "istio-iptables-cni",
            "capabilities": {"io.kubernetes.cri.pod-annotations": True},
            "values": {"global": {"proxy": {"excludeIPRanges": "10.0.0.0/8"}}},
            "mesh_config": {"proxyListenPort": 15011},
            "exclude_namespaces": ["kube-system", "istio-system"],
            "log_level": "debug",
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/istio-iptables-cni.kubeconfig"},
            "iptables": "nft",
        }
    )
    assert plugin.exclude_namespaces == ("kube-system", "istio-system")
    assert plugin.log_level is LogLevel.DEBUG
    assert plugin.iptables is IptablesVariant.NFT
    assert plugin.kubeconfig.endswith("istio-iptables-cni.kubeconfig")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("exclude_namespace", ["x"], "unknown setting"),
        ("values", "global.x=1", "must be an object"),
        ("exclude_namespaces", "kube-system", "must be a list of namespace names"),
        ("log_level", "loud", "unknown level 'loud'"),
        ("iptables", "xtables", "must be one of: legacy, nft"),
        ("kubernetes", {"kubeconfig": 3}, 'must be {"kubeconfig": PATH}'),
    ],
)
def test_bad_settings_name_the_setting_and_value(key: str, value: object, message: str) -> None:
    with pytest.raises(CniError) as error:
        parse_plugin_config({"type": "istio-iptables-cni", key: value})
    assert error.value.code == CniError.INVALID_CONFIG
    assert f"plugin setting {key}: {json.dumps(value)}" in error.value.message
    assert message in error.value.message


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        (PodInfo(INJECTED), None),
        (PodInfo({**INJECTED, "sidecar.istio.io/inject": "true"}), None),
        (PodInfo(INJECTED, containers=("app", "istio-proxy")), None),
        (PodInfo({}), "not injected (no sidecar.istio.io/status annotation)"),
        (PodInfo({**INJECTED, "sidecar.istio.io/inject": "false"}), "sidecar.istio.io/inject is 'false'"),
        (PodInfo({**INJECTED, "sidecar.istio.io/inject": "enabled"}), "sidecar.istio.io/inject is 'enabled'"),
        (PodInfo(INJECTED, labels={"sidecar.istio.io/inject": "false"}), "sidecar.istio.io/inject is 'false'"),
        (
            PodInfo({**INJECTED, "sidecar.istio.io/inject": "false"}, labels={"sidecar.istio.io/inject": "true"}),
            None,
        ),
        (PodInfo({"sidecar.istio.io/status": '{"initContainers":["istio-init"]}'}), "not injected for CNI mode"),
        (PodInfo({"sidecar.istio.io/status": '{"initContainers":null}'}), "not injected for CNI mode"),
        (PodInfo({"sidecar.istio.io/status": "not json"}), "not injected for CNI mode"),
        (PodInfo(INJECTED, containers=("app",)), "no istio-proxy container"),
    ],
)
def test_which_pods_are_captured(pod: PodInfo, reason: str | None) -> None:
    found = skip_reason(pod)
    assert found == reason if reason is None else reason in str(found)


def test_dns_capture_takes_the_servers_the_runtime_gives_for_the_pod() -> None:
    """The init container reads the pod's resolv.conf, which the runtime writes from the pod's DNS config:
    given that config (the dns capability), the plugin captures exactly its servers (addresses only, as a
    resolv.conf reader keeps them); without it, every DNS server, as Istio's plugin does."""
    dns = Config(redirect_dns=True)
    servers = ("10.96.0.10", "fd00::a")
    assert pod_dns(dns, [*servers, "dns.example"]).dns_servers == tuple(map(parse_address, servers))
    assert pod_dns(dns, []).dns_servers == ()
    assert pod_dns(dns, None).capture_all_dns
    assert pod_dns(dns, None).dns_servers is None
    for unchanged in (
        Config(),
        Config(redirect_dns=True, capture_all_dns=True),
        Config(redirect_dns=True, dns_servers=()),
    ):
        assert pod_dns(unchanged, ["10.96.0.10"]) == unchanged


@pytest.mark.parametrize(
    ("runtime_config", "annotations"),
    [
        ({"io.kubernetes.cri.pod-annotations": {"a": "1"}}, {"a": "1"}),
        ({"io.kubernetes.cri.pod-annotations": None}, {}),  # containerd: a pod without annotations
        ({}, None),  # the runtime passes none: only the API can tell
    ],
)
def test_the_annotations_the_runtime_passed(runtime_config: dict[str, object], annotations: object) -> None:
    request = Request("ADD", "c", "/var/run/netns/p", "eth0", {}, {"runtimeConfig": runtime_config})
    assert given_annotations(request) == annotations
