"""What a network namespace says about the pod a flow is traced in: its addresses and the interfaces holding
them, and the route the kernel picks for a flow. Reads only, with netlink; used by the ``trace`` command."""

from __future__ import annotations

import ipaddress
import socket

from istio_iptables.capture.model import Family, IPAddress
from istio_iptables.host import netlink
from istio_iptables.host.hostfacts import interface_addresses
from istio_iptables.records import record

_IFLA_IFNAME = 3
_AF = {Family.V4: socket.AF_INET, Family.V6: socket.AF_INET6}


def interface_names() -> dict[int, str]:
    """Every link of the namespace: index -> name."""
    names = {}
    for message in netlink.dump(netlink.RTM_GETLINK):
        index = int.from_bytes(message.header[4:8], "little")
        names[index] = message.attributes.get(_IFLA_IFNAME, b"").split(b"\0", 1)[0].decode(errors="replace")
    return names


def pod_interfaces() -> tuple[tuple[IPAddress, str], ...]:
    """The namespace's addresses other than loopback and link-local ones, in the kernel's order (IPv4 first),
    each with its interface."""
    names = interface_names()
    return tuple(
        (address, names.get(index, ""))
        for address, index in interface_addresses()
        if not (address.is_loopback or address.is_link_local)
    )


@record
class Route:
    """Where the kernel sends a locally generated packet."""

    interface: str
    source: IPAddress
    """The source address it would give a socket that did not bind one."""


def route(destination: IPAddress, *, source: IPAddress | None, mark: int, uid: int | None) -> Route | str:
    """The kernel's route for a packet the pod sends, or why there is none (``No route to host``)."""
    family = Family.of(destination)
    attributes = {netlink.RTA_DST: destination.packed}
    if source is not None:
        attributes[netlink.RTA_SRC] = source.packed
    if mark:
        attributes[netlink.RTA_MARK] = mark.to_bytes(4, "little")
    if uid is not None:
        attributes[netlink.RTA_UID] = uid.to_bytes(4, "little")
    try:
        found = netlink.route_get(_AF[family], attributes)
    except OSError as error:
        return error.strerror or f"error {error.errno}"
    index = found.u32(netlink.RTA_OIF)
    preferred = found.attributes.get(netlink.RTA_PREFSRC)
    chosen = source or (ipaddress.ip_address(preferred) if preferred else destination)
    return Route(interface_names().get(index, "") if index else "", chosen)


def facing(peer: IPAddress) -> Route | None:
    """The pod's address a peer reaches, and the interface the peer's packets arrive on: the kernel's way back
    to the peer (None when there is none, or it is the pod itself)."""
    back = route(peer, source=None, mark=0, uid=None)
    return None if isinstance(back, str) or back.interface == "lo" else back
