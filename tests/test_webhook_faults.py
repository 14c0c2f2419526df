"""The webhook under hostile input and faults (issue 20): each case as an attacker or a clumsy operator would
cause it, against the server as the product runs it. Behaviour is asserted (a 4xx, a closed connection,
``/ready`` answering within its probe's timeout), never how fast this machine is; memory figures are in
scripts/bench.py's soak."""

from __future__ import annotations

import gzip
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp", reason="the webhook extra is not installed")
pytest.importorskip("cryptography", reason="cryptography (dev extra) is not installed")

from istio_iptables.kube.webhook import MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_CONTAINERS, MAX_DEPTH, MAX_VALUES
from tests.webhook_lab import Authority, Webhook, running, wait_for

PROBE_TIMEOUT = 1.0
"""A kubelet probe's default timeoutSeconds: /ready must answer within it, whatever else is going on."""
HEADER_WAIT = 30.0
"""Longer than the server's header and body time limits (10 s each), with room for a loaded machine."""
CAPTURE_ONLY = ["--capture-only"]
"""The webhook injects the capture alone: these pods bring no proxy, and a proxy is not what is tested."""


def review(pod: dict[str, Any], uid: str = "5a1b") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "apps",
            "object": pod,
        },
    }


def small_review() -> bytes:
    return json.dumps(review({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "a"}]}})).encode()


