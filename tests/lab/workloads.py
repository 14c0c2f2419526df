"""Programs for the app and proxy containers of lab pods (run by the python3.11 of the project's image), and
the pod-spec edits that put them in place of the placeholder images."""

from __future__ import annotations

import copy
import ipaddress
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import run_cli
from tests.lab.kubelet import Pod, PodError
from tests.lab.node import Node

# A stand-in proxy: on each port, every connection is answered with the port that accepted it and the
# connection's original destination (SO_ORIGINAL_DST, which REDIRECT keeps), then closed.
PROXY = """\
import socket, struct, sys, threading
def serve(listener):
    while True:
        connection, peer = listener.accept()
        port, address = struct.unpack("!2xH4s8x", connection.getsockopt(socket.SOL_IP, 80, 16))
        local = listener.getsockname()[1]
        connection.sendall(f"proxy:{local} original_dst={socket.inet_ntoa(address)}:{port} from={peer[0]}\\n".encode())
        connection.close()
threads = []
for port in map(int, sys.argv[1:]):
    listener = socket.create_server(("0.0.0.0", port), backlog=64)
    threads.append(threading.Thread(target=serve, args=(listener,), daemon=True))
for thread in threads:
    thread.start()
print("listening", flush=True)
threads[0].join()
"""
# A connection as an app makes it: the first line of the answer, or the error.
CLIENT = """\
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as connection:
        print(connection.makefile().readline().strip())
except OSError as error:
    print(f"error: {error}")
"""
IDLE = "import time; time.sleep(3600)"
# An app (or the peer an app calls): on 8080, IPv4 and IPv6, every connection is answered with the program's
# name and who the connection came from.
SERVER = """\
import socket, sys
listener = socket.create_server(("::", 8080), family=socket.AF_INET6, backlog=64, dualstack_ipv6=True)
print("listening", flush=True)
while True:
    connection, peer = listener.accept()
    connection.sendall(f"{sys.argv[1]} from={peer[0].removeprefix('::ffff:')}\\n".encode())
    connection.close()
"""
# The app injected in the lab's pods (the image a placeholder: :func:`with_programs` gives it SERVER).
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
# An app pod that brings its own proxy container (the stand-in's image and program: :func:`with_programs`).
APP_WITH_PROXY = """\
apiVersion: v1
kind: Pod
metadata: {name: shop, namespace: default}
spec:
  containers:
  - {name: shop, image: shop:1, securityContext: {runAsUser: 1000}}
  - {name: istio-proxy, image: auto, securityContext: {runAsUser: 1337, runAsGroup: 1337}}
"""
REMOTE = "198.18.97.10"
"""A test address that nothing routes: only the capture can answer a connection to it."""
INBOUND_SOURCE = {4: "127.0.0.6", 6: "::6"}
"""Where the proxy's inbound connections to the app come from: the source Istio's rules leave uncaptured."""


def app_pod(**annotations: str) -> dict[str, Any]:
    """:data:`APP` with these annotations."""
    pod: dict[str, Any] = yaml.safe_load(APP)
    pod["metadata"]["annotations"].update(annotations)
    return pod


def inject(pod: Mapping[str, Any], directory: Path, *options: str) -> dict[str, Any]:
    """The pod as ``istio-iptables inject -f POD OPTIONS`` writes it."""
    source = directory / "pod.yaml"
    source.write_text(yaml.safe_dump(dict(pod)))
    result = run_cli(["inject", "-f", str(source), *options])
    assert result.code == 0, result.stderr
    injected: dict[str, Any] = yaml.safe_load(result.stdout)
    return injected


def with_programs(document: Mapping[str, Any], image: str, programs: Mapping[str, list[str]]) -> dict[str, Any]:
    """The pod spec with each named container running ``programs[name]`` (a command) from ``image``."""
    pod = copy.deepcopy(dict(document))
    containers = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
    found = set()
    for container in containers:
        if container["name"] in programs:
            container["image"] = image
            container["command"] = programs[container["name"]]
            container.pop("args", None)
            found.add(container["name"])
    missing = set(programs) - found
    if missing:
        raise PodError(f"the pod has no container {sorted(missing)}")
    return pod


