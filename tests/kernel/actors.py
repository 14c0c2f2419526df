"""The processes of the kernel tests: the pod's app, its sidecar proxy, DNS servers and one-shot clients.

Run inside a network namespace as ``python -m tests.kernel.actors ROLE ...`` (cwd or PYTHONPATH = the
project root). Standard library only; every server stops by itself after ``--lifetime`` seconds, every
socket operation has a timeout, so nothing outlives a test run by much even if its teardown is skipped.

Roles:
- ``echo NAME PORT...``: TCP servers on every address (IPv4 and IPv6); each connection is answered with
  ``NAME:<peer ip>:<local ip>:<local port>:<received data>`` once the client has half-closed, so a test
  sees who answered, to which address the connection arrived and from which source it came.
- ``proxy``: the sidecar stand-in (run as the proxy UID). Outbound listener (15001) and inbound listener
  (15006), IPv4 and IPv6. Each connection's original destination comes from SO_ORIGINAL_DST (REDIRECT) or,
  on the transparent inbound listener of ``--tproxy``, from the accepted socket's own address (TPROXY).
  It connects upstream to that destination (outbound: as itself; inbound: from 127.0.0.6 or ::6 as Istio's
  inbound passthrough does), answers the client with ``PROXY<listener port>|`` followed by the upstream's
  bytes (no prefix for a ``--transparent-port`` destination, e.g. DNS over TCP), and appends one JSON
  line per connection to ``--events`` (listener, client, local, method, original_dst, upstream,
  upstream_local), written once the upstream is connected or has failed, so before the client can have
  its answer. A connection coming from one of its own upstream sockets is a loop: answered ``LOOP``.
- ``client HOST PORT``: one connection; prints the whole response; exit 0, or 1 on any error.
- ``dns NAME PORT --answer ADDR``: UDP and TCP DNS server; A queries get ADDR, TXT queries get NAME.
- ``dnsquery SERVER NAME``: one query (UDP, or TCP with ``--tcp``); prints the A address (or TXT text).
- ``batch FILE``: many probes from one process (one identity, one namespace). FILE holds a JSON list of
  ``{"kind": "tcp", "host": H, "port": P, "data": D}`` (one exchange, as ``client``) and
  ``{"kind": "dns", "server": S, "port": 53, "tcp": BOOL}`` (one A query, as ``dnsquery``); a few run at a
  time, each bounded by ``--timeout`` (or its own shorter ``"timeout"``). One JSON line per probe, in the
  file's order: ``ok``, the socket's own ``source`` [ip, port] (once connected), ``prefixes`` (the listener
  ports of the ``PROXY<port>|`` prefixes the answer starts with), then ``response`` (TCP: the text after
  the prefixes) or ``answer`` (DNS: the A address), or ``error``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import selectors
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, level SOL_IPV6
SOL_IP = 0
SOL_IPV6 = 41
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75

IO_TIMEOUT = 5.0
MAX_BYTES = 1 << 16
INBOUND_SOURCE = {socket.AF_INET: "127.0.0.6", socket.AF_INET6: "::6"}
WILDCARD = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def host_port(address: tuple[object, ...]) -> list[object]:
    """[ip, port] of a socket address, IPv6 flow info and scope dropped."""
    return [address[0], address[1]]


def listen(
    family: socket.AddressFamily,
    address: str,
    port: int,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    transparent: bool = False,
) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        if family == socket.AF_INET:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    sock.bind((address, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    return sock


def read_to_eof(sock: socket.socket, limit: int = MAX_BYTES) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = sock.recv(min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def serve(listeners: dict[socket.socket, Callable[[socket.socket], None]]) -> None:
    """Accept forever (until SIGTERM or the lifetime alarm); one daemon thread per TCP connection.

    A UDP socket's handler is called inline with the socket itself when it is readable.
    """
    selector = selectors.DefaultSelector()
    for sock in listeners:
        selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            handler = listeners[sock]
            if sock.type == socket.SOCK_DGRAM:
                handler(sock)
                continue
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.settimeout(IO_TIMEOUT)
            threading.Thread(target=_guarded, args=(handler, conn), daemon=True).start()


def _guarded(handler: Callable[[socket.socket], None], conn: socket.socket) -> None:
    try:
        handler(conn)
    except OSError as error:
        print(f"connection error: {error}", file=sys.stderr, flush=True)
    finally:
        conn.close()


# --- echo ------------------------------------------------------------------------------------------------


def run_echo(name: str, ports: Sequence[int]) -> None:
    def answer(conn: socket.socket) -> None:
        data = read_to_eof(conn)
        peer = conn.getpeername()[0]
        local = conn.getsockname()
        conn.sendall(f"{name}:{peer}:{local[0]}:{local[1]}:".encode() + data)

    listeners: dict[socket.socket, Callable[[socket.socket], None]] = {}
    for port in ports:
        for family in (socket.AF_INET, socket.AF_INET6):
            listeners[listen(family, WILDCARD[family], port)] = answer
    serve(listeners)


# --- proxy -----------------------------------------------------------------------------------------------


def refuse(conn: socket.socket, message: bytes) -> None:
    """Answer without relaying. The client's data is read first: closing a socket with unread data would
    reset the connection, and the client would see ECONNRESET instead of the message."""
    with contextlib.suppress(OSError):
        conn.sendall(message)
        conn.shutdown(socket.SHUT_WR)
        read_to_eof(conn)


def original_dst(sock: socket.socket) -> list[object]:
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
        return [socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]]
    raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]]


class Proxy:
    def __init__(
        self, events: str, outbound_port: int, inbound_port: int, tproxy: bool, transparent_ports: Sequence[int]
    ) -> None:
        self.transparent_ports = set(transparent_ports)
        self.events_fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.outbound_port = outbound_port
        self.inbound_port = inbound_port
        self.tproxy = tproxy
        # Local ports of our own upstream sockets: a connection arriving from one of them is our own
        # upstream connection captured again (a loop); it is reported, never relayed a second time.
        self.upstream_ports: set[int] = set()
        self.lock = threading.Lock()

    def listeners(self) -> dict[socket.socket, Callable[[socket.socket], None]]:
        result: dict[socket.socket, Callable[[socket.socket], None]] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            outbound = listen(family, WILDCARD[family], self.outbound_port)
            inbound = listen(family, WILDCARD[family], self.inbound_port, transparent=self.tproxy)
            result[outbound] = lambda conn: self.handle(conn, self.outbound_port, inbound=False)
            result[inbound] = lambda conn: self.handle(conn, self.inbound_port, inbound=True)
        return result

    def record(self, event: dict[str, object]) -> None:
        os.write(self.events_fd, (json.dumps(event) + "\n").encode())

    def handle(self, conn: socket.socket, listener: int, inbound: bool) -> None:
        prefix = f"PROXY{listener}|".encode()
        local = host_port(conn.getsockname())
        event: dict[str, object] = {
            "listener": listener,
            "client": host_port(conn.getpeername()),
            "local": local,
        }
        try:
            if self.tproxy and inbound and local[1] != listener:
                # TPROXY leaves the packet untouched: the socket's own address is the destination.
                event["method"] = "getsockname"
                destination = local
            else:
                event["method"] = "SO_ORIGINAL_DST"
                destination = original_dst(conn)
        except OSError as error:
            event["original_dst"] = None
            event["upstream"] = f"error: no original destination: {error}"
            self.record(event)
            refuse(conn, prefix + b"ERROR:no original destination")
            return
        event["original_dst"] = destination
        if destination[1] in self.transparent_ports:
            prefix = b""  # a protocol that must reach the client unchanged (DNS over TCP)
        with self.lock:
            looped = conn.getpeername()[1] in self.upstream_ports
        if looped or destination[1] in (self.outbound_port, self.inbound_port):
            event["upstream"] = "loop"
            self.record(event)
            refuse(conn, prefix + b"LOOP")
            return
        self.relay(conn, prefix, destination, inbound, event)

    def relay(
        self,
        conn: socket.socket,
        prefix: bytes,
        destination: list[object],
        inbound: bool,
        event: dict[str, object],
    ) -> None:
        upstream = socket.socket(conn.family, socket.SOCK_STREAM)
        upstream.settimeout(IO_TIMEOUT)
        try:
            # Bind first so the local port is known before the SYN leaves (loop detection).
            source = INBOUND_SOURCE[conn.family] if inbound else WILDCARD[conn.family]
            upstream.bind((source, 0))
            port = upstream.getsockname()[1]
            with self.lock:
                self.upstream_ports.add(port)
            try:
                upstream.connect((destination[0], destination[1]))
            except OSError as error:
                name = errno.errorcode.get(error.errno or 0, "timeout")
                event["upstream"] = f"error: {name}: {error}"
                self.record(event)
                refuse(conn, prefix + f"ERROR:{name}".encode())
                return
            event["upstream_local"] = host_port(upstream.getsockname())
            # Recorded before any byte flows back: once a client has its answer, its event is in the file.
            event["upstream"] = "connected"
            self.record(event)

            def forward() -> None:
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(65536):
                        upstream.sendall(chunk)
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)

            forwarder = threading.Thread(target=forward, daemon=True)
            forwarder.start()
            conn.sendall(prefix)
            while chunk := upstream.recv(65536):
                conn.sendall(chunk)
            forwarder.join(IO_TIMEOUT)
        finally:
            upstream.close()


# --- DNS -------------------------------------------------------------------------------------------------

TYPE_A = 1
TYPE_TXT = 16


def dns_query(ident: int, name: str, qtype: int) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.strip(".").split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def dns_answer(query: bytes, address: str, text: str) -> bytes:
    ident, flags, qdcount = struct.unpack_from("!HHH", query)
    if qdcount != 1:
        return struct.pack("!HHHHHH", ident, 0x8181, 0, 0, 0, 0)  # FORMERR
    pos = 12
    while query[pos]:
        pos += query[pos] + 1
    pos += 1
    qtype, _ = struct.unpack_from("!HH", query, pos)
    question = query[12 : pos + 4]
    records = b""
    if qtype == TYPE_A:
        records = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, 1, 30, 4) + socket.inet_aton(address)
    elif qtype == TYPE_TXT:
        data = text.encode()[:255]
        records = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_TXT, 1, 30, len(data) + 1) + bytes([len(data)]) + data
    header = struct.pack("!HHHHHH", ident, 0x8180 | (flags & 0x0100), 1, 1 if records else 0, 0, 0)
    return header + question + records


def dns_parse_answer(response: bytes, ident: int) -> str:
    got, flags, _, ancount = struct.unpack_from("!HHHH", response)
    if got != ident:
        raise ValueError(f"response id {got} != query id {ident}")
    if ancount < 1:
        raise ValueError(f"no answer (flags {flags:#06x})")
    pos = 12
    while response[pos]:
        pos += response[pos] + 1
    pos += 1 + 4 + 2  # end of name, qtype+qclass, then the answer's name pointer
    rtype, _, _, length = struct.unpack_from("!HHIH", response, pos)
    rdata = response[pos + 10 : pos + 10 + length]
    if rtype == TYPE_A:
        return socket.inet_ntoa(rdata)
    return rdata[1 : 1 + rdata[0]].decode()


def run_dns(name: str, port: int, answer: str, binds: Sequence[str]) -> None:
    def udp(sock: socket.socket) -> None:
        try:
            query, peer = sock.recvfrom(4096)
            sock.sendto(dns_answer(query, answer, name), peer)
        except (OSError, IndexError, struct.error) as error:
            print(f"udp error: {error}", file=sys.stderr, flush=True)

    def tcp(conn: socket.socket) -> None:
        while header := conn.recv(2, socket.MSG_WAITALL):
            if len(header) < 2:
                return
            query = conn.recv(struct.unpack("!H", header)[0], socket.MSG_WAITALL)
            reply = dns_answer(query, answer, name)
            conn.sendall(struct.pack("!H", len(reply)) + reply)

    listeners: dict[socket.socket, Callable[[socket.socket], None]] = {}
    for address in binds:
        family = family_of(address)
        listeners[listen(family, address, port, socket.SOCK_DGRAM)] = udp
        listeners[listen(family, address, port)] = tcp
    serve(listeners)


# --- one-shot clients ------------------------------------------------------------------------------------


def run_client(host: str, port: int, data: str, source: str | None, timeout: float) -> int:
    try:
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            if source:
                sock.bind((source, 0))
            sock.connect((host, port))
            sock.sendall(data.encode())
            sock.shutdown(socket.SHUT_WR)
            response = read_to_eof(sock)
    except OSError as error:
        print(f"client {host} {port}: {error!r}", file=sys.stderr)
        return 1
    sys.stdout.write(response.decode(errors="replace"))
    return 0


def run_clientloop(host: str, port: int, stop: str, limit: int, timeout: float) -> int:
    """Connections one after another until the file ``stop`` exists (or ``limit``), then a JSON summary:
    how many were answered through the proxy (``PROXY`` prefix), directly, or failed."""
    counts = {"total": 0, "proxied": 0, "direct": 0, "failed": 0}
    errors: list[str] = []
    while not os.path.exists(stop) and counts["total"] < limit:
        counts["total"] += 1
        try:
            with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect((host, port))
                sock.sendall(b"loop")
                sock.shutdown(socket.SHUT_WR)
                response = read_to_eof(sock)
            counts["proxied" if response.startswith(b"PROXY") else "direct"] += 1
        except OSError as error:
            counts["failed"] += 1
            errors.append(repr(error))
    print(json.dumps({**counts, "errors": errors[:10]}))
    return 0


def run_dnsquery(server: str, name: str, *, tcp: bool, port: int, qtype: int, timeout: float) -> int:
    ident = os.getpid() & 0xFFFF
    query = dns_query(ident, name, qtype)
    try:
        kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
        with socket.socket(family_of(server), kind) as sock:
            sock.settimeout(timeout)
            # Connected, also for UDP: the kernel drops an answer whose source is not the server we asked,
            # so an answer that was not translated back (wrong conntrack zone, say) shows up as a timeout.
            sock.connect((server, port))
            if tcp:
                sock.sendall(struct.pack("!H", len(query)) + query)
                length = struct.unpack("!H", sock.recv(2, socket.MSG_WAITALL))[0]
                response = sock.recv(length, socket.MSG_WAITALL)
            else:
                sock.send(query)
                response = sock.recv(4096)
        print(dns_parse_answer(response, ident))
    except (OSError, ValueError, struct.error) as error:
        print(f"dnsquery {server} {port}: {error!r}", file=sys.stderr)
        return 1
    return 0


# --- batch of probes -------------------------------------------------------------------------------------

MAX_PROBES = 1000
BATCH_WORKERS = 8
_PREFIX = re.compile(rb"PROXY(\d+)\|")


def strip_prefixes(response: bytes) -> tuple[list[int], bytes]:
    """The listener ports of the ``PROXY<port>|`` prefixes a relayed answer starts with, and the rest."""
    ports: list[int] = []
    while found := _PREFIX.match(response):
        ports.append(int(found[1]))
        response = response[found.end() :]
    return ports, response


def probe_tcp(host: str, port: int, data: str, timeout: float) -> dict[str, Any]:
    result: dict[str, Any] = {"ok": False}
    try:
        with socket.socket(family_of(host), socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            result["source"] = host_port(sock.getsockname())
            sock.sendall(data.encode())
            sock.shutdown(socket.SHUT_WR)
            response = read_to_eof(sock)
    except OSError as error:
        result["error"] = repr(error)
        return result
    prefixes, rest = strip_prefixes(response)
    result.update(ok=True, prefixes=prefixes, response=rest.decode(errors="replace"))
    return result


def probe_dns(server: str, port: int, tcp: bool, timeout: float) -> dict[str, Any]:
    """One A query. Over TCP the client half-closes after the query, so a relaying proxy (which reads to
    EOF) passes it on, and the answer may come with the proxy's prefix."""
    ident = int.from_bytes(os.urandom(2), "big")
    query = dns_query(ident, "svc.example.test", TYPE_A)
    result: dict[str, Any] = {"ok": False}
    try:
        kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
        with socket.socket(family_of(server), kind) as sock:
            sock.settimeout(timeout)
            sock.connect((server, port))  # connected, also for UDP: see run_dnsquery
            result["source"] = host_port(sock.getsockname())
            if tcp:
                sock.sendall(struct.pack("!H", len(query)) + query)
                sock.shutdown(socket.SHUT_WR)
                prefixes, raw = strip_prefixes(read_to_eof(sock))
                if prefixes and not raw.startswith(struct.pack("!H", len(raw) - 2)):
                    # A proxy took it but relayed no DNS answer (LOOP, ERROR:...): who took it is known.
                    result.update(ok=True, prefixes=prefixes, answer=raw.decode(errors="replace"))
                    return result
                length = struct.unpack_from("!H", raw)[0]
                response = raw[2 : 2 + length]
            else:
                sock.send(query)
                prefixes, response = [], sock.recv(4096)
        result.update(ok=True, prefixes=prefixes, answer=dns_parse_answer(response, ident))
    except (OSError, ValueError, IndexError, struct.error) as error:
        result["error"] = repr(error)
    return result


