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
import errno
import json
import os
import re
import resource
import signal
import socket
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from istio_iptables.errors import ConfigError, HostError, MissingExtraError
from istio_iptables.kube.inject import Outcome
from istio_iptables.log import Log

try:
    import jsonpatch
    from aiohttp import web
except ModuleNotFoundError:  # the plain install has neither; this module is the only one that needs them
    raise MissingExtraError("webhook", "webhook") from None

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
MAX_BODY_BYTES = 6 * 1024 * 1024
"""The largest body, as sent and again once inflated. The API server takes request bodies of at most 3 MiB
(its MaxRequestBodyBytes) and etcd stores objects of at most 1.5 MiB: the review of any pod it could store,
JSON around it included, fits twice over."""
MAX_DEPTH = 100
"""The deepest nesting of a review's JSON. A pod's schema nests about 20 levels (managedFields included), and
the API server prunes fields it does not know: deeper is not a pod."""
MAX_CONTAINERS = 100_000
MAX_VALUES = 500_000
"""The most JSON objects and arrays, and the most values, in a body: a pod's containers, env entries, volumes
and the like number in the thousands, while 6 MiB of ``[],`` would parse into 2 million lists (over 100 MB).
Each is counted before parsing, as its brackets and commas (those within strings too: an overcount)."""
MAX_CONNECTIONS = 128
"""Open connections at most. The API server keeps a few per replica; beyond this the one idle longest is
closed to make room, so a new connection (the kubelet's probe, a review) is always served."""
HANDSHAKE_SECONDS = 10.0
HEADER_SECONDS = 10.0
"""From the end of the TLS handshake to the end of the first request's headers."""
BODY_SECONDS = 10.0
"""From the headers to the end of the body (waiting for a turn included): the API server gives up on a
webhook after its timeoutSeconds, 10 s by default, so a longer request helps nobody."""
IDLE_SECONDS = 120.0
"""An idle keep-alive connection, or one that sends only part of its next request's headers, is closed after
this. Longer than the API server's own idle timeout (90 s), so that it is the client that closes, with no race
on a request being sent."""
REVIEWS_AT_ONCE = 4
"""Bodies read and held at once; the others wait their turn (within BODY_SECONDS)."""


class NotAReviewError(ValueError):
    """The body is not an admission.k8s.io/v1 AdmissionReview with a request (HTTP 400)."""


class _RefusedError(Exception):
    """A request refused before it is reviewed: its HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


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
            message = bounded(str(error))
            # The injection's message names the workload already; the line names it once.
            log.info("refused %s", message if workload in message else f"{workload}: {message}")
            response.update(allowed=False, status={"code": 400, "reason": "BadRequest", "message": message})
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
            f"not an {API_VERSION} AdmissionReview (apiVersion {_shown(review.get('apiVersion'))}, "
            f"kind {_shown(review.get('kind'))}); the webhook configuration must list admissionReviewVersions: [v1]"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        raise NotAReviewError("the AdmissionReview has no request")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise NotAReviewError("the AdmissionReview's request has no uid")
    if _creates_a_pod(request) and not isinstance(request.get("object"), dict):
        raise NotAReviewError("the AdmissionReview's request has no object (the pod)")
    return request


def parse(body: bytes) -> Any:
    """The JSON of a body, refused (NotAReviewError) when it is not JSON, holds more objects, arrays or values
    than MAX_CONTAINERS and MAX_VALUES (counted before parsing: each costs tens of bytes parsed for 2 or 3 in
    the body) or nests deeper than MAX_DEPTH."""
    containers = body.count(b"{") + body.count(b"[")
    if containers > MAX_CONTAINERS or containers + body.count(b",") > MAX_VALUES:
        raise NotAReviewError(
            f"the body holds more than {MAX_CONTAINERS} JSON objects and arrays or {MAX_VALUES} values"
        )
    try:
        tree = json.loads(body)
    except RecursionError:  # the parser's own bound, far below what it would take to exhaust the stack
        raise NotAReviewError(f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise NotAReviewError(f"the body is not JSON: {bounded(str(error))}") from None
    # Depth first with one iterator per level: memory grows with the depth, never with a list's length.
    levels: list[Iterator[Any]] = [iter((tree,))]
    while levels:
        for node in levels[-1]:
            if isinstance(node, (dict, list)):
                if len(levels) > MAX_DEPTH:
                    raise NotAReviewError(f"the body nests deeper than {MAX_DEPTH} levels")
                levels.append(iter(node.values() if isinstance(node, dict) else node))
                break
        else:
            levels.pop()
    return tree


_LONG_WORD = re.compile(r"\S{201,}")


def bounded(text: str, limit: int = 1000) -> str:
    """``text`` on one line of at most about ``limit`` characters, each run of more than 200 characters
    without a blank (a value) cut short, so that the words around a value (the key it belongs to) remain."""
    text = _LONG_WORD.sub(lambda word: f"{word[0][:80]}…[{len(word[0])} characters]", text)
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}…[{len(text)} characters]"


def _shown(value: Any) -> str:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return shown if len(shown) <= 64 else f"{shown[:60]}…[{len(shown)} characters]"


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
    """Where and with which certificate to serve. The address ``::`` is every address of both families (one
    socket with IPV6_V6ONLY off), or of IPv4 alone where the host has no IPv6."""

    address: str
    port: int
    cert_file: str
    key_file: str


class Certificate:
    """The server's TLS contexts and the files they come from. Each pair loaded makes a new context, and the
    listening context hands every new connection to the latest one during its handshake (before the server's
    certificate is chosen), so a rotation of any kind (another key type, CA or chain) is served from the next
    connection on and nothing restarts; loading into the live context instead would add a key beside the old
    one, and clients would keep getting the old certificate. A pair that does not load (the key not yet
    written beside its new certificate) leaves the previous one serving."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        for flag, path in (("--tls-cert-file", cert_file), ("--tls-key-file", key_file)):
            try:
                with open(path, "rb"):
                    pass
            except OSError as error:
                raise ConfigError(f"invalid value for {flag}: '{path}': {error.strerror}") from None
        self._loaded = self._signature()
        self._refused: tuple[tuple[int, int, int, int], ...] | None = None
        try:
            self.current = self._load()
        except ssl.SSLError as error:
            raise ConfigError(
                f"invalid value for --tls-cert-file/--tls-key-file: '{cert_file}', '{key_file}': "
                f"not a PEM certificate chain and its private key ({error.reason or error})"
            ) from None
        self.listening = self._load()
        self.listening.sni_callback = self._choose  # called with or without a server name from the client

    def _choose(self, connection: ssl.SSLObject, server_name: str | None, listening: ssl.SSLContext) -> None:
        connection.context = self.current

    def _load(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)  # refuses a key that is not the certificate's
        return context

    def reload_if_changed(self) -> None:
        """Load the files again if they changed since the last load (or the last refused pair)."""
        seen = self._signature()
        if seen in (self._loaded, self._refused, None):
            return
        try:
            self.current = self._load()
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
    _raise_file_limit()
    asyncio.run(_serve(listen, certificate, inject))


