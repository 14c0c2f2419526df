"""The pod from the Kubernetes API, for runtimes that do not pass the pod's annotations to the plugin, and
the deletion of a pod the node agent cannot repair in place.

One HTTPS GET of ``/api/v1/namespaces/NS/pods/NAME`` with the credentials of a kubeconfig (the cluster's
server and CA, the user's bearer token or client certificate), retried until a deadline: a pod's ADD may
come while the API server is briefly unreachable, and a plugin must neither hang nor fail open. A DELETE
names the pod's uid as a precondition, so that a pod of the same name created since is never the one deleted.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from istio_iptables.errors import IstioIptablesError
from istio_iptables.records import record

DEADLINE = 10.0
"""Seconds an ADD may spend getting its pod (the runtime's own timeout is minutes; a pod waits meanwhile)."""
ATTEMPT_TIMEOUT = 3.0
RETRY_PAUSE = 0.5


class KubeError(IstioIptablesError):
    """The kubeconfig is unusable or the API server did not give us the pod."""


@record
class Owner:
    """One of a pod's ``ownerReferences``."""

    kind: str
    name: str
    controller: bool


@record
class Pod:
    annotations: Mapping[str, str]
    labels: Mapping[str, str]
    containers: tuple[str, ...]
    proxy_uid: int | None
    """The ``runAsUser`` of the pod's ``istio-proxy`` container, if it sets one."""
    uid: str = ""
    owners: tuple[Owner, ...] = ()
    restart_policy: str = "Always"


@record
class Credentials:
    server: str
    ca_pem: str | None
    """The cluster's CA certificates; None: the system's."""
    insecure: bool
    token: str | None
    client_cert_pem: str | None
    client_key_pem: str | None


def get_pod(kubeconfig: str, namespace: str, name: str, deadline: float = DEADLINE) -> Pod:
    credentials = read_kubeconfig(kubeconfig)
    path = f"/api/v1/namespaces/{_segment(namespace)}/pods/{_segment(name)}"
    end = time.monotonic() + deadline
    while True:
        try:
            return pod_of(_get(credentials, path, min(ATTEMPT_TIMEOUT, max(end - time.monotonic(), 0.1))))
        except KubeError as error:
            if time.monotonic() + RETRY_PAUSE >= end:
                raise KubeError(f"cannot get pod {namespace}/{name} from {credentials.server}: {error}") from None
        time.sleep(RETRY_PAUSE)


def pod_of(document: object) -> Pod:
    """The parts of a Pod object the plugin reads."""
    if not isinstance(document, Mapping) or document.get("kind", "Pod") != "Pod":
        raise KubeError("the answer is not a Pod")
    metadata = _map(document.get("metadata"))
    spec = _map(document.get("spec"))
    listed = spec.get("containers")
    containers = [_map(item) for item in listed if isinstance(item, Mapping)] if isinstance(listed, list) else []
    proxy = next((container for container in containers if container.get("name") == "istio-proxy"), {})
    uid = _map(proxy.get("securityContext")).get("runAsUser")
    references = metadata.get("ownerReferences")
    owners = tuple(
        Owner(str(owner.get("kind", "")), str(owner.get("name", "")), owner.get("controller") is True)
        for owner in (references if isinstance(references, list) else [])
        if isinstance(owner, Mapping)
    )
    return Pod(
        {str(key): str(value) for key, value in _map(metadata.get("annotations")).items()},
        {str(key): str(value) for key, value in _map(metadata.get("labels")).items()},
        tuple(str(container.get("name")) for container in containers),
        uid if isinstance(uid, int) and not isinstance(uid, bool) else None,
        str(metadata.get("uid", "")),
        owners,
        str(spec.get("restartPolicy", "Always")),
    )


def delete_pod(kubeconfig: str, namespace: str, name: str, uid: str, deadline: float = DEADLINE) -> bool:
    """Delete the pod if it is still the one of ``uid``; False when it is gone already (or is another pod)."""
    credentials = read_kubeconfig(kubeconfig)
    path = f"/api/v1/namespaces/{_segment(namespace)}/pods/{_segment(name)}"
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}}
    end = time.monotonic() + deadline
    while True:
        try:
            timeout = min(ATTEMPT_TIMEOUT, max(end - time.monotonic(), 0.1))
            _request(credentials, "DELETE", path, timeout, body)
            return True
        except _GoneError:
            return False
        except KubeError as error:
            if time.monotonic() + RETRY_PAUSE >= end:
                raise KubeError(f"cannot delete pod {namespace}/{name} at {credentials.server}: {error}") from None
        time.sleep(RETRY_PAUSE)