def proxy_command(*ports: int) -> list[str]:
    return ["python3.11", "-c", PROXY, *map(str, ports)]


def idle_command() -> list[str]:
    return ["python3.11", "-c", IDLE]


def server_command(name: str) -> list[str]:
    return ["python3.11", "-c", SERVER, name]


def address(pod: Pod, version: int) -> str:
    """The pod's IPv4 or IPv6 address."""
    found = [ip for ip in pod.status.ips if ipaddress.ip_address(ip).version == version]
    if not found:
        raise PodError(f"pod {pod.name} has no IPv{version} address: {pod.status.ips}")
    return found[0]


def relay_events(pod: Pod) -> list[dict[str, Any]]:
    """The connections the relay of ``pod`` (its istio-proxy container) logged, in order."""
    return [json.loads(line) for line in pod.logs("istio-proxy").splitlines() if '"direction"' in line]


def check_relayed_both_ways(node: Node, pod: Pod, peer: Pod, version: int = 4) -> None:
    """Real connections over IPv``version`` through the relay of ``pod``, whose app container ``shop`` runs
    :data:`SERVER` as ``app`` and whose ``peer`` runs it as ``peer``: outbound, the app's connection reaches
    the peer from the pod's address; inbound, the node's connection to the app arrives from the relay's
    passthrough address. Each connection must be one the relay logged (the app's own exchange, byte for
    byte), so a capture that lets either by, or a relay that does not relay, fails here."""
    pod_ip, peer_ip = address(pod, version), address(peer, version)
    gateway = next(ip for ip in node.gateways if ipaddress.ip_address(ip).version == version)
    before = len(relay_events(pod))
    outbound = connect(pod, "shop", peer_ip, 8080)
    assert outbound == f"peer from={pod_ip}", outbound
    inbound = node.in_node("python3", "-c", CLIENT, pod_ip, "8080").stdout.strip()
    assert inbound == f"app from={INBOUND_SOURCE[version]}", inbound
    # The relay logs a connection once both sides have closed: a moment after the client has its answer.
    deadline = time.monotonic() + 10
    while len(events := relay_events(pod)[before:]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(e["direction"], e["destination"]) for e in events] == [
        ("outbound", f"{peer_ip}:8080"),
        ("inbound", f"{pod_ip}:8080"),
    ], pod.logs("istio-proxy")
    assert [(e["sent"], e["received"]) for e in events] == [(0, len(outbound) + 1), (0, len(inbound) + 1)]
    assert events[1]["source"].rpartition(":")[0] == gateway


def wait_for_log(pod: Pod, container: str, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in pod.logs(container):
        if time.monotonic() > deadline:
            raise PodError(
                f"{container} of pod {pod.name} did not log {text!r} in {timeout:g} s:\n{pod.logs(container)}"
            )
        time.sleep(0.05)


def connect(pod: Pod, container: str, host: str, port: int) -> str:
    """A TCP connection from ``container`` (its user, its security context), answered or not."""
    result = pod.exec(container, ["python3.11", "-c", CLIENT, host, str(port)], timeout=20)
    if result.exit_code != 0:
        raise PodError(f"the client in {container} exited {result.exit_code}: {result.stderr}")
    return result.stdout.strip()


def tproxy_packets(pod: Pod, version: int = 4) -> int:
    """The packets the pod's rule ``-j TPROXY --on-port 15006`` took (``iptables-save -c`` of the mangle table,
    ``ip6tables-save`` for IPv6, in whichever of iptables' back ends the capture chose)."""
    command = "iptables" if version == 4 else "ip6tables"
    counted = []
    for save in (f"{command}-nft-save", f"{command}-legacy-save"):
        table = pod.in_netns(save, "-c", "-t", "mangle", check=False).stdout
        counted += [line for line in table.splitlines() if "-j TPROXY" in line and "--on-port 15006" in line]
    assert len(counted) == 1, counted
    return int(counted[0].split("]")[0].lstrip("[").split(":")[0])