def run_probe(probe: dict[str, Any], timeout: float) -> dict[str, Any]:
    timeout = min(float(probe.get("timeout", timeout)), timeout)
    if probe["kind"] == "tcp":
        return probe_tcp(probe["host"], int(probe["port"]), str(probe.get("data", "probe")), timeout)
    if probe["kind"] == "dns":
        return probe_dns(probe["server"], int(probe.get("port", 53)), bool(probe.get("tcp")), timeout)
    return {"ok": False, "error": f"unknown probe kind {probe['kind']!r}"}


def run_batch(path: str, timeout: float) -> int:
    with open(path, encoding="utf-8") as file:
        probes = json.load(file)
    if not isinstance(probes, list) or len(probes) > MAX_PROBES:
        print(f"batch: expected a JSON list of at most {MAX_PROBES} probes", file=sys.stderr)
        return 1
    with ThreadPoolExecutor(BATCH_WORKERS) as pool:
        for result in pool.map(lambda probe: run_probe(probe, timeout), probes):
            print(json.dumps(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kernel.actors")
    roles = parser.add_subparsers(dest="role", required=True)
    echo = roles.add_parser("echo")
    echo.add_argument("name")
    echo.add_argument("ports", nargs="+", type=int)
    proxy = roles.add_parser("proxy")
    proxy.add_argument("--events", required=True)
    proxy.add_argument("--outbound-port", type=int, default=15001)
    proxy.add_argument("--inbound-port", type=int, default=15006)
    proxy.add_argument("--tproxy", action="store_true")
    proxy.add_argument(
        "--transparent-port", type=int, action="append", default=[], help="relay without the PROXY prefix"
    )
    client = roles.add_parser("client")
    client.add_argument("host")
    client.add_argument("port", type=int)
    client.add_argument("--data", default="hello")
    client.add_argument("--source")
    client.add_argument("--timeout", type=float, default=IO_TIMEOUT)
    loop = roles.add_parser("clientloop")
    loop.add_argument("host")
    loop.add_argument("port", type=int)
    loop.add_argument("--stop", required=True, help="stop when this file exists")
    loop.add_argument("--limit", type=int, default=100_000)
    loop.add_argument("--timeout", type=float, default=IO_TIMEOUT)
    dns = roles.add_parser("dns")
    dns.add_argument("name")
    dns.add_argument("port", type=int)
    dns.add_argument("--answer", required=True, help="IPv4 address every A query gets")
    dns.add_argument("--bind", action="append", help="listen address (repeatable); default 0.0.0.0 and ::")
    query = roles.add_parser("dnsquery")
    query.add_argument("server")
    query.add_argument("name")
    query.add_argument("--tcp", action="store_true")
    query.add_argument("--port", type=int, default=53)
    query.add_argument("--type", choices=["A", "TXT"], default="A")
    query.add_argument("--timeout", type=float, default=IO_TIMEOUT)
    batch = roles.add_parser("batch")
    batch.add_argument("file", help="a JSON list of probes")
    batch.add_argument("--timeout", type=float, default=2.0, help="bound of each probe, in seconds")
    for server in (echo, proxy, dns, loop):
        server.add_argument("--lifetime", type=int, default=300, help="exit after this many seconds")
    args = parser.parse_args(argv)

    if args.role in ("echo", "proxy", "dns", "clientloop"):
        signal.alarm(args.lifetime)  # SIGALRM's default action ends the process
    if args.role == "echo":
        run_echo(args.name, args.ports)
    elif args.role == "proxy":
        proxy_ = Proxy(args.events, args.outbound_port, args.inbound_port, args.tproxy, args.transparent_port)
        serve(proxy_.listeners())
    elif args.role == "dns":
        run_dns(args.name, args.port, args.answer, args.bind or ["0.0.0.0", "::"])
    elif args.role == "client":
        return run_client(args.host, args.port, args.data, args.source, args.timeout)
    elif args.role == "clientloop":
        return run_clientloop(args.host, args.port, args.stop, args.limit, args.timeout)
    elif args.role == "dnsquery":
        qtype = TYPE_A if args.type == "A" else TYPE_TXT
        return run_dnsquery(args.server, args.name, tcp=args.tcp, port=args.port, qtype=qtype, timeout=args.timeout)
    elif args.role == "batch":
        return run_batch(args.file, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