def read_kubeconfig(path: str) -> Credentials:
    """The current context's cluster and user of a kubeconfig (JSON, or YAML as kubectl writes it)."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise KubeError(f"cannot read kubeconfig {path}: {error.strerror}") from None
    document = _load(text, path)
    current = document.get("current-context")
    context = _named(document, "contexts", "context", current, path) if current else {}
    cluster_name, user_name = context.get("cluster"), context.get("user")
    if not current:  # no context: the only cluster and the only user, as kubectl takes them
        cluster_name, user_name = _only_name(document, "clusters"), _only_name(document, "users")
    cluster = _named(document, "clusters", "cluster", cluster_name, path)
    user = _named(document, "users", "user", user_name, path) if user_name else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith("https://"):
        raise KubeError(f"kubeconfig {path}: the cluster's server must be an https:// URL")
    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = _read_file(str(user["tokenFile"]), path).strip()
    return Credentials(
        server.rstrip("/"),
        _pem(cluster, "certificate-authority", path),
        cluster.get("insecure-skip-tls-verify") is True,
        str(token) if token else None,
        _pem(user, "client-certificate", path),
        _pem(user, "client-key", path),
    )


def _only_name(document: Mapping[str, Any], section: str) -> object:
    entries = document.get(section)
    if isinstance(entries, list) and len(entries) == 1 and isinstance(entries[0], Mapping):
        return entries[0].get("name")
    return None


def _load(text: str, path: str) -> Mapping[str, Any]:
    try:
        document = json.loads(text)
    except ValueError:
        import yaml  # noqa: PLC0415 (only a YAML kubeconfig needs it)

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise KubeError(f"kubeconfig {path} is neither JSON nor YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(document, Mapping):
        raise KubeError(f"kubeconfig {path} is not a map")
    return document


def _named(document: Mapping[str, Any], section: str, key: str, name: object, path: str) -> Mapping[str, Any]:
    entries = document.get(section)
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, Mapping) and entry.get("name") == name:
            return _map(entry.get(key))
    raise KubeError(f"kubeconfig {path}: no {key} named '{name}' in {section}")


def _pem(section: Mapping[str, Any], key: str, path: str) -> str | None:
    data = section.get(f"{key}-data")
    if data:
        try:
            return base64.b64decode(str(data), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise KubeError(f"kubeconfig {path}: {key}-data is not base64 PEM") from None
    file = section.get(key)
    return _read_file(str(file), path) if file else None


def _read_file(name: str, kubeconfig: str) -> str:
    # Relative paths in a kubeconfig are relative to the kubeconfig's folder (kubectl's rule).
    full = os.path.join(os.path.dirname(kubeconfig), name)
    try:
        with open(full, encoding="utf-8") as file:
            return file.read()
    except OSError as error:
        raise KubeError(f"kubeconfig {kubeconfig}: cannot read {full}: {error.strerror}") from None


class _GoneError(KubeError):
    """404 (no such pod) or 409 (a precondition failed: another pod of that name)."""


def _get(credentials: Credentials, path: str, timeout: float) -> object:
    return _request(credentials, "GET", path, timeout)


def _request(credentials: Credentials, method: str, path: str, timeout: float, body: object = None) -> object:
    import http.client  # noqa: PLC0415 (only pods whose annotations the runtime did not pass)
    import ssl  # noqa: PLC0415
    from urllib.parse import urlsplit  # noqa: PLC0415

    url = urlsplit(credentials.server)
    headers = {"Accept": "application/json", "User-Agent": "istio-iptables-cni"}
    if credentials.token:
        headers["Authorization"] = f"Bearer {credentials.token}"
    payload = None if body is None else json.dumps(body).encode()
    if payload is not None:
        headers["Content-Type"] = "application/json"
    try:
        context = ssl.create_default_context(cadata=credentials.ca_pem)
        if credentials.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        with _client_certificate(context, credentials):
            host, port = url.hostname or "", url.port or 443
            connection = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
            try:
                connection.request(method, url.path.rstrip("/") + path, body=payload, headers=headers)
                response = connection.getresponse()
                answer = response.read(4 << 20)
            finally:
                connection.close()
    except (OSError, ssl.SSLError, http.client.HTTPException) as error:
        raise KubeError(str(error) or type(error).__name__) from None
    if method == "DELETE" and response.status in (404, 409):
        raise _GoneError(f"HTTP {response.status}")
    if response.status not in (200, 202):
        raise KubeError(f"HTTP {response.status} {response.reason}: {answer[:200].decode(errors='replace')}")
    try:
        return json.loads(answer)
    except ValueError:
        raise KubeError("the answer is not JSON") from None


@contextmanager
def _client_certificate(context: object, credentials: Credentials) -> Iterator[None]:
    """Load the client certificate, if any: ``ssl`` reads it only from files, so from a private folder
    that is removed again at once."""
    if not (credentials.client_cert_pem and credentials.client_key_pem):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="istio-iptables-cni-") as folder:
        certificate, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        for name, text in ((certificate, credentials.client_cert_pem), (key, credentials.client_key_pem)):
            with open(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as file:
                file.write(text)
        try:
            context.load_cert_chain(certificate, key)  # type: ignore[attr-defined]
        except (OSError, ValueError) as error:
            raise KubeError(f"the kubeconfig's client certificate is unusable: {error}") from None
        yield


def _segment(text: str) -> str:
    if not text or "/" in text or text in (".", ".."):
        raise KubeError(f"'{text}' is not a Kubernetes name")
    return text


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
