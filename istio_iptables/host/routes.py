"""TPROXY policy routing and the ``::6`` loopback address, converged to the plan.

Ours, whatever configuration wrote them: a ``fwmark M lookup T`` rule whose table T holds a
``local default dev lo`` route, that route, and ``::6/128`` on ``lo``. Reading uses plain netlink dumps;
only an actual change imports pyroute2. Every change made is recorded so a later failure can undo it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import IPv6Interface, ip_address

from istio_iptables.capture.model import Family, Plan, PolicyRoute
from istio_iptables.errors import ApplyError
from istio_iptables.host import netlink
from istio_iptables.log import Log
from istio_iptables.records import record

TYPE_CHECKING = False  # typing is not imported at run time (records.py says why)
if TYPE_CHECKING:
    from typing import Any

    Step = Callable[[Any], object]
    """One routing change, given an open pyroute2 IPRoute."""
    Change = tuple[str, Step, Step]
    """A description, the step, and its inverse."""

log = Log(__name__)

AF = {Family.V4: socket.AF_INET, Family.V6: socket.AF_INET6}
RTN_LOCAL = 2
FR_ACT_TO_TBL = 1
_FRA_PRIORITY, _FRA_FWMARK, _FRA_TABLE, _FRA_FWMASK = 6, 10, 15, 16
_RTA_DST, _RTA_OIF, _RTA_TABLE = 1, 4, 15
_IFA_ADDRESS = 1
LO = "lo"
LOOPBACK_PASSTHROUGH = IPv6Interface("::6/128")


@record
class MarkRule:
    family: Family
    mark: int
    table: int
    priority: int


@record
class Routing:
    """The routing state of ours found in the namespace."""

    rules: tuple[MarkRule, ...]
    local_tables: frozenset[tuple[Family, int]]
    """(family, table) pairs whose table holds ``local default dev lo``."""
    loopback_addresses: tuple[IPv6Interface, ...]

    def own_rules(self) -> list[MarkRule]:
        return [rule for rule in self.rules if (rule.family, rule.table) in self.local_tables]


def read() -> Routing:
    lo_index = socket.if_nametoindex(LO)
    rules = []
    for family, af in AF.items():
        for message in netlink.dump(netlink.RTM_GETRULE, af):
            table = message.u32(_FRA_TABLE) or message.header[4]
            mark, mask = message.u32(_FRA_FWMARK), message.u32(_FRA_FWMASK)
            if message.header[7] == FR_ACT_TO_TBL and mark and mask in (None, 0xFFFFFFFF):
                rules.append(MarkRule(family, mark, table, message.u32(_FRA_PRIORITY) or 0))
    local_tables = set()
    for message in netlink.dump(netlink.RTM_GETROUTE):
        family = Family.V4 if message.family == socket.AF_INET else Family.V6
        dst_len, route_type = message.header[1], message.header[7]
        if route_type == RTN_LOCAL and dst_len == 0 and message.u32(_RTA_OIF) == lo_index:
            local_tables.add((family, message.u32(_RTA_TABLE) or message.header[4]))
    addresses = tuple(
        IPv6Interface(f"{ip_address(message.attributes[_IFA_ADDRESS])}/{message.header[1]}")
        for message in netlink.dump(netlink.RTM_GETADDR, socket.AF_INET6)
        if int.from_bytes(message.header[4:8], "little") == lo_index and _IFA_ADDRESS in message.attributes
    )
    return Routing(tuple(rules), frozenset(local_tables), addresses)


def changes(plan: Plan, live: Routing, cleanup: bool = False) -> list[Change]:
    """What turns our live routing into the plan's (or removes all of ours with ``cleanup``)."""
    wanted_routes = set() if cleanup else set(plan.routes)
    wanted_addresses = set() if cleanup else set(plan.loopback_addresses)
    own_rules = live.own_rules()
    present = {PolicyRoute(rule.family, rule.mark, rule.table) for rule in own_rules}
    wanted_tables = {(route.family, route.table) for route in wanted_routes}
    stale_rules = [rule for rule in own_rules if PolicyRoute(rule.family, rule.mark, rule.table) not in wanted_routes]
    found: list[Change] = []
    for rule in stale_rules:
        found.append(
            (
                f"delete ip rule fwmark {rule.mark} lookup {rule.table} ({rule.family.label})",
                _rule("del", rule.family, rule.mark, rule.table, rule.priority),
                _rule("add", rule.family, rule.mark, rule.table, rule.priority),
            )
        )
    for family, table in sorted({(rule.family, rule.table) for rule in stale_rules} - wanted_tables, key=str):
        found.append(
            (
                f"delete local default route of table {table} ({family.label})",
                _route("del", family, table),
                _route("add", family, table),
            )
        )
    for family, table in sorted(wanted_tables - live.local_tables, key=str):
        found.append(
            (
                f"add local default route to table {table} ({family.label})",
                _route("add", family, table),
                _route("del", family, table),
            )
        )
    for route in sorted(wanted_routes - present, key=str):
        found.append(
            (
                f"add ip rule fwmark {route.mark} lookup {route.table} ({route.family.label})",
                _rule("add", route.family, route.mark, route.table),
                _rule("del", route.family, route.mark, route.table),
            )
        )
    for address in live.loopback_addresses:
        if address == LOOPBACK_PASSTHROUGH and address not in wanted_addresses:
            found.append((f"delete {address} from lo", _address("del", address), _address("add", address)))
    for address in sorted(wanted_addresses - set(live.loopback_addresses), key=str):
        found.append((f"add {address} to lo", _address("add", address), _address("del", address)))
    return found


def converge(plan: Plan, live: Routing, cleanup: bool = False) -> list[Step]:
    """Make our routing exactly the plan's. Returns the steps that undo what was changed, to run with
    ``undo`` if a later step of the apply fails."""
    todo = changes(plan, live, cleanup)
    if not todo:
        return []

    from pyroute2 import IPRoute  # noqa: PLC0415 (heavy; imported only when routing must change)
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    done: list[Step] = []
    with IPRoute() as ipr:
        for description, step, inverse in todo:
            try:
                step(ipr)
            except NetlinkError as error:
                undo(done)
                raise ApplyError(f"cannot {description}: {error.args[-1]}") from None
            log.info("routing: %s", description)
            done.insert(0, inverse)
    return done


def undo(steps: list[Step]) -> None:
    """Run undo steps; one that fails is logged, never raised, so it cannot hide the error being reported."""
    if not steps:
        return
    from pyroute2 import IPRoute  # noqa: PLC0415

    with IPRoute() as ipr:
        for step in steps:
            try:
                step(ipr)
            except Exception as error:
                log.warning("could not undo a routing change: %s", error)


def _rule(command: str, family: Family, mark: int, table: int, priority: int | None = None) -> Step:
    extra = {} if priority is None else {"priority": priority}
    return lambda ipr: ipr.rule(command, family=AF[family], fwmark=mark, table=table, **extra)


def _route(command: str, family: Family, table: int) -> Step:
    default = "0.0.0.0/0" if family is Family.V4 else "::/0"
    return lambda ipr: ipr.route(
        command,
        dst=default,
        type="local",
        table=table,
        oif=socket.if_nametoindex(LO),
        family=AF[family],
        scope="host",
    )


def _address(command: str, address: IPv6Interface) -> Step:
    return lambda ipr: ipr.addr(
        command,
        index=socket.if_nametoindex(LO),
        address=str(address.ip),
        prefixlen=128,
        family=socket.AF_INET6,
    )
