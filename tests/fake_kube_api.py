"""A fake Kubernetes API server for the CNI plugin's and the node agent's tests: HTTPS on a loopback address,
answering ``GET`` and ``DELETE /api/v1/namespaces/NS/pods/NAME`` from a map of pods, for the bearer token it
was given only.

In-process (``serve`` in a thread, on the test runner's 127.0.0.1) for the client's tests, or as a process
(``python -m tests.fake_kube_api PODS.json --port P --token T --cert C --key K``) inside a node namespace for
the plugin's kernel tests. It stops by itself after ``--lifetime`` seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def make_certificate(folder: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), and its key."""
    certificate, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(certificate)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return certificate, key


def kubeconfig(server: str, ca: Path, **user: str) -> str:
    """A kubeconfig (YAML, as kubectl writes it) for ``server`` trusting ``ca``, with the given user fields."""
    ca_data = base64.b64encode(ca.read_bytes()).decode()
    user_lines = "".join(f"    {key}: {value}\n" for key, value in user.items())
    return (
        "apiVersion: v1\nkind: Config\ncurrent-context: node\n"
        f"clusters:\n- name: lab\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_data}\n"
        "contexts:\n- name: node\n  context:\n    cluster: lab\n    user: cni\n"
        f"users:\n- name: cni\n  user:\n{user_lines}"
    )


def pod(namespace: str, name: str, annotations: Mapping[str, str], proxy_uid: int | None = None) -> dict[str, Any]:
    proxy: dict[str, Any] = {"name": "istio-proxy"}
    if proxy_uid is not None:
        proxy["securityContext"] = {"runAsUser": proxy_uid}
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"namespace": namespace, "name": name, "annotations": dict(annotations)},
        "spec": {"containers": [{"name": "app"}, proxy]},
    }


def make_server(
    pods: Mapping[str, Any], token: str, certificate: Path, key: str | Path, port: int = 0
) -> ThreadingHTTPServer:
    """Serves GET of the pods in ``pods``, and DELETE of them when ``pods`` is a dict (the pod is taken out of
    it; a DeleteOptions body's ``preconditions.uid`` must match the pod's, else 409 Conflict, as the API
    server answers)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            key = self._pod_key()
            if key is not None:
                self._answer(200, pods[key])

        def do_DELETE(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            options = json.loads(self.rfile.read(length) or b"{}")
            key = self._pod_key()
            if key is None:
                return
            uid = (options.get("preconditions") or {}).get("uid")
            if uid is not None and uid != pods[key].get("metadata", {}).get("uid"):
                self._answer(409, {"kind": "Status", "reason": "Conflict", "message": "Precondition failed: UID"})
                return
            assert isinstance(pods, dict), "DELETE needs the pods as a dict"
            self._answer(200, pods.pop(key))

        def _pod_key(self) -> str | None:
            """The ``namespace/name`` of the pod the path names, or None once the error is answered."""
            if self.headers.get("Authorization") != f"Bearer {token}":
                self._answer(401, {"kind": "Status", "message": "Unauthorized"})
                return None
            parts = self.path.strip("/").split("/")
            if len(parts) == 6 and parts[:2] == ["api", "v1"] and parts[2] == "namespaces" and parts[4] == "pods":
                key = f"{parts[3]}/{parts[5]}"
                if key in pods:
                    return key
            self._answer(404, {"kind": "Status", "message": "not found"})
            return None

        def _answer(self, status: int, document: object) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


@contextmanager
def serve(pods: Mapping[str, Any], token: str, certificate: Path, key: Path) -> Iterator[str]:
    """The server in a thread of this process; yields its URL."""
    server = make_server(pods, token, certificate, key)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_kube_api")
    parser.add_argument("pods", help="a JSON map of 'namespace/name' to Pod objects")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--lifetime", type=int, default=300)
    args = parser.parse_args()
    signal.alarm(args.lifetime)  # SIGALRM's default action ends the process
    pods = json.loads(Path(args.pods).read_text())
    server = make_server(pods, args.token, Path(args.cert), Path(args.key), args.port)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
