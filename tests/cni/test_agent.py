"""The node agent (``istio-iptables cni agent``) as a process, on a socket of the test's own, spoken to as the
thin client speaks (VERSION requests: no namespace needed). Hostile requests are refused without an answer
and without affecting the next one; the socket is the owner's alone; a stale socket is replaced, a live
agent's is not; SIGTERM removes the socket. The client and the plugin's real requests are
tests/kernel/test_cni_agent.py's."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_iptables.cni import agent

CLI = str(Path(sys.executable).with_name("istio-iptables"))
VERSION_ANSWER = b'{"cniVersion": "1.0.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}'


def request(environment: dict[str, str], stdin: bytes) -> bytes:
    env = b"".join(f"{key}={value}".encode() + b"\0" for key, value in environment.items())
    return agent.REQUEST.pack(agent.MAGIC, len(env), len(stdin)) + env + stdin


VERSION = request({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}')


def exchange(path: Path, data: bytes, timeout: float = 10) -> bytes:
    """Send, then read until the agent closes; b"" when it closed without an answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        client.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := client.recv(65536):
                received += chunk
        return received


def answer(reply: bytes) -> tuple[int, bytes, bytes]:
    magic, code, out_len, err_len = agent.REPLY.unpack_from(reply)
    assert magic == agent.MAGIC
    body = reply[agent.REPLY.size :]
    assert len(body) == out_len + err_len
    return code, body[:out_len], body[out_len:]


class Running:
    def __init__(self, process: subprocess.Popen[bytes], path: Path) -> None:
        self.process, self.path = process, path


def start(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [CLI, "cni", "agent", "--socket", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_listening(process: subprocess.Popen[bytes], path: Path) -> None:
    """Until a connection to ``path`` is accepted (a stale socket there refuses it)."""
    deadline = time.monotonic() + 30
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the agent did not listen within 30 s"
        time.sleep(0.05)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    path = tmp_path / "agent" / "agent.sock"
    process = start(path)
    try:
        wait_listening(process, path)
        yield Running(process, path)
    finally:
        process.kill()
        process.communicate()


def test_a_request_gets_the_plugins_answer_on_a_socket_only_its_owner_can_use(running: Running) -> None:
    assert answer(exchange(running.path, VERSION)) == (0, VERSION_ANSWER, b"")
    assert stat.S_IMODE(running.path.lstat().st_mode) == 0o600
    assert stat.S_IMODE(running.path.parent.stat().st_mode) == 0o700
    # An error keeps its exit code, its stdout and its stderr.
    code, stdout, stderr = answer(exchange(running.path, request({"CNI_COMMAND": "ADD"}, b"{")))
    assert (code, json.loads(stdout)["code"]) == (1, 6)
    assert stderr.startswith(b"istio-iptables-cni: the network configuration on stdin is not JSON")


@pytest.mark.parametrize(
    "hostile",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n", id="garbage"),
        pytest.param(agent.REQUEST.pack(agent.MAGIC, 16, agent.MAX_STDIN + 1), id="huge-stdin"),
        pytest.param(agent.REQUEST.pack(agent.MAGIC, agent.MAX_ENV + 1, 2), id="huge-environment"),
        pytest.param(request({"LD_PRELOAD": "/tmp/x.so", "CNI_COMMAND": "VERSION"}, b"{}"), id="not-a-cni-variable"),
        pytest.param(VERSION[:-1] + b"\0" * 3, id="trailing-bytes"),
        pytest.param(agent.REQUEST.pack(agent.MAGIC, 3, 2) + b"CNI{}", id="environment-without-nul"),
    ],
)
def test_a_hostile_request_is_refused_and_the_next_is_served(running: Running, hostile: bytes) -> None:
    assert exchange(running.path, hostile) == b""
    assert answer(exchange(running.path, VERSION)) == (0, VERSION_ANSWER, b"")
    assert running.process.poll() is None


def test_a_request_for_a_network_namespace_the_agent_cannot_see_is_left_to_the_client(
    running: Running, tmp_path: Path
) -> None:
    """The bundle, on the node, may see it (a /proc/PID path, a mount the agent's container lacks): the
    agent closes without an answer rather than fail the pod; one it sees is served."""
    stdin = b'{"cniVersion": "1.0.0", "name": "k8s", "type": "istio-iptables-cni"}'
    hidden = request({"CNI_COMMAND": "ADD", "CNI_NETNS": str(tmp_path / "gone"), "CNI_CONTAINERID": "c"}, stdin)
    assert exchange(running.path, hidden) == b""
    seen = request({"CNI_COMMAND": "ADD", "CNI_NETNS": str(tmp_path), "CNI_CONTAINERID": "c"}, stdin)
    code, stdout, _ = answer(exchange(running.path, seen))
    assert (code, json.loads(stdout)["code"]) == (1, 4)  # the plugin's own answer: no CNI_IFNAME


def test_an_idle_connection_holds_no_one_up_and_is_closed_after_the_read_timeout(running: Running) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(str(running.path))
        idle.sendall(VERSION[:10])  # a request begun, never finished
        started = time.monotonic()
        assert answer(exchange(running.path, VERSION)) == (0, VERSION_ANSWER, b"")
        assert time.monotonic() - started < agent.READ_TIMEOUT, "the idle connection held the next one up"
        idle.settimeout(agent.READ_TIMEOUT + 10)
        assert idle.recv(16) == b""  # closed, without an answer


def test_a_stale_socket_is_replaced_and_a_live_agents_is_refused(tmp_path: Path, running: Running) -> None:
    second = subprocess.run(
        [CLI, "cni", "agent", "--socket", str(running.path)], check=False, capture_output=True, timeout=60
    )
    assert second.returncode == 1
    assert second.stderr.decode().splitlines() == [f"istio-iptables: another agent is listening on {running.path}"]
    assert answer(exchange(running.path, VERSION))[0] == 0  # the first one still serves

    stale = tmp_path / "stale" / "agent.sock"
    stale.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(stale))  # bound, never listening: what a killed agent leaves
    process = start(stale)
    try:
        wait_listening(process, stale)
        assert answer(exchange(stale, VERSION))[0] == 0
    finally:
        process.kill()
        process.communicate()


