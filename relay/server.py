"""The relay: captured connections to their original destination, logged.

Where a connection was going:
- REDIRECT (outbound always, inbound in REDIRECT mode): NAT rewrote the destination to our listener;
  conntrack keeps the original, which ``SO_ORIGINAL_DST`` (IPv4) or ``IP6T_SO_ORIGINAL_DST`` (IPv6) returns.
- TPROXY (inbound in TPROXY mode): the packet was delivered untouched to a listener with ``IP_TRANSPARENT``;
  the accepted socket's own address is the destination.

Upstream, an inbound connection leaves from 127.0.0.6 (``::6`` for IPv6), the source Istio's rules let reach
the app over ``lo`` uncaptured; an outbound one leaves as the proxy's UID (or group), which the rules exempt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence

SOL_IP = 0
SOL_IPV6 = 41
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
INBOUND_SOURCE = {socket.AF_INET: "127.0.0.6", socket.AF_INET6: "::6"}
WILDCARD = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
CONNECT_TIMEOUT = 10.0
CHUNK = 65536


def original_destination(sock: socket.socket, transparent: bool) -> tuple[str, int]:
    """Where the client was connecting: the socket's own address under TPROXY, else conntrack's record."""
    if transparent:
        host, port = sock.getsockname()[:2]
        return str(host), int(port)
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]


def listener(family: socket.AddressFamily, port: int, transparent: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        # TPROXY delivers packets addressed to anyone: only a transparent socket may accept them.
        if family == socket.AF_INET:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, 1)
    sock.bind((WILDCARD[family], port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def log(event: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Copy until end of stream, then half-close: the number of bytes copied."""
    copied = 0
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
            copied += len(chunk)
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()
    return copied


class Relay:
    def __init__(self, outbound_port: int, inbound_port: int, tproxy: bool) -> None:
        self.outbound_port = outbound_port
        self.inbound_port = inbound_port
        self.tproxy = tproxy

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str, transparent: bool
    ) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        client = writer.get_extra_info("peername")
        event: dict[str, object] = {"direction": direction, "source": f"{client[0]}:{client[1]}"}
        started = time.monotonic()
        try:
            host, port = original_destination(sock, transparent)
            event["destination"] = f"{host}:{port}"
            if port in (self.outbound_port, self.inbound_port) and host in _local_addresses(sock):
                raise OSError("the destination is the relay itself: a loop")
            source = (INBOUND_SOURCE[sock.family], 0) if direction == "inbound" else None
            upstream_reader, upstream_writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=source, family=sock.family), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError) as error:
            event["error"] = str(error) or type(error).__name__
            log(event)
            writer.close()
            return
        sent, received = await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer))
        event.update(sent=sent, received=received, seconds=round(time.monotonic() - started, 3))
        log(event)
        for stream in (writer, upstream_writer):
            stream.close()

    async def serve(self, health_port: int | None) -> None:
        servers = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for port, direction in ((self.outbound_port, "outbound"), (self.inbound_port, "inbound")):
                transparent = self.tproxy and direction == "inbound"

                def handler(
                    reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter,
                    direction: str = direction,
                    transparent: bool = transparent,
                ) -> asyncio.Future[None]:
                    return asyncio.ensure_future(self.handle(reader, writer, direction, transparent))

                servers.append(await asyncio.start_server(handler, sock=listener(family, port, transparent)))
            if health_port:
                servers.append(await asyncio.start_server(_healthy, sock=listener(family, health_port, False)))
        log({"listening": {"outbound": self.outbound_port, "inbound": self.inbound_port, "tproxy": self.tproxy}})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        for server in servers:
            server.close()


async def _healthy(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The probe's port: accepting is the answer (the kubelet's tcpSocket probe)."""
    writer.close()


def _local_addresses(sock: socket.socket) -> set[str]:
    return {str(sock.getsockname()[0]), "127.0.0.1", "::1"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--outbound-port", type=int, default=15001, help="the capture's -p")
    parser.add_argument("--inbound-port", type=int, default=15006, help="the capture's -z")
    parser.add_argument("--health-port", type=int, default=0, help="accepts connections once listening (0: none)")
    # NONE: a pod without capture (its interception mode); the relay listens, and nothing is redirected to it.
    parser.add_argument("--mode", choices=("REDIRECT", "TPROXY", "NONE"), default="REDIRECT", help="the capture's -m")
    args = parser.parse_args(argv)
    relay = Relay(args.outbound_port, args.inbound_port, tproxy=args.mode == "TPROXY")
    try:
        asyncio.run(relay.serve(args.health_port or None))
    except OSError as error:
        sys.stderr.write(f"relay: {error}\n")
        return 1
    return 0
