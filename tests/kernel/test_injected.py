"""The init container ``inject`` writes, run in a pod namespace of the lab: its args, as the injector wrote
them, capture the pod's real traffic into a real proxy, exactly as its annotations asked."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.helpers import run_cli
from tests.kernel.netlab import PEER2_4, PEER4, POD4, POD4_B, PROXY_UID, Lab
from tests.kernel.test_traffic import reply, start, via

pytestmark = pytest.mark.kernel

MANIFEST = """\
apiVersion: v1
kind: Pod
metadata:
  name: shop
  annotations:
    traffic.sidecar.istio.io/includeInboundPorts: "8080"
    traffic.sidecar.istio.io/excludeOutboundPorts: "9090"
    traffic.sidecar.istio.io/excludeOutboundIPRanges: "198.19.0.0/24"
spec:
  containers:
  - {name: shop, image: shop:1, securityContext: {runAsUser: 1000}}  # the lab's app UID
  - {name: istio-proxy, image: auto, securityContext: {runAsUser: 1337, runAsGroup: 1337}}
"""


def injected_args(tmp_path: Any) -> list[str]:
    source = tmp_path / "shop.yaml"
    source.write_text(MANIFEST)
    result = run_cli(["inject", "-f", str(source), "--hardened"])
    assert result.code == 0, result.stderr
    (container,) = yaml.safe_load(result.stdout)["spec"]["initContainers"]
    args: list[str] = container["args"]
    return args


def test_the_injected_init_container_captures_as_annotated(lab: Lab, variant: str, tmp_path: Any) -> None:
    args = injected_args(tmp_path)
    assert args[0] == "istio-iptables"  # the word Istio's image needs; the CLI drops it (tested on its own)
    pod = start(lab, args[1:], variant)

    # Outbound: captured, but for the excluded port and the excluded range.
    assert lab.client(PEER4, 8080, data="o") == via(15001, reply("peer", POD4, PEER4, 8080, "o"))
    assert pod.single_event()["original_dst"] == [PEER4, 8080]
    assert lab.client(PEER4, 9090, data="p") == reply("peer", POD4, PEER4, 9090, "p")
    assert lab.client(PEER2_4, 8080, data="x") == reply("peer2", POD4_B, PEER2_4, 8080, "x")
    # The proxy's own connections (the istio-proxy container's UID) are not captured.
    assert lab.client(PEER4, 8080, data="u", uid=PROXY_UID) == reply("peer", POD4, PEER4, 8080, "u")

    # Inbound: only the included port reaches the proxy.
    got = lab.client(POD4, 8080, data="i", ns=lab.peer, uid=0)
    assert got == via(15006, reply("app", "127.0.0.6", POD4, 8080, "i"))
    assert pod.single_event()["original_dst"] == [POD4, 8080]
    assert lab.client(POD4, 8081, data="n", ns=lab.peer, uid=0) == reply("app", PEER4, POD4, 8081, "n")
    pod.no_new_event()
