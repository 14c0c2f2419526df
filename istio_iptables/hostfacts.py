"""What the plan needs to know about the host, read without changing anything.

Only what the configuration leaves open is read: local addresses when IPv6 is not forced on or off (and, for
the warning naming what escapes, when an apply forces it off), the resolv.conf nameservers when DNS capture
needs them and ``--dns-servers`` is not given, the proxy user's UID when ``--proxy-uid`` is not given. Tests
build ``HostFacts`` by hand.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import socket

from . import netlink
from .config import Config, parse_address
from .errors import HostError
from .logsetup import Log
from .model import IPAddress
from .records import record

log = Log(__name__)


@record
class HostFacts:
    addresses: tuple[IPAddress, ...] = ()
    """The host's interface addresses, in the kernel's dump order (all IPv4 first), as Go lists them."""
    nameservers: tuple[IPAddress, ...] = ()
    envoy_uid: int | None = None


def gather(config: Config) -> HostFacts:
    needs_dns = config.redirect_dns and not config.capture_all_dns and config.dns_servers is None
    warns_ipv6 = config.ipv6 is False and not (config.dry_run or config.cleanup_only)
    return HostFacts(
        addresses=tuple(local_addresses()) if config.ipv6 is None or warns_ipv6 else (),
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


_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def local_addresses() -> list[IPAddress]:
    """The addresses Go's ``net.InterfaceAddrs`` returns, in its order (the kernel dumps IPv4 first)."""
    return [address for address, _ in interface_addresses()]


def interface_addresses() -> list[tuple[IPAddress, int]]:
    """Every address of this namespace with the index of the interface holding it, in the kernel's order."""
    addresses: list[tuple[IPAddress, int]] = []
    for message in netlink.dump(netlink.RTM_GETADDR):
        # On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is ours (Go prefers it the same way).
        raw = message.attributes.get(_IFA_LOCAL, message.attributes.get(_IFA_ADDRESS))
        if raw is not None and message.family in (socket.AF_INET, socket.AF_INET6):
            addresses.append((ipaddress.ip_address(raw), int.from_bytes(message.header[4:8], "little")))
    return addresses


def which(program: str) -> str | None:
    """The path of ``program`` on PATH, as ``shutil.which`` finds it; importing shutil (archive modules and
    all) costs an init container 2.5 ms, a tenth of its whole run."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory, program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None
