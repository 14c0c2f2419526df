"""Read-only netlink with the standard library: dumps of rtnetlink objects (links, addresses, policy rules,
routes) and of the names of nf_tables tables, and the kernel's route for one destination.

Reading needs no pyroute2, whose import costs about 100 ms: the dry run and an apply with nothing to change
in routing never pay for it. Changes go through pyroute2 (``routes.py``).
"""

from __future__ import annotations

import os
import socket
import struct

from istio_iptables.capture.model import NFT_TABLE_NAMES, Table
from istio_iptables.errors import HostError
from istio_iptables.log import Log
from istio_iptables.records import record

_NLMSG_HEADER = struct.Struct("=LHHLL")
_RTATTR = struct.Struct("=HH")
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300

RTM_GETLINK = 18
RTM_GETADDR, RTM_NEWADDR = 22, 20
RTM_GETROUTE, RTM_NEWROUTE = 26, 24
RTM_GETRULE, RTM_NEWRULE = 34, 32

_NETLINK_NETFILTER = 12
_NFPROTO_INET = 1
"""nf_tables' ``inet`` family, which holds both IPv4 and IPv6 rules."""
_NFT_MSG_GETTABLE = (10 << 8) | 1  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETTABLE
_NFTA_TABLE_NAME = 1

# Fixed headers: ifinfomsg (16 bytes), ifaddrmsg (8 bytes), rtmsg and fib_rule_hdr (12 bytes each, family first).
_HEADER_SIZE = {RTM_GETLINK: 16, RTM_GETADDR: 8, RTM_GETROUTE: 12, RTM_GETRULE: 12}
RTA_DST, RTA_SRC, RTA_IIF, RTA_OIF, RTA_PREFSRC, RTA_MARK, RTA_UID = 1, 2, 3, 4, 7, 16, 25

log = Log(__name__)


@record
class Message:
    header: bytes
    """The message's fixed header (ifaddrmsg, rtmsg or fib_rule_hdr)."""
    attributes: dict[int, bytes]

    @property
    def family(self) -> int:
        return self.header[0]

    def u32(self, attribute: int) -> int | None:
        value = self.attributes.get(attribute)
        return None if value is None else int.from_bytes(value[:4], "little")


def dump(request: int, family: int = socket.AF_UNSPEC) -> list[Message]:
    """Every object of one kind (addresses, routes or rules) of this network namespace."""
    body = bytes([family]) + bytes(_HEADER_SIZE[request] - 1)
    return _dump(socket.NETLINK_ROUTE, request, body, _HEADER_SIZE[request])


def route_get(family: int, attributes: dict[int, bytes]) -> Message:
    """The route the kernel picks for one packet (``ip route get``): ``attributes`` describe it (RTA_DST and
    optionally RTA_SRC, RTA_MARK, RTA_UID). OSError with the kernel's errno when it has none
    (ENETUNREACH, EHOSTUNREACH for an unreachable route...)."""
    body = bytes([family]) + bytes(_HEADER_SIZE[RTM_GETROUTE] - 1)
    # rtm_dst_len: the whole address is the destination.
    body = body[:1] + bytes([32 if family == socket.AF_INET else 128]) + body[2:]
    for kind, value in attributes.items():
        body += _RTATTR.pack(_RTATTR.size + len(value), kind) + value + bytes(-len(value) % 4)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.send(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), RTM_GETROUTE, _NLM_F_REQUEST, 1, 0) + body)
        data = sock.recv(1 << 16)
    length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(data, 0)
    payload = data[_NLMSG_HEADER.size : length]
    if kind == _NLMSG_ERROR:
        code = -int.from_bytes(payload[:4], "little", signed=True)
        raise OSError(code, os.strerror(code))
    return _message(payload, _HEADER_SIZE[RTM_GETROUTE])


def nft_tables(family: int = 0) -> list[tuple[int, str]]:
    """(family, name) of every nf_tables table of this namespace (of one NFPROTO family, or all with 0).
    HostError when the kernel cannot say (no nf_tables, no CAP_NET_ADMIN)."""
    # nfgenmsg: family, version (NFNETLINK_V0), resource id.
    body = bytes([family, 0, 0, 0])
    try:
        messages = _dump(_NETLINK_NETFILTER, _NFT_MSG_GETTABLE, body, len(body))
    except OSError as error:
        raise HostError(f"nf_tables table dump failed: {error.strerror}") from None
    tables = []
    for message in messages:
        name = message.attributes.get(_NFTA_TABLE_NAME, b"").split(b"\0", 1)[0]
        tables.append((message.family, name.decode(errors="replace")))
    return tables


def own_nft_tables() -> list[Table]:
    """Our nftables tables (a --native-nftables run's) in this namespace: one dump, no process. None when the
    kernel has no nf_tables (then there can be none)."""
    try:
        present = nft_tables(_NFPROTO_INET)
    except HostError as error:
        log.debug("cannot list nftables tables: %s", error)
        return []
    return [table for table, name in NFT_TABLE_NAMES.items() if (_NFPROTO_INET, name) in present]


def _dump(protocol: int, request: int, body: bytes, header_size: int) -> list[Message]:
    messages: list[Message] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol) as sock:
        flags = _NLM_F_REQUEST | _NLM_F_DUMP
        sock.send(_NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), request, flags, 1, 0) + body)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(data, offset)
                if kind == _NLMSG_DONE:
                    return messages
                if kind == _NLMSG_ERROR:
                    code = -int.from_bytes(
                        data[offset + _NLMSG_HEADER.size : offset + _NLMSG_HEADER.size + 4], "little", signed=True
                    )
                    raise HostError(f"netlink dump {request} failed: {os.strerror(code) if code > 0 else 'error'}")
                payload = data[offset + _NLMSG_HEADER.size : offset + length]
                messages.append(_message(payload, header_size))
                offset += (length + 3) & ~3


def _message(payload: bytes, header_size: int) -> Message:
    attributes: dict[int, bytes] = {}
    offset = header_size
    while offset + _RTATTR.size <= len(payload):
        length, kind = _RTATTR.unpack_from(payload, offset)
        if length < _RTATTR.size:
            break
        attributes[kind & 0x3FFF] = payload[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    return Message(payload[:header_size], attributes)
