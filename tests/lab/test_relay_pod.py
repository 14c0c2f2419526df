"""The relay template on a real runtime: a pod injected with ``inject --injector-config relay`` runs its app,
the capture and the relay (the image built from Dockerfile.proxy), and real connections go through the relay
both ways: in init mode (istio-init) and in CNI mode (the plugin installed by the CNI image's installer,
istio-validation), with the relay as a native sidecar and as a plain container, in REDIRECT and in TPROXY
interception mode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.lab import node as lab_node
from tests.lab.conftest import RELAY_IMAGE, LabImages
from tests.lab.kubelet import Pod
from tests.lab.test_cni_pod import cni_node  # noqa: F401 (the fixture, for CNI mode)
from tests.lab.workloads import (
    app_pod,
    check_relayed_both_ways,
    inject,
    server_command,
    tproxy_packets,
    wait_for_log,
    with_programs,
)

pytestmark = pytest.mark.kernel

TPROXY_MARK = "0x539"  # 1337, the mark Istio's TPROXY rules set and route by
TPROXY_TABLE = "133"


def injected(images: LabImages, tmp_path: Path, *, native: bool, cni: bool, **annotations: str) -> dict[str, Any]:
    pod = app_pod(**{"sidecar.istio.io/nativeSidecar": str(native).lower(), **annotations})
    sets = ["--set", "components.cni.enabled=true"] if cni else []
    document = inject(pod, tmp_path, "--injector-config", "relay", *sets)
    relay = next(
        c for c in document["spec"]["initContainers" if native else "containers"] if c["name"] == "istio-proxy"
    )
    assert relay["image"] == RELAY_IMAGE
    capture = document["spec"]["initContainers"][0]
    assert capture["name"] == ("istio-validation" if cni else "istio-init")
    assert capture["image"] == images.init
    return with_programs(document, images.init, {"shop": server_command("app")})


def started(pod: Pod, *, cni: bool) -> Pod:
    capture = "istio-validation" if cni else "istio-init"
    assert pod.exit_code(capture) == 0, pod.logs(capture)
    wait_for_log(pod, "istio-proxy", "listening")
    wait_for_log(pod, "shop", "listening")
    return pod


@pytest.mark.parametrize("native", [True, False], ids=["native-sidecar", "container"])
@pytest.mark.parametrize("cni", [False, True], ids=["init-mode", "cni-mode"])
def test_real_traffic_goes_through_the_relay_both_ways(  # noqa: PLR0917 (fixtures and parameters)
    request: pytest.FixtureRequest,
    lab: lab_node.Node,
    images: LabImages,
    relay_image: str,
    run_pod: Callable[..., Pod],
    peer: Pod,
    tmp_path: Path,
    native: bool,
    cni: bool,
) -> None:
    if cni:
        request.getfixturevalue("cni_node")
    pod = started(run_pod(injected(images, tmp_path, native=native, cni=cni)), cni=cni)
    check_relayed_both_ways(lab, pod, peer)


@pytest.mark.parametrize("cni", [False, True], ids=["init-mode", "cni-mode"])
def test_tproxy_delivers_inbound_connections_untouched_to_the_relay(  # noqa: PLR0917 (fixtures and parameters)
    request: pytest.FixtureRequest,
    lab: lab_node.Node,
    images: LabImages,
    relay_image: str,
    run_pod: Callable[..., Pod],
    peer: Pod,
    tmp_path: Path,
    cni: bool,
) -> None:
    """``sidecar.istio.io/interceptionMode: TPROXY``: the capture's policy routing and mangle rules are in the
    pod, and an inbound connection reaches the relay's transparent listener with its destination unchanged
    (the relay in TPROXY mode takes the accepted socket's own address for the destination: had NAT redirected
    it, that would be the relay's 15006, a loop the relay refuses), through the TPROXY rule (its counters)."""
    if cni:
        request.getfixturevalue("cni_node")
    spec = injected(images, tmp_path, native=True, cni=cni, **{"sidecar.istio.io/interceptionMode": "TPROXY"})
    relay = spec["spec"]["initContainers"][1]
    assert "--mode=TPROXY" in relay["args"]
    assert relay["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    pod = started(run_pod(spec), cni=cni)
    assert f"fwmark {TPROXY_MARK} lookup {TPROXY_TABLE}" in pod.in_netns("ip", "rule").stdout
    assert "local default dev lo" in pod.in_netns("ip", "route", "show", "table", TPROXY_TABLE).stdout
    assert tproxy_packets(pod) == 0

    check_relayed_both_ways(lab, pod, peer)
    assert tproxy_packets(pod) > 0