def post(
    webhook: Webhook, body: bytes, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    connection = webhook.connection(timeout=timeout)
    try:
        connection.request(
            "POST", "/inject", body=body, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def ready(webhook: Webhook) -> bool:
    """A probe as the kubelet sends it: a new connection, GET /ready, within the probe's timeout."""
    try:
        connection = webhook.connection(timeout=PROBE_TIMEOUT)
        try:
            connection.request("GET", "/ready")
            return connection.getresponse().status == 200
        finally:
            connection.close()
    except OSError:
        return False


def tls_socket(webhook: Webhook) -> ssl.SSLSocket:
    """A connection whose handshake is done and which has sent nothing yet."""
    context = ssl.create_default_context(cafile=str(webhook.ca_file))
    raw = socket.create_connection(("127.0.0.1", webhook.port), timeout=HEADER_WAIT)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def closed_by_server(connection: ssl.SSLSocket) -> bytes:
    """What the server sends until it closes the connection (b"" if it closes without a word)."""
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return received


def longest_log_line(webhook: Webhook) -> int:
    return max((len(line) for line in webhook.log), default=0)


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Webhook]:
    with running(tmp_path, CAPTURE_ONLY) as server:
        yield server


# ---- bodies ------------------------------------------------------------------------------------------------


def test_a_gzip_bomb_is_refused_while_inflating(webhook: Webhook) -> None:
    """A few hundred kilobytes that inflate to 200 MB: refused with 413 once MAX_BODY_BYTES are out."""
    bomb = gzip.compress(b" " * (200 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < MAX_BODY_BYTES
    for _ in range(5):
        status, text = post(webhook, bomb, {"Content-Encoding": "gzip"})
        assert status == 413, text
    assert ready(webhook)
    status, _ = post(webhook, gzip.compress(small_review()), {"Content-Encoding": "gzip"})
    assert status == 200
    assert "Traceback" not in webhook.stderr()


def test_a_body_labelled_gzip_that_is_not_gets_400(webhook: Webhook) -> None:
    for body in (small_review(), gzip.compress(small_review())[:-8], gzip.compress(small_review()) + b"x"):
        status, text = post(webhook, body, {"Content-Encoding": "gzip"})
        assert status == 400 and b"gzip" in text, (status, text)
    status, text = post(webhook, small_review(), {"Content-Encoding": "br"})
    assert status == 415 and b"Content-Encoding" in text
    assert "Traceback" not in webhook.stderr()


def test_a_body_over_the_limit_is_refused_before_it_is_read(webhook: Webhook) -> None:
    connection = tls_socket(webhook)
    with connection:
        head = "POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
        connection.sendall(f"{head}Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode())
        answer = closed_by_server(connection)  # nothing of the body sent: answered and closed all the same
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Without a length (chunked): counted as it arrives, and the connection closed once over the limit.
    connection = tls_socket(webhook)
    with connection:
        head = "POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
        connection.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        try:
            for _ in range(2 * MAX_BODY_BYTES // 0x10000):
                connection.sendall(chunk)
        except OSError:
            answer = b"HTTP/1.1 413 (closed while sending)"
        else:
            answer = closed_by_server(connection)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_deep_nesting_gets_400_not_500(webhook: Webhook) -> None:
    """Past the limit (the walk after parsing), past the parser's recursion bound, and 100,000 deep (past
    the count of arrays before parsing): each a 400 naming what is wrong, never a traceback."""
    for depth, named in ((MAX_DEPTH + 1, b"nests deeper"), (5_000, b"nests deeper"), (100_000, b"arrays")):
        nested = "[" * depth + "]" * depth
        body = json.dumps(review({"metadata": {"name": "a"}, "spec": {}})).replace('"spec": {}', f'"spec": {nested}')
        status, text = post(webhook, body.encode())
        assert status == 400 and named in text, (depth, status, text[:200])
    assert "Traceback" not in webhook.stderr()


def test_a_body_of_many_small_values_is_refused_before_parsing(webhook: Webhook) -> None:
    """Six megabytes of ``[],`` or ``"ab",`` parse into millions of objects, hundreds of megabytes."""
    for many in ("[]," * (MAX_CONTAINERS + 1), '"ab",' * (MAX_VALUES + 1)):
        body = f'{{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": [{many} 0]}}'
        assert len(body) < MAX_BODY_BYTES
        status, text = post(webhook, body.encode())
        assert status == 400 and b"JSON objects and arrays" in text, (status, text[:200])


def test_a_huge_value_is_not_logged_or_echoed_in_full(webhook: Webhook) -> None:
    body = json.dumps({"apiVersion": "x" * (MAX_BODY_BYTES - 1024), "kind": "AdmissionReview"}).encode()
    status, text = post(webhook, body)
    assert status == 400 and len(text) < 2000, (status, len(text))
    assert wait_for(lambda: "bad request" in webhook.stderr(), 5)
    assert longest_log_line(webhook) < 2000


def test_a_refused_pod_is_named_once_in_its_log_line(webhook: Webhook) -> None:
    annotation = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
    pod = {"metadata": {"name": "shop", "annotations": {annotation: "*" + "1" * 100_000}}, "spec": {}}
    status, text = post(webhook, json.dumps(review(pod)).encode())
    assert status == 200
    message = json.loads(text)["response"]["status"]["message"]
    assert annotation in message and len(message) < 2000
    assert wait_for(lambda: "refused" in webhook.stderr(), 5)
    (line,) = [line for line in webhook.log if "refused" in line]
    assert line.count("apps/shop") == 1, line
    assert annotation in line and len(line) < 2000


def test_a_large_valid_review_does_not_stop_ready_or_other_reviews(webhook: Webhook) -> None:
    """A pod just under the body limit, whose parsing and injection take a while: the probe and a small
    review are answered meanwhile."""
    env = [{"name": f"VARIABLE_{index}", "value": "v" * 20} for index in range(80_000)]
    pod = {"metadata": {"name": "big"}, "spec": {"containers": [{"name": "a", "env": env}]}}
    body = json.dumps(review(pod)).encode()
    assert MAX_BODY_BYTES * 0.6 < len(body) < MAX_BODY_BYTES
    answered: list[int] = []
    big = threading.Thread(target=lambda: answered.append(post(webhook, body, timeout=120)[0]))
    big.start()
    try:
        probes = []
        while big.is_alive() and len(probes) < 50:
            probes.append(ready(webhook))
        assert probes and all(probes), probes
        assert post(webhook, small_review())[0] == 200
    finally:
        big.join(120)
    assert answered == [200]


# ---- connections -------------------------------------------------------------------------------------------


def test_connections_that_send_nothing_or_half_a_request_are_closed(webhook: Webhook) -> None:
    silent, partial, slow_body = tls_socket(webhook), tls_socket(webhook), tls_socket(webhook)
    partial.sendall(b"POST /inject HTTP/1.1\r\nHost: web")
    slow_body.sendall(b"POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n")
    slow_body.sendall(b"Content-Length: 100\r\n\r\n{")
    answers: dict[str, bytes] = {}
    threads = [
        threading.Thread(
            target=lambda name=name, connection=connection: answers.update({name: closed_by_server(connection)})
        )
        for name, connection in (("silent", silent), ("partial", partial), ("slow body", slow_body))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HEADER_WAIT + 10)
    for connection in (silent, partial, slow_body):
        connection.close()
    assert set(answers) == {"silent", "partial", "slow body"}, answers  # each closed by the server
    assert answers["silent"] == answers["partial"] == b""
    assert answers["slow body"].startswith(b"HTTP/1.1 408"), answers["slow body"]
    assert ready(webhook)


def test_more_idle_connections_than_descriptors_never_stop_ready(tmp_path: Path) -> None:
    """Idle connections beyond the cap close the oldest idle one: the probe's new connection is served even
    when the idle ones outnumber the file descriptors the process may open."""
    files = MAX_CONNECTIONS + 64
    with running(tmp_path, CAPTURE_ONLY, files=files) as server:
        idle = []
        try:
            for _ in range(files + 50):
                idle.append(tls_socket(server))
            assert ready(server)
            assert server.review(review({"metadata": {"name": "a"}, "spec": {}}))["response"]["allowed"]
            still_open = 0
            for connection in idle:
                connection.settimeout(0.05)
                try:
                    still_open += connection.recv(1) != b""
                except TimeoutError:
                    still_open += 1
                except (ConnectionResetError, ssl.SSLError):
                    pass
            assert still_open <= MAX_CONNECTIONS
        finally:
            for connection in idle:
                connection.close()
        assert "Traceback" not in server.stderr()


# ---- certificates ------------------------------------------------------------------------------------------


def handshake_with(webhook: Webhook, ca_file: Path) -> bool:
    """Whether a client that trusts only ``ca_file`` completes a handshake now."""
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with (
            socket.create_connection(("127.0.0.1", webhook.port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            return True
    except (ssl.SSLError, OSError):
        return False


@pytest.mark.parametrize(("before", "after"), [("ec", "rsa"), ("rsa", "ec")])
def test_a_rotation_to_another_key_type_ca_and_chain_takes_effect(tmp_path: Path, before: str, after: str) -> None:
    old = Authority(name="old CA")
    root = Authority(name="new root CA")
    new = Authority(name="new intermediate CA", parent=root)  # the new pair comes with a chain
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    old.issue(cert_file, key_file, key_type=before)
    new_ca = tmp_path / "new-ca.crt"
    new_ca.write_bytes(root.pem())
    with running(tmp_path, CAPTURE_ONLY, authority=old, tls=(cert_file, key_file)) as server:
        assert handshake_with(server, server.ca_file) and not handshake_with(server, new_ca)
        serial = new.issue(tmp_path / "next.crt", tmp_path / "next.key", key_type=after)
        os.replace(tmp_path / "next.key", key_file)
        os.replace(tmp_path / "next.crt", cert_file)
        assert wait_for(lambda: handshake_with(server, new_ca), 10), server.stderr()
        server.ca_file = new_ca
        assert server.served_serial() == serial
        assert not handshake_with(server, tmp_path / "ca.crt")
        assert server.review(review({"metadata": {"name": "a"}, "spec": {}}))["response"]["allowed"] is True


def test_a_half_written_pair_of_another_key_type_keeps_the_old_one(tmp_path: Path) -> None:
    authority = Authority()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    authority.issue(cert_file, key_file, key_type="ec")
    with running(tmp_path, authority=authority, tls=(cert_file, key_file)) as server:
        first = server.served_serial()
        authority.issue(tmp_path / "next.crt", tmp_path / "next.key", key_type="rsa")
        os.replace(tmp_path / "next.crt", cert_file)  # the RSA certificate beside the old ECDSA key
        assert wait_for(lambda: "kept the previous TLS certificate" in server.stderr(), 10), server.stderr()
        assert server.served_serial() == first


# ---- the process -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "collects"),
    [
        (["webhook", "--tls-cert-file", "cert.pem", "--tls-key-file", "key.pem"], True),
        (["cni", "install", "--watch", "--cni-conf-dir", "{tmp}/net.d", "--cni-bin-dir", "{tmp}/bin"], True),
        (["cni", "repair"], True),
        (["cni", "agent", "--socket", "{tmp}/agent.sock"], True),
        (["cni", "repair", "--once"], False),
        (["-p", "15001", "--dry-run"], False),
        (["inject", "-f", "-"], False),
    ],
)
def test_only_one_shot_runs_go_without_the_garbage_collector(argv: list[str], collects: bool, tmp_path: Path) -> None:
    """The console entry point turns the collector off before any import; a command that stays up turns it
    back on before it serves. Its loop is replaced by a report of the collector's state (a one-shot run's is
    reported after its end)."""
    probe = (
        "import gc, sys\n"
        f"sys.argv = ['istio-iptables', *{[word.format(tmp=tmp_path) for word in argv]!r}]\n"
        "from istio_iptables.cli import console\n"
        "from istio_iptables.cni import agent, install, repair\n"
        "from istio_iptables.kube import webhook\n"
        "def report(*args, **kwargs):\n"
        "    print(gc.isenabled())\n"
        "    sys.exit(0)\n"
        "webhook.serve = install.watch = repair.run = agent.run = report\n"
        "try:\n"
        "    console.main()\n"
        "except SystemExit:\n"
        "    print(gc.isenabled())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], input="", capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == str(collects), done.stdout + done.stderr
