"""The webhook listens dual-stack by default (issue 19): one socket on ``::`` with IPV6_V6ONLY off answers IPv4
and IPv6 clients, on loopback and on the pod's addresses, and falls back to IPv4 alone where the host has no
IPv6. The server runs inside the lab's pod namespace, so that "every address" is only the lab's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the webhook extra is not installed")
pytest.importorskip("cryptography", reason="cryptography (dev extra) is not installed")

from tests.helpers import ROOT
from tests.kernel.netlab import POD4, POD6, Lab
from tests.webhook_lab import Authority, running

pytestmark = pytest.mark.kernel

CLIENT = """
import socket, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[1])
context.check_hostname = False  # the certificate names 127.0.0.1; what is checked here is who answers
for address in sys.argv[3:]:
    try:
        with socket.create_connection((address, int(sys.argv[2])), timeout=10) as raw:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"GET /ready HTTP/1.1\\r\\nHost: webhook\\r\\nConnection: close\\r\\n\\r\\n")
                print(address, tls.recv(100).split(b"\\r\\n")[0].decode())
    except OSError as error:
        print(address, "failed", type(error).__name__)
"""

NO_IPV6 = """
import errno, socket
_socket = socket.socket
class _NoIPv6(_socket):
    def __init__(self, family=-1, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        super().__init__(family, *args, **kwargs)
socket.socket = _NoIPv6
"""
"""A kernel without IPv6 (booted with ipv6.disable=1) cannot be made inside a namespace: the interpreter's
sockets refuse the family instead, as such a kernel does."""


def answers(lab: Lab, ns: str, ca_file: Path, port: int, *addresses: str) -> dict[str, str]:
    output = lab.sh(ns, [sys.executable, "-c", CLIENT, str(ca_file), str(port), *addresses])
    return dict(line.split(" ", 1) for line in output.splitlines())


def test_the_default_address_serves_ipv4_and_ipv6(lab: Lab, tmp_path: Path) -> None:
    authority = Authority()
    with running(tmp_path, authority=authority, prefix=["ip", "netns", "exec", lab.pod], address=None) as server:
        assert "https://[::]:" in server.stderr()
        inside = answers(lab, lab.pod, server.ca_file, server.port, "127.0.0.1", "::1", POD4, POD6)
        from_peer = answers(lab, lab.peer, server.ca_file, server.port, POD4, POD6)
    assert set(inside.values()) == set(from_peer.values()) == {"HTTP/1.1 200 OK"}, (inside, from_peer)


def test_without_ipv6_the_default_address_serves_ipv4(lab: Lab, tmp_path: Path) -> None:
    stub = tmp_path / "no-ipv6"
    stub.mkdir()
    (stub / "sitecustomize.py").write_text(NO_IPV6)
    prefix = ["ip", "netns", "exec", lab.pod, "env", f"PYTHONPATH={stub}:{ROOT}"]
    with running(tmp_path, authority=Authority(), prefix=prefix, address=None) as server:
        assert "no IPv6 on this host" in server.stderr() and "https://0.0.0.0:" in server.stderr()
        found = answers(lab, lab.pod, server.ca_file, server.port, "127.0.0.1", POD4, "::1")
    assert found == {"127.0.0.1": "HTTP/1.1 200 OK", POD4: "HTTP/1.1 200 OK", "::1": "failed ConnectionRefusedError"}
