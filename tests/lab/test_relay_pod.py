"""The relay template on a real runtime: a pod injected with ``inject --injector-config relay`` runs its app,
the capture and the relay (the image built from Dockerfile.proxy), and real connections go through the relay
both ways: in init mode (istio-init) and in CNI mode (the plugin installed by the CNI image's installer,
istio-validation), with the relay as a native sidecar and as a plain container."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import run_cli
from tests.lab import images as lab_images
from tests.lab import node as lab_node
from tests.lab.conftest import LabImages
from tests.lab.kubelet import Pod
from tests.lab.test_cni_pod import cni_node  # noqa: F401 (the fixture, for CNI mode)
from tests.lab.workloads import CLIENT, connect, wait_for_log, with_programs

pytestmark = pytest.mark.kernel

RELAY_IMAGE = "istio-iptables-relay:0.1.0"
APP = """\
apiVersion: v1
kind: Pod
metadata: {name: shop, namespace: default, annotations: {}}
spec:
  containers:
  - name: shop
    image: shop:1
    securityContext: {runAsUser: 1000, runAsGroup: 1000}
    ports: [{containerPort: 8080}]
"""
# The app (and the peer it calls): on 8080, every connection is answered with who it came from.
SERVER = """\
import socket, sys
listener = socket.create_server(("0.0.0.0", 8080), backlog=64)
print("listening", flush=True)
while True:
    connection, peer = listener.accept()
    connection.sendall(f"{sys.argv[1]} from={peer[0]}\\n".encode())
    connection.close()
"""


@pytest.fixture(scope="module")
def relay_image(lab: lab_node.Node, images: LabImages) -> str:
    lab.import_image(lab_images.dockerfile_image("Dockerfile.proxy", RELAY_IMAGE).archive)
    return RELAY_IMAGE


def server(name: str) -> list[str]:
    return ["python3.11", "-c", SERVER, name]


def injected(images: LabImages, tmp_path: Path, *, native: bool, cni: bool) -> dict[str, Any]:
    document = yaml.safe_load(APP)
    document["metadata"]["annotations"]["sidecar.istio.io/nativeSidecar"] = str(native).lower()
    source = tmp_path / "shop.yaml"
    source.write_text(yaml.safe_dump(document))
    sets = ["--set", "components.cni.enabled=true"] if cni else []
    result = run_cli(["inject", "-f", str(source), "--injector-config", "relay", *sets])
    assert result.code == 0, result.stderr
    pod: dict[str, Any] = yaml.safe_load(result.stdout)
    relay = next(c for c in pod["spec"]["initContainers" if native else "containers"] if c["name"] == "istio-proxy")
    assert relay["image"] == RELAY_IMAGE
    capture = pod["spec"]["initContainers"][0]
    assert capture["name"] == ("istio-validation" if cni else "istio-init")
    assert capture["image"] == images.init
    return with_programs(pod, images.init, {"shop": server("app")})


@pytest.mark.parametrize("native", [True, False], ids=["native-sidecar", "container"])
@pytest.mark.parametrize("cni", [False, True], ids=["init-mode", "cni-mode"])
def test_real_traffic_goes_through_the_relay_both_ways(  # noqa: PLR0917 (fixtures and parameters)
    request: pytest.FixtureRequest,
    lab: lab_node.Node,
    images: LabImages,
    relay_image: str,
    run_pod: Callable[..., Pod],
    tmp_path: Path,
    native: bool,
    cni: bool,
) -> None:
    if cni:
        request.getfixturevalue("cni_node")
    # The peer is not injected; its annotation is there because containerd passes the CNI plugin a pod's
    # annotations only when it has some.
    peer_spec = {
        "metadata": {"name": "peer", "namespace": "default", "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": {"containers": [{"name": "peer", "image": images.init, "command": server("peer")}]},
    }
    peer = run_pod(peer_spec)
    wait_for_log(peer, "peer", "listening")
    pod = run_pod(injected(images, tmp_path, native=native, cni=cni))
    capture = "istio-validation" if cni else "istio-init"
    assert pod.exit_code(capture) == 0, pod.logs(capture)
    wait_for_log(pod, "istio-proxy", "listening")
    wait_for_log(pod, "shop", "listening")

    # Outbound: the app's connection reaches the peer through the relay (the peer sees the pod's address).
    assert connect(pod, "shop", peer.ip, 8080) == f"peer from={pod.ip}"
    # Inbound: the node's connection to the app's port arrives from the relay's passthrough address.
    assert lab.in_node("python3", "-c", CLIENT, pod.ip, "8080").stdout.strip() == "app from=127.0.0.6"

    events = [json.loads(line) for line in pod.logs("istio-proxy").splitlines() if '"direction"' in line]
    assert [(e["direction"], e["destination"]) for e in events] == [
        ("outbound", f"{peer.ip}:8080"),
        ("inbound", f"{pod.ip}:8080"),
    ], pod.logs("istio-proxy")
    assert [(e["sent"], e["received"]) for e in events] == [
        (0, len(f"peer from={pod.ip}\n")),
        (0, len("app from=127.0.0.6\n")),
    ]
    assert events[1]["source"].startswith(f"{lab.gateway}:")
