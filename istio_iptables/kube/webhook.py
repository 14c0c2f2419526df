"""The admission webhook: Kubernetes sends each pod being created here before it stores it, and the answer is
the JSON Patch that turns the pod into what ``inject`` makes of it.

The injection itself is not here: the server is given it as a function (``Inject``), the same one ``inject``
runs, so a pod injected by hand and one injected by the webhook cannot differ. This module adds only the
AdmissionReview protocol (``answer``, pure), HTTPS and the certificate's reload (``serve``).

Only ``istio-iptables webhook`` imports this module: the HTTP server library costs more start-up than the init
container's whole run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jsonpatch
from aiohttp import web

from istio_iptables.errors import ConfigError, HostError
from istio_iptables.kube.inject import Outcome
from istio_iptables.log import Log

log = Log(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Inject = Callable[[Mapping[str, Any], str, str], "Outcome"]
"""One pod's injection: the pod as the API server sent it, how to name it in a message and its namespace give
the pod to store (equal to the input when nothing is to be done) and why; a ConfigError refuses the pod, its
message saying why."""

API_VERSION = "admission.k8s.io/v1"
DRAIN_SECONDS = 4.0
"""After SIGTERM, reviews in flight get this long to finish: the process is gone within 5 s."""
RELOAD_POLL_SECONDS = 1.0
"""How often the certificate files are looked at. Polling sees every way a file is replaced, including the
symlink swap by which the kubelet updates a mounted Secret, which inotify on the file itself would miss."""
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Larger than any review: the API server refuses objects over 1.5 MiB (etcd's request limit)."""


class NotAReviewError(ValueError):
    """The body is not an admission.k8s.io/v1 AdmissionReview with a request (HTTP 400)."""


# ---- the protocol (pure) ----------------------------------------------------------------------------------


def answer(review: Any, inject: Inject) -> dict[str, Any]:
    """The AdmissionReview answering ``review`` (a parsed JSON body): the pod admitted with the patch that
    injects it, admitted unchanged, or refused with the injection's message."""
    request = _request(review)
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    if _creates_a_pod(request):
        pod = request["object"]
        namespace = _namespace(pod, request)
        workload = f"pod {namespace}/{_name(pod)}"
        started = time.perf_counter()
        try:
            outcome = inject(pod, workload, namespace)
        except ConfigError as error:
            log.info("refused %s: %s", workload, error)
            response.update(allowed=False, status={"code": 400, "reason": "BadRequest", "message": str(error)})
        else:
            patch = json_patch(pod, outcome.pod)
            elapsed = (time.perf_counter() - started) * 1000
            log.info("%s: %s", workload, outcome.reason)
            log.debug("%s: %d patch operations (%.1f ms)", workload, len(patch), elapsed)
            # kubectl shows the creator each warning: why the pod got (or did not get) a sidecar.
            response["warnings"] = [f"istio-iptables: {outcome.reason}"]
            if patch:
                response.update(patchType="JSONPatch", patch=base64.b64encode(json.dumps(patch).encode()).decode())
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}