def _raise_file_limit() -> None:
    """The soft limit on file descriptors up to the hard one: the connection cap, not the limit, decides."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:  # an unlimited hard limit the kernel caps lower (nr_open)
            log.debug("kept the file descriptor limit %d: %s", soft, error)


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


class _Connection(web.RequestHandler):
    """One client connection, known to the registry from the end of its handshake to its close."""

    registry: _Connections
    header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.registry.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.registry.closed(self)
        super().connection_lost(exc)


class _Connections:
    """The open connections, oldest first, and which of them are in a request: what the cap and the first
    request's header deadline act on (aiohttp's keep-alive timeout covers the requests after it)."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options = options
        self.open: dict[_Connection, None] = {}
        self.busy: set[web.RequestHandler] = set()

    def protocol(self, server: web.Server) -> _Connection:
        connection = _Connection(server, loop=asyncio.get_running_loop(), **self.options)
        connection.registry = self
        return connection

    def opened(self, connection: _Connection) -> None:
        self.open[connection] = None
        connection.header_deadline = asyncio.get_running_loop().call_later(HEADER_SECONDS, _abort, connection)
        if len(self.open) > MAX_CONNECTIONS:
            others = [other for other in self.open if other is not connection]
            idle = [other for other in others if other not in self.busy]
            _abort((idle or others)[0])

    def closed(self, connection: _Connection) -> None:
        self.open.pop(connection, None)
        self.busy.discard(connection)
        if connection.header_deadline is not None:
            connection.header_deadline.cancel()

    @web.middleware
    async def track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        connection = request.protocol
        if isinstance(connection, _Connection) and connection.header_deadline is not None:
            connection.header_deadline.cancel()
            connection.header_deadline = None
        self.busy.add(connection)
        try:
            return await handler(request)
        finally:
            self.busy.discard(connection)


def _abort(connection: web.RequestHandler) -> None:
    if connection.transport is not None:
        connection.transport.abort()


class _Reviewer:
    """Reads a review's body within the limits and answers it on a worker thread: parsing and injecting a
    large pod never holds the event loop, so /ready and the other reviews go on meanwhile."""

    def __init__(self, inject: Inject) -> None:
        self.inject = inject
        self.turns = asyncio.Semaphore(REVIEWS_AT_ONCE)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="review")

    async def __call__(self, request: web.Request) -> web.Response:
        try:
            if request.content_type != "application/json":
                raise _RefusedError(415, f"Content-Type must be application/json, not {_shown(request.content_type)}")
            try:
                await asyncio.wait_for(self.turns.acquire(), BODY_SECONDS)
            except asyncio.TimeoutError:
                raise _RefusedError(503, "too many reviews at once; try again") from None
            try:
                try:
                    body = await asyncio.wait_for(_body(request), BODY_SECONDS)
                except asyncio.TimeoutError:
                    raise _RefusedError(408, f"the body did not arrive within {BODY_SECONDS:.0f} s") from None
                loop = asyncio.get_running_loop()
                answered = await loop.run_in_executor(self.worker, self._answer, body)
            finally:
                self.turns.release()
        except _RefusedError as refusal:
            return _refuse(request, refusal.status, str(refusal))
        except NotAReviewError as error:
            return _refuse(request, 400, str(error))
        return web.json_response(answered)

    def _answer(self, body: bytes) -> dict[str, Any]:
        return answer(parse(body), self.inject)


