"""Programs for the app and proxy containers of lab pods (run by the python3.11 of the project's image), and
the pod-spec edits that put them in place of the placeholder images."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

from tests.lab.kubelet import Pod, PodError

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
