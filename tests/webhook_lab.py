"""The webhook under test: certificates made here, the server started as the product runs it
(``istio-iptables webhook`` in its own process, on 127.0.0.1, a port the kernel picks) and an HTTPS client
that trusts only the test's CA. Everything is removed afterwards, also on failure."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

SERVICE_NAME = "istio-iptables-webhook.istio-iptables.svc"
START_SECONDS = 30.0
_SERVING = re.compile(r"serving admission reviews on https://(\S+):(\d+) ")


@dataclass
class Authority:
    """A CA that signs server certificates; with a ``parent``, an intermediate CA signed by it, whose
    certificates are written with the intermediate's after them (a chain)."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    name: str = "istio-iptables test CA"
    parent: Authority | None = None

    def __post_init__(self) -> None:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        signer = self.parent or self
        self.certificate = (
            _builder(subject, signer.certificate.subject if self.parent else subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0 if self.parent else 1), critical=True)
            .sign(signer.key, hashes.SHA256())
        )

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        cert_file: Path,
        key_file: Path,
        hosts: Sequence[str] = ("127.0.0.1", SERVICE_NAME),
        key_type: str = "ec",
    ) -> int:
        """Write a server certificate for ``hosts`` and its key (``ec`` P-256 or ``rsa`` 2048 bits), each file
        replaced in one rename, as a Secret's update looks to the reader; returns the certificate's serial
        number."""
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if key_type == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        certificate = (
            _builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
                self.certificate.subject,
                key.public_key(),
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        replace(
            key_file,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        chain = certificate.public_bytes(serialization.Encoding.PEM) + (self.pem() if self.parent else b"")
        replace(cert_file, chain)
        return certificate.serial_number


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def replace(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


@dataclass
class Webhook:
    """A running ``istio-iptables webhook``."""

    process: subprocess.Popen[str]
    port: int
    ca_file: Path
    log: list[str]

    def connection(self, host: str = "127.0.0.1", timeout: float = 10.0) -> http.client.HTTPSConnection:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        return _Connection("127.0.0.1", self.port, host, context=context, timeout=timeout)

    def post(self, body: bytes, content_type: str = "application/json", path: str = "/inject") -> tuple[int, bytes]:
        connection = self.connection()
        try:
            connection.request("POST", path, body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def review(self, review: Mapping[str, Any]) -> dict[str, Any]:
        status, body = self.post(json.dumps(review).encode())
        assert status == 200, body
        answer: dict[str, Any] = json.loads(body)
        return answer

    def served_serial(self) -> int:
        """The serial number of the certificate the server presents now (a fresh handshake)."""
        connection = self.connection()
        try:
            connection.connect()
            der = connection.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        finally:
            connection.close()
        return x509.load_der_x509_certificate(der).serial_number

    def stderr(self) -> str:
        return "".join(self.log)


class _Connection(http.client.HTTPSConnection):
    """Connects to 127.0.0.1 but checks the certificate for ``server_hostname`` (the Service's DNS name, as
    the API server does)."""

    def __init__(self, address: str, port: int, server_hostname: str, **kwargs: Any) -> None:
        super().__init__(address, port, **kwargs)
        self._server_hostname = server_hostname

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_hostname)  # type: ignore[attr-defined]


def review(pod: Mapping[str, Any], uid: str = "5a1b", namespace: str = "apps", **request: Any) -> dict[str, Any]:
    """The AdmissionReview the API server sends for the creation of ``pod`` in ``namespace``."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": namespace,
            "object": pod,
            **request,
        },
    }


def command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "istio_iptables", *arguments]


@contextlib.contextmanager
def running(
    directory: Path,
    extra: Sequence[str] = (),
    *,
    authority: Authority | None = None,
    tls: tuple[Path, Path] | None = None,
    prefix: Sequence[str] = (),
    address: str | None = "127.0.0.1",
    files: int | None = None,
) -> Iterator[Webhook]:
    """The webhook serving on ``address`` (None: its default) with ``extra`` options and the certificate
    ``tls`` (default: a fresh one from ``authority`` in ``directory``), its command after ``prefix`` (``ip
    netns exec NS``) and with at most ``files`` file descriptors if given; stopped (SIGTERM, then SIGKILL)
    afterwards."""
    authority = authority or Authority()
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(authority.pem())
    if tls is None:
        tls = directory / "tls.crt", directory / "tls.key"
        authority.issue(*tls)
    argv = command(
        "webhook",
        *(("--address", address) if address is not None else ()),
        *("--port", "0"),
        *("--tls-cert-file", str(tls[0]), "--tls-key-file", str(tls[1])),
        *extra,
    )
    limit = [] if files is None else ["prlimit", f"--nofile={files}:{files}", "--"]
    process = subprocess.Popen(
        [*prefix, *limit, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    try:
        port = _wait_until_serving(process, log)
        yield Webhook(process, port, ca_file, log)
    finally:
        stop(process)


def _wait_until_serving(process: subprocess.Popen[str], log: list[str]) -> int:
    """Read the server's stderr until it says where it serves; keep reading it in the background after."""
    assert process.stderr is not None
    found: list[int] = []
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            if not found and (match := _SERVING.search(line)):
                found.append(int(match[2]))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(START_SECONDS)
    if not found:
        stop(process)
        raise AssertionError(f"the webhook did not start: {''.join(log)}")
    return found[0]


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(condition: Any, seconds: float, interval: float = 0.1) -> bool:
    """Poll ``condition()`` until true or ``seconds`` passed; bounded in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())