def json_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The RFC 6902 operations from ``before`` to ``after``: the API server applies them to the object it
    sent, which is ``before``. Keys are escaped as JSON Pointer wants (``sidecar.istio.io~1status``); the new
    init container comes out as one ``add`` at its index."""
    operations: list[dict[str, Any]] = jsonpatch.make_patch(before, after).patch
    return operations


def _request(review: Any) -> dict[str, Any]:
    if not isinstance(review, dict):
        raise NotAReviewError("the body is not a JSON object")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise NotAReviewError(
            f"not an {API_VERSION} AdmissionReview (apiVersion {review.get('apiVersion')!r}, "
            f"kind {review.get('kind')!r}); the webhook configuration must list admissionReviewVersions: [v1]"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise NotAReviewError("the AdmissionReview has no request")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise NotAReviewError("the AdmissionReview's request has no uid")
    if _creates_a_pod(request) and not isinstance(request.get("object"), dict):
        raise NotAReviewError("the AdmissionReview's request has no object (the pod)")
    return request


def _creates_a_pod(request: Mapping[str, Any]) -> bool:
    """Only a pod's creation can be injected: a pod's init containers cannot change afterwards, and other
    objects (a misconfigured webhook's rules) are not pods. Everything else is admitted unchanged."""
    kind = request.get("kind")
    return (
        isinstance(kind, dict)
        and (kind.get("group") or "", kind.get("kind")) == ("", "Pod")
        and request.get("operation") == "CREATE"
        and not request.get("subResource")
    )


def _namespace(pod: Mapping[str, Any], request: Mapping[str, Any]) -> str:
    """At creation the namespace may be only in the request."""
    namespace = _metadata(pod).get("namespace") or request.get("namespace") or "default"
    return str(namespace)


def _name(pod: Mapping[str, Any]) -> str:
    """At creation a pod of a ReplicaSet has no name yet, only its generateName prefix."""
    metadata = _metadata(pod)
    return str(metadata.get("name") or f"{metadata.get('generateName') or ''}*")


def _metadata(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    metadata = pod.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


# ---- HTTPS -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Listen:
    """Where and with which certificate to serve."""

    address: str
    port: int
    cert_file: str
    key_file: str


class Certificate:
    """The server's TLS context and the files it comes from. A changed pair is loaded into the same context,
    so the next handshake uses it and nothing restarts; a pair that does not load (the key not yet written
    beside its new certificate) leaves the old one serving."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        for flag, path in (("--tls-cert-file", cert_file), ("--tls-key-file", key_file)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as error:
                raise ConfigError(f"invalid value for {flag}: '{path}': {error.strerror}") from None
        self._loaded = self._signature()
        self._refused: tuple[tuple[int, int, int, int], ...] | None = None
        try:
            self.context.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as error:
            raise ConfigError(
                f"invalid value for --tls-cert-file/--tls-key-file: '{cert_file}', '{key_file}': "
                f"not a PEM certificate chain and its private key ({error.reason or error})"
            ) from None

    def reload_if_changed(self) -> None:
        """Load the files again if they changed since the last load (or the last refused pair)."""
        seen = self._signature()
        if seen in (self._loaded, self._refused, None):
            return
        try:
            # A scratch context first: a failed load_cert_chain may leave the live one half-replaced.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            self._refused = seen  # said once; tried again when either file changes
            log.warning(
                "kept the previous TLS certificate: %s and %s do not load: %s", self.cert_file, self.key_file, error
            )
            return
        self._loaded = seen
        log.info("loaded the new TLS certificate from %s", self.cert_file)

    def _signature(self) -> tuple[tuple[int, int, int, int], ...] | None:
        """What changes when either file is rewritten or replaced (stat follows the Secret's symlinks)."""
        try:
            stats = [os.stat(path) for path in (self.cert_file, self.key_file)]
        except OSError:
            return None
        return tuple((stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size) for stat in stats)


def serve(listen: Listen, inject: Inject) -> None:
    """Serve until SIGTERM or SIGINT, then drain: stop listening, let the requests in flight finish (at most
    DRAIN_SECONDS) and return."""
    certificate = Certificate(listen.cert_file, listen.key_file)
    asyncio.run(_serve(listen, certificate, inject))


class _Drain:
    """The requests being handled, counted from their headers' arrival: aiohttp's own shutdown stops reading
    from every connection at once, which would cut off a review whose body is still arriving."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @web.middleware
    async def track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.in_flight += 1
        self.idle.clear()
        try:
            response = await handler(request)
            if self.draining:
                response.force_close()  # the client's next request opens a connection to another replica
            return response
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()


def _application(inject: Inject, drain: _Drain) -> web.Application:
    async def review(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return web.Response(status=415, text=f"Content-Type must be application/json, not {request.content_type}\n")
        try:
            body = json.loads(await request.read())
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            return _bad_request(request, f"the body is not JSON: {error}")
        try:
            return web.json_response(answer(body, inject))
        except NotAReviewError as error:
            return _bad_request(request, str(error))

    async def ready(_: web.Request) -> web.Response:
        return web.Response(status=503, text="draining\n") if drain.draining else web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[drain.track])
    app.router.add_post("/inject", review)
    app.router.add_post("/inject/{rest:.*}", review)  # Istio's injector also serves /inject/cluster/.../net/...
    app.router.add_get("/ready", ready)
    return app


def _bad_request(request: web.Request, reason: str) -> web.Response:
    log.warning("bad request to %s: %s", request.path, reason)
    return web.Response(status=400, text=f"{reason}\n")


async def _serve(listen: Listen, certificate: Certificate, inject: Inject) -> None:
    drain = _Drain()
    # The runner's own shutdown only closes what the drain left: idle keep-alive connections.
    runner = web.AppRunner(_application(inject, drain), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, listen.address, listen.port, ssl_context=certificate.context)
        try:
            await site.start()
        except OSError as error:
            raise HostError(
                f"cannot listen on {listen.address} port {listen.port}: {error.strerror or error}"
            ) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        host, port = runner.addresses[0][:2]
        log.info("serving admission reviews on https://%s:%d (POST /inject, GET /ready)", _bracketed(host), port)
        watcher = asyncio.create_task(_watch(certificate))
        await stop.wait()
        watcher.cancel()
        drain.draining = True
        await site.stop()
        log.info("stopped listening; finishing %d request(s) in flight", drain.in_flight)
        try:
            await asyncio.wait_for(drain.idle.wait(), DRAIN_SECONDS)
        except asyncio.TimeoutError:
            log.warning("%d request(s) still in flight after %.0f s: closing them", drain.in_flight, DRAIN_SECONDS)
    finally:
        await runner.cleanup()


async def _watch(certificate: Certificate) -> None:
    while True:
        await asyncio.sleep(RELOAD_POLL_SECONDS)
        certificate.reload_if_changed()


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
