"""What the plan needs to know about the host, read without changing anything; and the namespace a run works
in, entered (refusing the host's own when about to change it), its facts read and the plan built from them.

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
from collections.abc import Iterable

from istio_iptables.capture import config as configuration
from istio_iptables.capture.config import Config, parse_address
from istio_iptables.capture.model import IPAddress, Plan
from istio_iptables.capture.plan import HostFacts, build_plan, usable_ipv6
from istio_iptables.errors import ConfigError, HostError
from istio_iptables.host import netlink, netns
from istio_iptables.log import Log

log = Log(__name__)


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
    fields = [line.split() for line in lines]
    return nameserver_addresses([words[1] for words in fields if len(words) >= 2 and words[0] == "nameserver"], path)


def nameserver_addresses(servers: Iterable[str], source: str) -> list[IPAddress]:
    """The servers that are IP addresses, in order (a resolv.conf's reader skips the others); ``source`` names
    where they come from in the debug line about a skipped one."""
    addresses = []
    for server in servers:
        try:
            addresses.append(parse_address(server))
        except ValueError:
            log.debug("nameserver %s in %s is not an IP address; skipped", server, source)
    return addresses


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


def enter(config: configuration.Config, changes_system: bool) -> tuple[HostFacts, Plan]:
    """Move into the namespace to work in (refusing the host's own when about to change it), then read the
    host facts there and build the plan."""
    if config.network_namespace:
        netns.enter(config.network_namespace)
    elif changes_system and not config.allow_host_namespace and "KUBERNETES_SERVICE_HOST" not in os.environ:
        # Kubernetes sets KUBERNETES_SERVICE_HOST in every container, the init container included.
        doubt = netns.host_namespace_doubt()
        if doubt:
            raise ConfigError(
                f"refusing to change the network here outside Kubernetes: {doubt}; pass --network-namespace "
                "NAME, or --allow-host-namespace if this namespace is the workload's"
            )
    return planned(config)


def planned(config: configuration.Config) -> tuple[HostFacts, Plan]:
    """The host facts read here and the plan built from them, saying what they mean for IPv6."""
    facts = gather(config)
    plan = build_plan(config, facts)
    addresses = ", ".join(map(str, usable_ipv6(facts.addresses)))
    if addresses and config.ipv6 is None:
        log.info("IPv6 captured as well as IPv4: this namespace has IPv6 addresses (%s)", addresses)
    elif addresses and config.native_nftables:
        log.warning(
            "--no-ipv6: the inet tables still capture the IPv6 traffic of %s, but without the IPv6-only rules "
            "(as Istio's nftables do)",
            addresses,
        )
    elif addresses:
        log.warning("--no-ipv6: the IPv6 traffic of %s escapes the proxy (no IPv6 rules)", addresses)
    return facts, plan
