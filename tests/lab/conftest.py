"""Fixtures of the kubelet lab (tests/lab/README in docs/development.md, "The kubelet lab").

- ``lab``: the session's node, containerd's CRI in a namespace of its own, the pause image loaded
  (:class:`tests.lab.node.Node`; ``lab.runtime`` is a :class:`istio_iptables.cni.cri.Runtime`);
- ``images``: the project's images built from ``Dockerfile`` and ``Dockerfile.cni`` and loaded into ``lab``
  (:class:`LabImages`: ``images.init``, ``images.cni`` are the names pod specs use);
- ``relay_image``: the relay's image (``Dockerfile.proxy``, the relay template's proxy) loaded into ``lab``;
- ``kubelet``: runs pod specs on ``lab`` (:meth:`tests.lab.kubelet.Kubelet.run_pod`) and removes every pod
  it ran when the test ends, passed or failed;
- ``run_pod``: ``kubelet.run_pod`` itself;
- ``peer``: a pod that is not injected, where an app's outbound connections go (it answers on 8080, as
  :func:`tests.lab.workloads.check_relayed_both_ways` expects).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers import sigterm_interrupts
from tests.lab import images as lab_images
from tests.lab import node as lab_node
from tests.lab.kubelet import Kubelet, Pod
from tests.lab.workloads import server_command, wait_for_log

INIT_IMAGE = "istio-iptables:0.1.0"
CNI_IMAGE = "istio-iptables-cni:0.1.0"
RELAY_IMAGE = "istio-iptables-relay:0.1.0"


@dataclass(frozen=True)
class LabImages:
    init: str
    cni: str


@pytest.fixture(scope="session", autouse=True)
def _lab_session() -> Iterator[None]:
    """Sweep the nodes of killed earlier runs; turn SIGTERM into KeyboardInterrupt so teardown runs."""
    if lab_node.missing_prerequisites() is None:
        lab_node.sweep_stale_nodes()
    with sigterm_interrupts():
        yield


@pytest.fixture(scope="session")
def lab() -> Iterator[lab_node.Node]:
    reason = lab_node.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    with lab_node.Node() as node:
        node.import_image(lab_images.pause_image().archive)
        yield node


@pytest.fixture(scope="session")
def images(lab: lab_node.Node) -> LabImages:
    reason = lab_images.missing_prerequisites()
    if reason:
        pytest.skip(reason)
    for dockerfile, name in (("Dockerfile", INIT_IMAGE), ("Dockerfile.cni", CNI_IMAGE)):
        lab.import_image(lab_images.dockerfile_image(dockerfile, name).archive)
    return LabImages(init=INIT_IMAGE, cni=CNI_IMAGE)


@pytest.fixture(scope="session")
def relay_image(lab: lab_node.Node, images: LabImages) -> str:
    lab.import_image(lab_images.dockerfile_image("Dockerfile.proxy", RELAY_IMAGE).archive)
    return RELAY_IMAGE


@pytest.fixture
def kubelet(lab: lab_node.Node) -> Iterator[Kubelet]:
    runner = Kubelet(lab)
    try:
        yield runner
    finally:
        runner.remove_all()


@pytest.fixture
def run_pod(kubelet: Kubelet) -> Callable[..., Pod]:
    def run(document: Any, **options: Any) -> Pod:
        return kubelet.run_pod(document, **options)

    return run


@pytest.fixture
def peer(images: LabImages, run_pod: Callable[..., Pod]) -> Pod:
    # The annotation is there because containerd passes the CNI plugin a pod's annotations only when it has some.
    spec = {
        "metadata": {"name": "peer", "namespace": "default", "annotations": {"sidecar.istio.io/inject": "false"}},
        "spec": {"containers": [{"name": "peer", "image": images.init, "command": server_command("peer")}]},
    }
    pod = run_pod(spec)
    wait_for_log(pod, "peer", "listening")
    return pod
