"""The plugin's pure parts: its settings from the conflist, and which pods it captures (the truth table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from istio_iptables.capture.config import Config, IptablesVariant, parse_address
from istio_iptables.cni.plugin import (
    PluginConfig,
    PodInfo,
    capture_config,
    given_annotations,
    left_alone_quietly,
    parse_plugin_config,
    pod_dns,
    skip_reason,
)
from istio_iptables.cni.protocol import CniError, Request
from istio_iptables.errors import ConfigError
from istio_iptables.kube.capture import load_settings
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


def request_of(
    command: str, annotations: dict[str, str] | None, netns: str = "/var/run/netns/p", **config: object
) -> Request:
    runtime = {} if annotations is None else {"runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations}}
    args = {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "app"}
    return Request(command, "c", netns, "eth0", args, {"type": "istio-iptables-cni", **runtime, **config})


@pytest.mark.parametrize(
    ("request_", "quick"),
    [
        (request_of("ADD", {}), True),  # not injected
        (request_of("ADD", {"sidecar.istio.io/status": STATUS}), False),  # to capture
        (request_of("ADD", None), False),  # only the API can tell
        (request_of("ADD", {}, log_level="debug"), False),  # the full path logs why
        (request_of("ADD", {}, log_levle="info"), False),  # a misspelt setting is refused on the full path
        (request_of("DEL", {"sidecar.istio.io/status": STATUS}, netns=""), True),  # RemovePodSandbox's DEL
        (request_of("DEL", {"sidecar.istio.io/status": STATUS}), False),  # StopPodSandbox's: rules to remove
    ],
)
def test_which_requests_are_answered_without_loading_the_capture(request_: Request, quick: bool) -> None:
    assert left_alone_quietly(request_) is quick


def test_a_pod_left_alone_loads_nothing_past_the_protocol() -> None:
    probe = (
        "import sys\nfrom istio_iptables.cli.console import cni_main\ncni_main()\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('istio_iptables') or m in ('json', 'signal'))),"
        " file=sys.stderr)\n"
    )
    environment = {
        **os.environ,
        **{"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/var/run/netns/none", "CNI_IFNAME": "eth0"},
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=app",
    }
    stdin = {"cniVersion": "1.0.0", "name": "k8s", "type": "istio-iptables-cni", "prevResult": {"cniVersion": "1.0.0"}}
    stdin["runtimeConfig"] = {"io.kubernetes.cri.pod-annotations": {"app": "shop"}}
    run = subprocess.run(
        [sys.executable, "-c", probe],
        input=json.dumps(stdin),
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(run.stdout) == {"cniVersion": "1.0.0"}
    assert set(run.stderr.split()) == {
        "istio_iptables",
        *(f"istio_iptables.{name}" for name in ("cli", "cli.console", "cni", "cni.plugin", "cni.protocol")),
        *(f"istio_iptables.{name}" for name in ("errors", "records")),
    }


def test_a_library_caller_of_handle_keeps_its_signal_handlers() -> None:
    """Only the plugin's own process (main) takes SIGINT and SIGTERM over: a caller in-process, such as a test
    runner, that got the console program's handlers would have its signals blocked by the next in-process
    CLI run, and every child it starts after that would inherit the block (a --watch deaf to SIGTERM)."""
    probe = (
        "import signal\nfrom istio_iptables.cni import plugin\nfrom istio_iptables.cni.protocol import CniError\n"
        "from tests.cni.test_plugin import INJECTED, request_of\n"
        "try:\n    plugin.handle(request_of('ADD', INJECTED, netns='/var/run/netns/none'))\n"
        "except CniError as error:\n    print(error.code)\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
        "signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert run.stdout.split() == [str(CniError.INVALID_ENVIRONMENT), "True", "True"], run.stderr


@pytest.mark.parametrize(
    ("annotation", "mesh", "where"),
    [
        ("proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: maybe\n", {}, "the pod's annotation 'proxy.istio.io/config'"),
        (None, {"ISTIO_META_DNS_CAPTURE": "maybe"}, "plugin setting mesh_config defaultConfig.proxyMetadata"),
    ],
)
def test_a_bad_proxy_metadata_value_is_named_where_the_plugins_user_set_it(
    annotation: str | None, mesh: dict[str, str], where: str
) -> None:
    annotations = {**INJECTED, **({"proxy.istio.io/config": annotation} if annotation else {})}
    settings = load_settings(mesh_config={"defaultConfig": {"proxyMetadata": mesh}})
    with pytest.raises(ConfigError) as error:
        capture_config(PodInfo(annotations), settings, "/var/run/netns/p", PluginConfig())
    assert str(error.value) == (
        f"invalid value 'maybe' for proxyMetadata ISTIO_META_DNS_CAPTURE ({where}): not a boolean (true or false)"
    )
