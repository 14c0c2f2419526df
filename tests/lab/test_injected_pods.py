"""The other pod specs the project writes, on a real runtime, with real connections through a proxy both ways:
a dual-stack pod (IPv4 and IPv6), ``inject --hardened``, ``inject`` with Istio's own template, and the
webhook's patch applied to a pod (what the API server would store)."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from tests.lab import node as lab_node
from tests.lab.conftest import RELAY_IMAGE, LabImages
from tests.lab.kubelet import Pod
from tests.lab.test_cni_pod import installed_plugin
from tests.lab.workloads import (
    app_pod,
    check_relayed_both_ways,
    inject,
    server_command,
    tproxy_packets,
    wait_for_log,
    with_programs,
)
from tests.webhook_lab import Authority, review, running

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("relay_image")]

ISTIO_PROXY_IMAGE = "docker.io/istio/proxyv2"
NET_ADMIN = 12  # linux/capability.h
RELAY_COMMAND = [
    *("python3", "-m", "relay", "--outbound-port=15001", "--inbound-port=15006", "--health-port=15021"),
    "--mode=$(ISTIO_META_INTERCEPTION_MODE)",
]
"""The relay (its image's entrypoint) on the ports of Istio's template (its listeners, its status port), in the
interception mode the template tells pilot-agent in its env."""


@pytest.fixture
def dual_stack(lab: lab_node.Node) -> Iterator[lab_node.Node]:
    """The node's network with an IPv6 range beside the IPv4 one, for the pods created in the test."""
    previous = lab.subnets
    lab.use_subnets((lab_node.SUBNET, lab_node.SUBNET6))
    try:
        yield lab
    finally:
        lab.use_subnets(previous)


def running_app(pod: Pod) -> Pod:
    capture = pod.spec["spec"]["initContainers"][0]["name"]
    assert pod.exit_code(capture) == 0, pod.logs(capture)
    wait_for_log(pod, "istio-proxy", "listening")
    wait_for_log(pod, "shop", "listening")
    return pod


@pytest.mark.parametrize(
    ("cni", "mode"),
    [(False, "REDIRECT"), (True, "REDIRECT"), (False, "TPROXY")],
    ids=["init-mode", "cni-mode", "init-mode-tproxy"],
)
def test_a_dual_stack_pods_ipv4_and_ipv6_traffic_goes_through_the_relay(  # noqa: PLR0917 (fixtures, parameters)
    dual_stack: lab_node.Node,
    images: LabImages,
    run_pod: Callable[..., Pod],
    peer: Pod,
    tmp_path: Path,
    cni: bool,
    mode: str,
) -> None:
    """Istio's dual-stack switch (``ISTIO_DUAL_STACK`` in the proxy metadata); the capture programs ip6tables
    too (the pod has an IPv6 address) and puts ``::6`` on ``lo``: by istio-init, or by the plugin that the
    CNI image's installer chains after the dual-stack network; in TPROXY mode, IPv6 inbound through
    ip6tables' TPROXY rule."""
    sets = ["--set", "meshConfig.defaultConfig.proxyMetadata.ISTIO_DUAL_STACK=true"]
    sets += ["--set", "components.cni.enabled=true"] if cni else []
    app = app_pod(**{"sidecar.istio.io/interceptionMode": mode})
    document = inject(app, tmp_path, "--injector-config", "relay", *sets)
    capture = document["spec"]["initContainers"][0]
    assert capture["name"] == ("istio-validation" if cni else "istio-init")
    assert {"name": "ISTIO_DUAL_STACK", "value": "true"} in capture["env"]
    with installed_plugin(dual_stack, images) if cni else contextlib.nullcontext():
        pod = running_app(run_pod(with_programs(document, images.init, {"shop": server_command("app")})))
        assert [ipaddress.ip_address(ip).version for ip in pod.status.ips] == [4, 6]
        ip6tables = pod.in_netns("ip6tables-save").stdout + pod.in_netns("ip6tables-legacy-save").stdout
        assert "-A ISTIO_OUTPUT" in ip6tables
        assert "inet6 ::6/128" in pod.in_netns("ip", "-6", "address", "show", "dev", "lo").stdout

        check_relayed_both_ways(dual_stack, pod, peer, version=4)
        check_relayed_both_ways(dual_stack, pod, peer, version=6)
        if mode == "TPROXY":
            assert tproxy_packets(pod, version=6) > 0


def test_a_hardened_pods_traffic_goes_through_the_relay(
    lab: lab_node.Node,
    images: LabImages,
    run_pod: Callable[..., Pod],
    peer: Pod,
    tmp_path: Path,
) -> None:
    """``--hardened``: istio-init as the image's user 65532 (file capabilities, read-only root, RuntimeDefault
    seccomp), the xtables lock on the ``istio-iptables-lock`` emptyDir."""
    document = inject(app_pod(), tmp_path, "--injector-config", "relay", "--hardened")
    init = document["spec"]["initContainers"][0]
    assert init["name"] == "istio-init"
    assert init["securityContext"]["runAsUser"] == 65532
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    assert init["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert init["volumeMounts"] == [{"name": "istio-iptables-lock", "mountPath": "/run/istio-iptables"}]
    pod = running_app(run_pod(with_programs(document, images.init, {"shop": server_command("app")})))
    # istio-init's run lock, beside the xtables lock, is on the emptyDir: the read-only root has no room for it.
    assert [path.name for path in Path(pod.volumes["istio-iptables-lock"]).iterdir()] == ["xtables.lock.istio-iptables"]
    check_relayed_both_ways(lab, pod, peer)


def runnable(document: dict[str, Any], images: LabImages) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
    """An injected pod as the lab runs it, and the ConfigMaps it mounts: the app container runs the app's
    server; a proxy of Istio's template (pilot-agent's image) is the relay: its image and its command (in
    place of pilot-agent's args), every other field as written; the CA's ConfigMap holds a certificate made
    here."""
    spec = with_programs(document, images.init, {"shop": server_command("app")})
    proxy = next(c for c in spec["spec"]["initContainers"] if c["name"] == "istio-proxy")
    if not proxy["image"].startswith(f"{ISTIO_PROXY_IMAGE}:"):
        return spec, {}
    assert proxy["args"][:2] == ["proxy", "sidecar"]
    spec = with_programs(spec, RELAY_IMAGE, {"istio-proxy": RELAY_COMMAND})
    return spec, {"istio-ca-root-cert": {"root-cert.pem": Authority().pem().decode()}}


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_a_pod_of_istios_template_with_the_relay_for_pilot_agent(  # noqa: PLR0917 (fixtures and parameter)
    lab: lab_node.Node,
    images: LabImages,
    run_pod: Callable[..., Pod],
    peer: Pod,
    tmp_path: Path,
    mode: str,
) -> None:
    """``inject --injector-config istio`` (Istio's sidecar template), run as written but for one substitution:
    the istio-proxy container's image (``docker.io/istio/proxyv2``, pilot-agent and Envoy, which cannot be had
    offline and need istiod) is the relay's, and its command is the relay's in place of pilot-agent's args.
    Every other field of that container is kept: user 1337 (root with NET_ADMIN in TPROXY mode, as Istio's
    template has it), read-only root, its capabilities, its env (field
    and resource refs), its volume mounts (the emptyDirs, the downward API's labels and annotations, the
    projected token, the CA's ConfigMap, the optional CRL one absent). The lab's kubelet runs no probes and no
    preStop hook, so the template's HTTP probes of 15021 (pilot-agent's) and its ``pilot-agent request`` hook
    are not exercised; the relay only listens on 15021, the status port the capture exempts."""
    document = app_pod(**{"sidecar.istio.io/interceptionMode": mode})
    document["metadata"]["labels"] = {"app": "shop"}
    spec, config_maps = runnable(inject(document, tmp_path, "--injector-config", "istio"), images)
    assert [c["image"] for c in spec["spec"]["initContainers"]] == [images.init, RELAY_IMAGE]
    pod = running_app(run_pod(spec, config_maps=config_maps))

    # The container as Istio's template has it: its user, its read-only root, its volumes, its env.
    checks = """\
import json, os
status = dict(line.split(":\\t") for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
found = {"uid": os.getuid(), "gid": os.getgid(), "capabilities": status["CapEff"], "env": {k: os.environ.get(k) for k in
    ("INSTANCE_IP", "POD_NAME", "ISTIO_CPU_LIMIT", "GOMEMLIMIT", "ISTIO_META_INTERCEPTION_MODE")}}
try:
    open("/written", "w")
except OSError as error:
    found["root"] = error.strerror
found["labels"] = open("/etc/istio/pod/labels").read()
found["annotations"] = [line.partition("=")[0] for line in open("/etc/istio/pod/annotations").read().splitlines()]
found["token"] = os.path.getsize("/var/run/secrets/tokens/istio-token") > 0
found["root_cert"] = open("/var/run/secrets/istio/root-cert.pem").read()
found["crl"] = os.listdir("/var/run/secrets/istio/crl")
open("/etc/istio/proxy/written", "w").close()
print(json.dumps(found))
"""
    result = pod.exec("istio-proxy", ["python3", "-c", checks])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "uid": 0 if mode == "TPROXY" else 1337,
        "gid": 1337,
        "capabilities": f"{1 << NET_ADMIN if mode == 'TPROXY' else 0:016x}",
        "env": {
            "INSTANCE_IP": pod.ip,
            "POD_NAME": "shop",
            "ISTIO_CPU_LIMIT": "2",
            "GOMEMLIMIT": str(1024**3),
            "ISTIO_META_INTERCEPTION_MODE": mode,
        },
        "root": "Read-only file system",
        # The pod's own, with those Istio's template adds (tlsMode, canonical name...), as the kubelet writes them.
        "labels": "\n".join(f'{key}="{value}"' for key, value in sorted(spec["metadata"]["labels"].items())),
        "annotations": sorted(spec["metadata"]["annotations"]),
        "token": True,
        "root_cert": config_maps["istio-ca-root-cert"]["root-cert.pem"],
        "crl": [],
    }
    assert {"app": "shop", "security.istio.io/tlsMode": "istio"}.items() <= spec["metadata"]["labels"].items()
    assert f'"tproxy":{str(mode == "TPROXY").lower()}' in pod.logs("istio-proxy")
    check_relayed_both_ways(lab, pod, peer)


@pytest.mark.parametrize("template", ["relay", "istio"])
def test_the_webhooks_patch_makes_the_pod_inject_makes_and_it_runs(  # noqa: PLR0917 (fixtures and parameter)
    lab: lab_node.Node,
    images: LabImages,
    run_pod: Callable[..., Pod],
    peer: Pod,
    tmp_path: Path,
    template: str,
) -> None:
    """The webhook (``istio-iptables webhook --injector-config TEMPLATE`` on 127.0.0.1, a certificate made
    here) answers the AdmissionReview of a pod; its JSON Patch applied to that pod gives what ``inject`` writes
    for it, and that pod runs with its traffic through the relay (for Istio's template, the relay in place of
    pilot-agent as above)."""
    pod = {"apiVersion": "v1", "kind": "Pod", **app_pod()}
    with running(tmp_path, ["--injector-config", template]) as webhook:
        answer = webhook.review(review(pod, namespace="default"))
    response = answer["response"]
    assert response["allowed"] is True, response
    assert response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    assert patched == inject(pod, tmp_path, "--injector-config", template)
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["istio-init", "istio-proxy"]

    spec, config_maps = runnable(patched, images)
    check_relayed_both_ways(lab, running_app(run_pod(spec, config_maps=config_maps)), peer)