async def _body(request: web.Request) -> bytes:
    """The body as sent, refused as soon as it is larger than MAX_BODY_BYTES, then inflated if gzip, refused as
    soon as the inflated part is larger (a small body can inflate a thousandfold)."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise _RefusedError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _RefusedError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "gzip":
        raise _RefusedError(415, f"Content-Encoding must be gzip or none, not {_shown(encoding)}")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, MAX_BODY_BYTES + 1)
    except zlib.error as error:
        raise _RefusedError(400, f"the body is labelled gzip but is not: {error}") from None
    if len(inflated) > MAX_BODY_BYTES:
        raise _RefusedError(413, f"the body inflates to more than {MAX_BODY_BYTES} bytes")
    if not inflater.eof or inflater.unused_data:
        raise _RefusedError(400, "the body is labelled gzip but is not one whole gzip stream")
    return inflated


def _refuse(request: web.Request, status: int, reason: str) -> web.Response:
    """The one line said about a bad request, and its answer. A body refused before it was read whole may
    still be on its way: that connection is closed after the answer, where one whose body was read stays."""
    reason = bounded(reason)
    log.warning("bad request to %s: %s", bounded(request.path, 200), reason)
    response = web.Response(status=status, text=f"{reason}\n")
    if not request.content.is_eof():
        response.force_close()
    return response


def _application(inject: Inject, drain: _Drain, connections: _Connections) -> web.Application:
    reviewer = _Reviewer(inject)

    async def ready(_: web.Request) -> web.Response:
        return web.Response(status=503, text="draining\n") if drain.draining else web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[connections.track, drain.track])
    app.router.add_post("/inject", reviewer)
    app.router.add_post("/inject/{rest:.*}", reviewer)  # Istio's injector also serves /inject/cluster/.../net/...
    app.router.add_get("/ready", ready)
    return app


_HANDLER_OPTIONS: Mapping[str, Any] = {
    "access_log": None,
    "keepalive_timeout": IDLE_SECONDS,
    "auto_decompress": False,  # inflated here, within MAX_BODY_BYTES
    "lingering_time": 0,  # a refused body is not read to its end: the connection closes
}


async def _serve(listen: Listen, certificate: Certificate, inject: Inject) -> None:
    drain = _Drain()
    connections = _Connections(_HANDLER_OPTIONS)
    # The runner's own shutdown only closes what the drain left: idle keep-alive connections.
    runner = web.AppRunner(_application(inject, drain, connections), shutdown_timeout=0.5, **_HANDLER_OPTIONS)
    await runner.setup()
    loop = asyncio.get_running_loop()
    try:
        listening = _bind(listen.address, listen.port)
        server = await loop.create_server(
            lambda: connections.protocol(runner.server),  # type: ignore[arg-type]
            sock=listening,
            ssl=certificate.listening,
            ssl_handshake_timeout=HANDSHAKE_SECONDS,
        )
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        host, port = listening.getsockname()[:2]
        log.info("serving admission reviews on https://%s:%d (POST /inject, GET /ready)", _bracketed(host), port)
        watcher = asyncio.create_task(_watch(certificate))
        await stop.wait()
        watcher.cancel()
        drain.draining = True
        server.close()
        log.info("stopped listening; finishing %d request(s) in flight", drain.in_flight)
        try:
            await asyncio.wait_for(drain.idle.wait(), DRAIN_SECONDS)
        except asyncio.TimeoutError:
            log.warning("%d request(s) still in flight after %.0f s: closing them", drain.in_flight, DRAIN_SECONDS)
    finally:
        await runner.cleanup()


def _bind(address: str, port: int) -> socket.socket:
    """The listening socket: ``::`` takes both families on one socket, or IPv4 alone where IPv6 is off."""
    if address == "::":
        try:
            return _listening(socket.AF_INET6, address, port, dual_stack=True)
        except OSError as error:
            if error.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise _cannot_listen(address, port, error) from None
            log.info("no IPv6 on this host (%s): listening on IPv4 only", error.strerror or error)
            address = "0.0.0.0"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        return _listening(family, address, port, dual_stack=False)
    except OSError as error:
        raise _cannot_listen(address, port, error) from None


def _listening(family: socket.AddressFamily, address: str, port: int, *, dual_stack: bool) -> socket.socket:
    listening = socket.socket(family, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        listening.bind((address, port))
        listening.listen(socket.SOMAXCONN)
    except OSError:
        listening.close()
        raise
    listening.setblocking(False)
    return listening


def _cannot_listen(address: str, port: int, error: OSError) -> HostError:
    return HostError(f"cannot listen on {address} port {port}: {error.strerror or error}")


async def _watch(certificate: Certificate) -> None:
    while True:
        await asyncio.sleep(RELOAD_POLL_SECONDS)
        certificate.reload_if_changed()


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