def test_a_directory_open_to_others_or_a_file_in_the_way_is_refused_in_one_line(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)  # another user of the group could put a socket of its own in place
    plain = tmp_path / "private"
    plain.mkdir(mode=0o700)
    (plain / "agent.sock").write_text("not a socket")
    for path, message in (
        (shared / "agent.sock", "must belong to this user and be writable by it alone; it is uid"),
        (plain / "agent.sock", "exists and is not a socket (left alone)"),
        (tmp_path / "missing" / "dir" / "agent.sock", f"{tmp_path / 'missing' / 'dir'}: No such file or directory"),
    ):
        refused = subprocess.run(
            [CLI, "cni", "agent", "--socket", str(path)], check=False, capture_output=True, timeout=60
        )
        assert refused.returncode == 2
        (line,) = refused.stderr.decode().splitlines()
        assert line.startswith(f"istio-iptables: invalid value for --socket: '{path}'")
        assert message in line
    assert (plain / "agent.sock").read_text() == "not a socket"


def test_sigterm_stops_the_agent_and_removes_its_socket(running: Running) -> None:
    assert answer(exchange(running.path, VERSION))[0] == 0
    running.process.send_signal(signal.SIGTERM)
    _, stderr = running.process.communicate(timeout=30)
    assert running.process.returncode == 0, stderr
    assert not running.path.exists()
    assert b"Traceback" not in stderr
    assert sorted(os.listdir(running.path.parent)) == []


def test_the_reply_layout_is_the_clients() -> None:
    """The C client reads these bytes: a change on one side only would make every request fall back."""
    source = (Path(__file__).parents[2] / "cni-client" / "istio-iptables-cni.c").read_text()
    assert f'#define MAGIC "{agent.MAGIC.decode()}"' in source
    assert f"#define MAX_ENV ({agent.MAX_ENV // 1024}u * 1024u)" in source
    assert f"#define MAX_STDIN ({agent.MAX_STDIN // 1024 // 1024}u * 1024u * 1024u)" in source
    assert f"#define MAX_OUTPUT ({agent.MAX_OUTPUT // 1024 // 1024}u * 1024u * 1024u)" in source
    assert (agent.REQUEST.size, agent.REPLY.size) == (12, 16)
    assert struct.calcsize(">4sII") == agent.REQUEST.size
