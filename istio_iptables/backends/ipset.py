"""The sets of ``--match-sets`` for the iptables backends, through ``ipset restore``.

Sets are created and filled before the rules that look them up, and destroyed after the rules that looked
them up are gone, so no rule ever meets a missing set. A set whose members change is refilled under a
temporary name and swapped in (``ipset swap`` is atomic), so no rule ever meets a half-filled set.
"""

from __future__ import annotations

import subprocess
from ipaddress import ip_interface

from istio_iptables.backends.restore import LOSSLESS
from istio_iptables.capture.model import ISTIO_SETS, AddressSet, Family, PortSet
from istio_iptables.errors import ApplyError
from istio_iptables.records import record
from istio_iptables.render.iptables import ipset_payload

TIMEOUT = 60.0
SWAP_SUFFIX = ".n"
"""The temporary name of a set being refilled (ipset names hold 31 characters; ours at most 28)."""


@record
class LiveSet:
    create: str
    """Its ``create`` line as ``ipset save`` prints it (to recreate it exactly on a rollback)."""
    members: frozenset[str]


def read() -> dict[str, LiveSet]:
    """Our sets in this namespace (one ``ipset save``)."""
    text = _run(["ipset", "save"], None)
    found: dict[str, LiveSet] = {}
    members: dict[str, set[str]] = {}
    creates: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or words[1] not in ISTIO_SETS:
            continue
        if words[0] == "create":
            creates[words[1]] = line
            members.setdefault(words[1], set())
        elif words[0] == "add":
            members.setdefault(words[1], set()).add(words[2])
    for name, create in creates.items():
        found[name] = LiveSet(create, frozenset(members[name]))
    return found


def as_model(live: dict[str, LiveSet]) -> list[AddressSet | PortSet]:
    """Live sets as the model's, for tracing the live rules."""
    sets: list[AddressSet | PortSet] = []
    for name, found in live.items():
        if " hash:net " in found.create:
            family = Family.V6 if "family inet6" in found.create else Family.V4
            networks = tuple(ip_interface(member) for member in sorted(found.members))
            sets.append(AddressSet(name, family, networks))
        else:
            sets.append(PortSet(name, tuple(sorted(int(member) for member in found.members))))
    return sets


def wanted_members(ipset: AddressSet | PortSet) -> frozenset[str]:
    if isinstance(ipset, AddressSet):
        return frozenset(str(network.network) for network in ipset.networks)
    return frozenset(str(port) for port in ipset.ports)


def fill(sets: tuple[AddressSet | PortSet, ...], live: dict[str, LiveSet]) -> str:
    """The restore input that makes every planned set exist with exactly its members: new sets created,
    changed ones refilled under a temporary name and swapped in. Empty when all are as planned."""
    lines = []
    for ipset in sets:
        current = live.get(ipset.name)
        if current is not None and current.members == wanted_members(ipset):
            continue
        if current is None:
            lines.append(ipset_payload([ipset]))
        else:
            temporary = ipset_payload([ipset]).replace(f" {ipset.name} ", f" {ipset.name}{SWAP_SUFFIX} ")
            lines += [temporary, f"swap {ipset.name} {ipset.name}{SWAP_SUFFIX}\n"]
            lines.append(f"destroy {ipset.name}{SWAP_SUFFIX}\n")
    return "".join(lines)


def drop(sets: tuple[AddressSet | PortSet, ...], live: dict[str, LiveSet]) -> str:
    """The restore input destroying our sets the plan no longer has (run once no rule looks them up)."""
    planned = {ipset.name for ipset in sets}
    return "".join(f"destroy {name}\n" for name in live if name not in planned)


def created(fill_payload: str) -> list[str]:
    """The sets a ``fill`` payload writes (created, or refilled and swapped in)."""
    return [
        line.split()[1] for line in fill_payload.splitlines() if line.startswith("create ") and SWAP_SUFFIX not in line
    ]


def destroyed(drop_payload: str) -> list[str]:
    """The sets a ``drop`` payload destroys."""
    return [line.split()[1] for line in drop_payload.splitlines()]


def differences(sets: tuple[AddressSet | PortSet, ...], live: dict[str, LiveSet]) -> list[str]:
    """How our live sets differ from the planned ones, one line per set or member; empty when as planned."""
    lines = []
    for ipset in sets:
        current = live.get(ipset.name)
        if current is None:
            lines.append(f"missing set {ipset.name}")
            continue
        wanted = wanted_members(ipset)
        lines += [f"{ipset.name}: missing member {member}" for member in sorted(wanted - current.members)]
        lines += [f"{ipset.name}: extra member {member}" for member in sorted(current.members - wanted)]
    planned = {ipset.name for ipset in sets}
    lines += [f"extra set {name} ({len(found.members)} members)" for name, found in live.items() if name not in planned]
    return lines


def restore_as_read(live: dict[str, LiveSet], sets: tuple[AddressSet | PortSet, ...]) -> str:
    """The restore input that undoes ``fill``: sets it created destroyed, sets it changed refilled as read."""
    lines = []
    for ipset in sets:
        before = live.get(ipset.name)
        if before is None:
            lines.append(f"destroy {ipset.name}\n")
        elif before.members != wanted_members(ipset):
            temporary = before.create.replace(f" {ipset.name} ", f" {ipset.name}{SWAP_SUFFIX} ", 1)
            lines.append(temporary + "\n")
            lines += [f"add {ipset.name}{SWAP_SUFFIX} {member}\n" for member in sorted(before.members)]
            lines += [f"swap {ipset.name} {ipset.name}{SWAP_SUFFIX}\n", f"destroy {ipset.name}{SWAP_SUFFIX}\n"]
    return "".join(lines)


def apply(payload: str) -> None:
    if payload:
        _run(["ipset", "restore"], payload)


@record
class Changes:
    """What an apply does to our sets: the planned ones, the live ones it read, and the restore inputs that
    fill the planned ones (before the rules go in) and drop the stale ones (after the rules are out)."""

    planned: tuple[AddressSet | PortSet, ...]
    live: dict[str, LiveSet]
    fill: str
    drop: str

    @property
    def changes(self) -> bool:
        return bool(self.fill or self.drop)

    def drift(self) -> list[str]:
        """How live sets differ from the plan: empty when there are none yet, or they are as planned."""
        return differences(self.planned, self.live) if self.live and self.changes else []

    def fill_in(self) -> None:
        apply(self.fill)

    def drop_out(self) -> None:
        apply(self.drop)

    def put_back(self) -> None:
        """Undo ``fill_in``: the sets as they were read."""
        apply(restore_as_read(self.live, self.planned) if self.fill else "")

    def report(self) -> list[str]:
        return [f"ipset: wrote {name}" for name in created(self.fill)] + [
            f"ipset: deleted {name}" for name in destroyed(self.drop)
        ]


def changes(planned: tuple[AddressSet | PortSet, ...]) -> Changes:
    """The changes that make our sets in this namespace the planned ones."""
    live = read()
    return Changes(planned, live, fill(planned, live), drop(planned, live))


def _run(arguments: list[str], stdin: str | None) -> str:
    try:
        result = subprocess.run(
            arguments, input=stdin, capture_output=True, text=True, errors=LOSSLESS, timeout=TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise ApplyError("ipset not found: --match-sets with iptables needs the ipset tool") from None
    except subprocess.TimeoutExpired:
        raise ApplyError(f"{' '.join(arguments)} did not finish within {TIMEOUT:.0f} s") from None
    if result.returncode != 0:
        raise ApplyError(f"{' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout
