"""What the plan needs to know about the host, read without changing anything.

Only what the configuration leaves open is read: local addresses when IPv6 is not forced on or off, the
resolv.conf nameservers when DNS capture needs them and ``--dns-servers`` is not given, the proxy user's UID
when ``--proxy-uid`` is not given. Tests build ``HostFacts`` by hand.
"""

from __future__ import annotations

import ipaddress
import logging
import pwd
import socket
import struct
from dataclasses import dataclass

from .config import Config, parse_address
from .errors import HostError
from .model import IPAddress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HostFacts:
    addresses: tuple[IPAddress, ...] = ()
    """The host's interface addresses, in the kernel's dump order (all IPv4 first), as Go lists them."""
    nameservers: tuple[IPAddress, ...] = ()
    envoy_uid: int | None = None


def gather(config: Config) -> HostFacts:
    needs_dns = config.redirect_dns and not config.capture_all_dns and config.dns_servers is None
    return HostFacts(
        addresses=tuple(local_addresses()) if config.ipv6 is None else (),
        nameservers=tuple(read_nameservers(config.resolv_conf)) if needs_dns else (),
        envoy_uid=user_uid(config.envoy_user) if config.proxy_uids is None else None,
    )


def user_uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def read_nameservers(path: str) -> list[IPAddress]:
    """The ``nameserver`` addresses of a resolv.conf; entries that are not IP addresses are skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read().splitlines()
    except OSError as error:
        raise HostError(f"cannot read DNS servers from {path}: {error.strerror}") from None
    servers = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            servers.append(parse_address(fields[1]))
        except ValueError:
            log.debug("nameserver %s in %s is not an IP address; skipped", fields[1], path)
    return servers


# Netlink RTM_GETADDR dump, the same source Go's net.InterfaceAddrs reads.
_NLMSG_HEADER = struct.Struct("=LHHLL")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def local_addresses() -> list[IPAddress]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(
            _NLMSG_HEADER.pack(
                _NLMSG_HEADER.size + len(request), _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
            )
            + request
        )
        addresses: list[IPAddress] = []
        while True:
            data = sock.recv(65536)
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG_HEADER.unpack_from(data, offset)
                if kind == _NLMSG_DONE:
                    return addresses
                if kind == _NLMSG_ERROR:
                    raise HostError("cannot list the host's addresses: netlink error")
                if kind == _RTM_NEWADDR:
                    address = _address_of(data[offset + _NLMSG_HEADER.size : offset + length])
                    if address is not None:
                        addresses.append(address)
                offset += (length + 3) & ~3


def _address_of(message: bytes) -> IPAddress | None:
    family = message[0]
    attributes: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(message):
        length, kind = _RTATTR.unpack_from(message, offset)
        if length < _RTATTR.size:
            break
        attributes[kind] = message[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    # On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is ours (Go prefers it the same way).
    raw = attributes.get(_IFA_LOCAL, attributes.get(_IFA_ADDRESS))
    if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return ipaddress.ip_address(raw)
