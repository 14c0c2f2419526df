"""One flow walked through the rules as the kernel walks it: ``trace(tables, flow) -> Trace``.

Pure. The rules come from a Plan (put in kernel order by ``state.tables_holding``, so ``-I`` inserts sit where
the kernel puts them) or from tables parsed from iptables-save or iptables-restore text; both go through the
same walk, so a plan and the live tables it produced explain a flow identically.

Netfilter's order for the packets this program captures (tables absent from the rules are passed over)::

  outbound (locally generated)
    OUTPUT      raw → mangle → nat → filter        routing chose the out interface before OUTPUT
    a packet routed over lo (to a loopback or own address, or redirected by nat) comes back in:
    PREROUTING  raw → mangle → [nat: skipped, the connection's NAT is already decided]
    INPUT       mangle → filter
  inbound (arriving on an interface)
    PREROUTING  raw → mangle → nat
    INPUT       mangle → filter                    the pod is the destination: local delivery

Kernel behaviour the walk reproduces:

- nat sees only a connection's first packet. NEW (and RELATED: the first packet of a related connection) go
  through it; an ESTABLISHED packet skips it and follows the NAT decided for its connection; an INVALID one
  has no connection at all and skips it too (which is why ``--drop-invalid`` exists).
- REDIRECT and TPROXY end the table (they return ACCEPT); ACCEPT ends the table, the next table still runs;
  DROP ends everything. RETURN in a user chain goes back to the caller, in a built-in chain it applies the
  chain's policy (ACCEPT unless the saved tables say otherwise). MARK, CONNMARK and CT go on to the next rule.
- REDIRECT in OUTPUT rewrites the destination to 127.0.0.1 (::1) and the port, and reroutes over lo.
- TPROXY sets the mark with its mask: ``mark = (mark & ~mask) ^ value``, and hands the packet to its
  listener's socket. A REDIRECT after it (nat PREROUTING runs after mangle) still rewrites the destination,
  but the packet stays with that socket: the TPROXY listener receives the connection, addressed to the
  rewritten port (Istio's kube-virt REDIRECT in TPROXY mode sends inbound traffic to 15006 this way).
- CT ``--zone`` applies only to a packet that has no conntrack entry yet: the first CT target in raw OUTPUT
  wins, later ones are ignored, and so is every CT target for a packet coming back over lo.
- The owner match needs the sending socket, which exists only for locally generated packets: in OUTPUT it
  compares the flow's uid and gid (the gid is the process's primary group, as iptables' ``--gid-owner``
  without ``--suppl-groups``); an OUTPUT packet without a socket (``uid=None``) fails ``--uid-owner`` and
  passes ``! --uid-owner`` (xt_owner); before routing (PREROUTING, INPUT) an owner clause never matches,
  negated or not (iptables refuses owner matches there anyway).
- Interfaces compare by name, a trailing ``+`` matching any name with that prefix; a packet without an
  interface (no in-interface in OUTPUT, no out-interface in PREROUTING) has the empty name.
- Addresses: the rule's network (host bits dropped, as the kernel keeps it) contains the packet's address;
  a network of the other family never matches, negated or not.
- ``-m set --match-set NAME dst`` (``--match-sets``) looks the destination address, or port for a port set,
  up in the set's members: a Plan's own sets, or those given to ``trace``.

Not modelled: POSTROUTING and nat INPUT (source NAT only), routing decided by a mark (the TPROXY route table
delivering marked packets over lo), helpers setting up NAT for RELATED connections, match options other than
the model's. A rule the model cannot express (``SavedRule.rule`` is None), or an owner group given by name
with no id known, is shown as "could not interpret"; the walk then goes on as if it did not match, and the
verdict says it is uncertain from that rule on.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from functools import partial
from ipaddress import IPv4Address, IPv6Address, ip_address

from istio_iptables.capture.config import parse_address, parse_port
from istio_iptables.capture.model import (
    BUILTIN_CHAINS,
    AddressSet,
    Connmark,
    ConntrackState,
    CtState,
    CtZone,
    Destination,
    DestinationPort,
    DestinationPorts,
    Family,
    GidOwner,
    InInterface,
    InSet,
    IPAddress,
    Jump,
    Mark,
    Match,
    OutInterface,
    Plan,
    PortSet,
    Proto,
    Protocol,
    Redirect,
    RestoreMark,
    Rule,
    RuleSet,
    SaveMark,
    SetMark,
    Source,
    SourcePort,
    Table,
    Target,
    Tproxy,
    UidOwner,
    Verdict,
)
from istio_iptables.explain import causes
from istio_iptables.records import field, mutable_record, record, replace
from istio_iptables.render.iptables import match_arguments
from istio_iptables.render.nft import chain_name
from istio_iptables.render.nft import match_text as nft_match_text
from istio_iptables.state import SavedRule, TableState, tables_holding
from istio_iptables.state.nft import rule_text as nft_rule_text

# ---- the flow ------------------------------------------------------------------------------------------

LOOPBACK_ADDRESS: dict[Family, IPAddress] = {Family.V4: IPv4Address("127.0.0.1"), Family.V6: IPv6Address("::1")}
"""Where REDIRECT sends a locally generated packet."""
PASSTHROUGH_V6 = IPv6Address("::6")
EPHEMERAL_PORT = 40000
APP_UID = 1000
LOOPBACK_INTERFACE = "lo"
POD_INTERFACE = "eth0"
"""The interface a pod's traffic leaves and arrives on, where nothing says otherwise."""


@record
class Pod:
    """The pod a flow is traced in, as far as the trace knows it: its addresses, and where they came from.

    A flow's defaults come from it: an outbound flow leaves from the pod's address, and a destination that is
    one of its addresses (or loopback, or ``::6``) is sent over ``lo``; an inbound flow arrives at the pod's
    address from a peer. A family with no address given falls back on the test range of DESIGN.md, and the
    trace says so (``assumption``).
    """

    addresses: tuple[IPAddress, ...] = ()
    origin: str = ""
    """Where the addresses come from (``--pod-ip``, ``the namespace``), for the trace's output."""
    interfaces: tuple[tuple[IPAddress, str], ...] = ()
    """The interface holding each address, when known (read from the namespace)."""

    def address(self, family: Family) -> IPAddress:
        return next((a for a in self.addresses if a.version == family.value), _ASSUMED_ADDRESS[family])

    def knows(self, family: Family) -> bool:
        return any(address.version == family.value for address in self.addresses)

    def interface(self, address: IPAddress) -> str:
        return dict(self.interfaces).get(address, POD_INTERFACE)

    def is_local(self, destination: IPAddress) -> bool:
        """Whether the pod sends to ``destination`` over ``lo``, as the kernel's local routes do."""
        family = Family.of(destination)
        own = destination in self.addresses or destination == self.address(family)
        return own or destination.is_loopback or destination == PASSTHROUGH_V6

    def peer(self, family: Family) -> IPAddress:
        """An address a default inbound flow comes from: never one of the pod's own."""
        address = _ASSUMED_PEER[family]
        while address in self.addresses or address == self.address(family):
            address += 1
        return address

    def assumption(self, family: Family) -> str:
        """What the trace assumed about the pod for a flow of ``family`` ("" when nothing)."""
        if self.knows(family):
            return ""
        return (
            f"pod address {self.address(family)} (give --pod-ip, or --live in its namespace); "
            "a destination equal to it is local, sent over lo"
        )


_ASSUMED_ADDRESS: dict[Family, IPAddress] = {
    Family.V4: IPv4Address("198.18.0.2"),
    Family.V6: IPv6Address("2001:db8::2"),
}
_ASSUMED_PEER: dict[Family, IPAddress] = {Family.V4: IPv4Address("198.18.0.1"), Family.V6: IPv6Address("2001:db8::1")}
ASSUMED_POD = Pod()
"""A pod nothing is known of: addresses 198.18.0.2 and 2001:db8::2, peers 198.18.0.1 and 2001:db8::1."""


class Direction(enum.Enum):
    OUTBOUND = "outbound"
    """Sent by a process in the pod."""
    INBOUND = "inbound"
    """Arriving at the pod on an interface."""


@record
class Flow:
    """The first packet (or, with ``state``, any packet) of a connection, as netfilter sees it.

    Build one with ``Flow.outbound(...)`` or ``Flow.inbound(...)``, which fill in the common case.
    """

    direction: Direction
    source: IPAddress
    source_port: int
    destination: IPAddress
    destination_port: int
    protocol: Proto = Proto.TCP
    uid: int | None = None
    """The sending process's uid; outbound only. None for an outbound packet without a socket."""
    gid: int | None = None
    """The sending process's primary gid; outbound only."""
    in_interface: str | None = None
    out_interface: str | None = None
    mark: int = 0
    connmark: int = 0
    state: CtState = CtState.NEW

    def __post_init__(self) -> None:
        if self.source.version != self.destination.version:
            raise ValueError(f"source {self.source} and destination {self.destination} are of different families")
        for name, port in (("source port", self.source_port), ("destination port", self.destination_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} {port} is not a port")
        for name, value in (("mark", self.mark), ("connmark", self.connmark)):
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name} {value} is not a 32-bit value")
        if self.direction is Direction.INBOUND:
            if self.uid is not None or self.gid is not None:
                raise ValueError("an inbound packet has no owner: uid and gid are for outbound flows")
            if self.out_interface is not None:
                raise ValueError("an inbound packet has no out interface before routing")
        elif self.in_interface is not None:
            raise ValueError("a locally generated packet has no in interface")

    @property
    def family(self) -> Family:
        return Family.of(self.destination)

    @classmethod
    def outbound(
        cls,
        destination: str | IPAddress,
        port: int,
        *,
        protocol: Proto | str = Proto.TCP,
        uid: int | None = APP_UID,
        gid: int | None = None,
        source: str | IPAddress | None = None,
        source_port: int = EPHEMERAL_PORT,
        out_interface: str | None = None,
        mark: int = 0,
        connmark: int = 0,
        state: CtState | str = CtState.NEW,
        pod: Pod = ASSUMED_POD,
    ) -> Flow:
        """A connection opened by a process of ``pod``.

        Defaults: uid 1000 (an application) and gid equal to the uid (1000:1000 for the app, 1337:1337 for
        the proxy); source the pod's address (198.18.0.2 or 2001:db8::2 when nothing is known of it), port
        40000; out interface ``lo`` when the destination is on this host (a loopback address: 127/8, ::1; the
        passthrough ::6; the pod's address or the given source), else ``eth0``; mark and connmark 0; state NEW.
        """
        dst = ip_address(destination) if isinstance(destination, str) else destination
        family = Family.of(dst)
        src = pod.address(family) if source is None else ip_address(source) if isinstance(source, str) else source
        if out_interface is None:
            local = pod.is_local(dst) or dst == src
            out_interface = LOOPBACK_INTERFACE if local else pod.interface(src)
        return cls(
            direction=Direction.OUTBOUND,
            source=src,
            source_port=source_port,
            destination=dst,
            destination_port=port,
            protocol=Proto(protocol),
            uid=uid,
            gid=uid if gid is None else gid,
            out_interface=out_interface,
            mark=mark,
            connmark=connmark,
            state=CtState(state),
        )

    @classmethod
    def inbound(
        cls,
        port: int,
        *,
        destination: str | IPAddress | None = None,
        family: Family | None = None,
        protocol: Proto | str = Proto.TCP,
        source: str | IPAddress | None = None,
        source_port: int = EPHEMERAL_PORT,
        in_interface: str | None = None,
        mark: int = 0,
        connmark: int = 0,
        state: CtState | str = CtState.NEW,
        pod: Pod = ASSUMED_POD,
    ) -> Flow:
        """A connection arriving at ``pod``.

        Defaults: destination the pod's address (198.18.0.2, or 2001:db8::2 for ``family=Family.V6`` or an
        IPv6 source, when nothing is known of it; else the pod's first address, of the source's family if
        given); source a peer (198.18.0.1 or 2001:db8::1, or the next address when that is the pod's own),
        port 40000; in interface the one holding the destination (``eth0`` when not known); mark and connmark
        0; state NEW.
        """
        dst = ip_address(destination) if isinstance(destination, str) else destination
        src = ip_address(source) if isinstance(source, str) else source
        known = [Family.of(address) for address in pod.addresses]
        chosen = family or next((Family.of(a) for a in (dst, src) if a is not None), known[0] if known else Family.V4)
        dst = pod.address(chosen) if dst is None else dst
        return cls(
            direction=Direction.INBOUND,
            source=pod.peer(chosen) if src is None else src,
            source_port=source_port,
            destination=dst,
            destination_port=port,
            protocol=Proto(protocol),
            in_interface=pod.interface(dst) if in_interface is None else in_interface,
            mark=mark,
            connmark=connmark,
            state=CtState(state),
        )

    def describe(self) -> str:
        """One line: ``outbound tcp 198.18.0.2:40000 -> 10.0.0.5:443 uid 1000 gid 1000 out eth0 NEW``."""
        parts = [
            self.direction.value,
            self.protocol.value,
            f"{endpoint(self.source, self.source_port)} -> {endpoint(self.destination, self.destination_port)}",
        ]
        if self.direction is Direction.OUTBOUND:
            parts.append("no socket" if self.uid is None else f"uid {self.uid} gid {self.gid}")
        if self.in_interface is not None:
            parts.append(f"in {self.in_interface}")
        if self.out_interface is not None:
            parts.append(f"out {self.out_interface}")
        if self.mark:
            parts.append(f"mark {self.mark}")
        if self.connmark:
            parts.append(f"connmark {self.connmark}")
        parts.append(self.state.value)
        return " ".join(parts)


def endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def parse_endpoint(text: str) -> tuple[IPAddress, int]:
    """``10.0.0.5:443`` or ``[2001:db8::5]:443`` as an address and a port (for the command line)."""
    found = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", text.strip())
    if found is None:
        raise ValueError("not ADDRESS:PORT (write an IPv6 address as [ADDRESS]:PORT)")
    address, port = (found[1], found[2]) if found[1] is not None else (found[3], found[4])
    return parse_address(address), parse_port(port)


# ---- the trace -----------------------------------------------------------------------------------------


class Outcome(enum.Enum):
    MATCHED = "matched"
    NOT_MATCHED = "not matched"
    UNKNOWN = "could not interpret"


@record
class Location:
    """Where a rule sits: the hook being walked (and whether the packet came back in over lo), its table,
    chain and 1-based number in the chain, in kernel order. Number 0 is the chain's policy."""

    hook: str
    looped_back: bool
    table: Table
    chain: str
    number: int

    def __str__(self) -> str:
        where = f"{self.table.value} {self.chain}"
        return f"{where} policy" if self.number == 0 else f"{where} rule {self.number}"


@record
class Step:
    """One rule the packet was checked against."""

    at: Location
    text: str
    """The rule as written (``-A CHAIN ...``)."""
    outcome: Outcome
    failed: str = ""
    """When not matched: the first clause that failed, as iptables arguments (``-o lo``)."""
    reason: str = ""
    """Why the clause failed or the rule could not be interpreted, where that is not evident."""
    effect: str = ""
    """When matched: what the target did (``jump to ISTIO_OUTPUT``, ``mark 0 -> 1338``)."""
    depth: int = 0
    """Calls deep: 0 in the built-in chain."""


@record
class Note:
    """Something the walk did without a rule: a table skipped, the end of a chain, a policy applied."""

    hook: str
    looped_back: bool
    table: Table
    chain: str
    text: str
    depth: int = 0


Event = Step | Note


@record
class TraceVerdict:
    text: str
    """In plain words: ``captured: redirected to 15001 by ISTIO_REDIRECT``."""
    captured_by: int | None
    """The port the flow ends at (the proxy's 15001, 15006, 15053), or None when it is not captured."""
    capture: str | None
    """``REDIRECT`` or ``TPROXY``, or None."""
    zone: int | None
    """The conntrack zone a CT target put the connection in, if any."""
    mark: int
    """The packet mark at the end."""
    connmark: int
    """The connection mark at the end."""
    dropped: bool
    certain: bool
    """False when the packet reached a rule that could not be interpreted: the walk assumed it did not match."""
    decided_at: Location | None
    """The rule that decided: the REDIRECT, TPROXY, DROP, or the RETURN that let the packet go uncaptured."""
    uncertain_at: Location | None


@record
class Trace:
    flow: Flow
    family: Family
    events: tuple[Event, ...]
    verdict: TraceVerdict
    assumed: tuple[str, ...] = ()
    """What the trace took for granted about the pod (its address, when not given)."""
    not_walked: tuple[str, ...] = ()
    """Rules the packet meets that the trace did not walk (another copy, another table): the verdict is
    uncertain when there are any."""

    @property
    def steps(self) -> tuple[Step, ...]:
        return tuple(event for event in self.events if isinstance(event, Step))


Rules = Plan | RuleSet | Sequence[Rule] | Mapping[Table, TableState]
"""What ``trace`` walks: a plan, one family's ruleset or rules, or one family's parsed tables."""


def trace(
    tables: Rules,
    flow: Flow,
    *,
    groups: Mapping[str, int] | None = None,
    sets: Sequence[AddressSet | PortSet] = (),
    assumed: Sequence[str] = (),
    not_walked: Sequence[tuple[str, str]] = (),
    nft: bool = False,
) -> Trace:
    """Walk ``flow`` through ``tables``: a Plan (the ruleset of the flow's family), one RuleSet or its rules
    (in application order, ``-I`` positions applied as the kernel does), or the tables of one family parsed
    from iptables-save or iptables-restore text (``state.parse_tables``).

    ``groups`` gives the ids of owner groups written by name (``--gid-owner java``); a name not in it makes
    the rule "could not interpret" for the flow. ``sets`` gives the members of the sets ``-m set
    --match-set`` looks up (a Plan brings its own); a set not known makes the rule "could not interpret".
    ``assumed`` is carried to the result (see ``Trace``). ``not_walked`` lists, as (hook, description), rules
    the trace cannot walk; those at a hook the packet passes are carried to the result and make the verdict
    uncertain. ``nft``: the rules are native nftables ones, shown in nft's spelling (a plan's are written so).
    """
    if isinstance(tables, Plan):
        sets = (*sets, *tables.sets)
        ruleset = tables.ruleset(flow.family)
        if ruleset is None:
            why = f"the plan has no {flow.family.label} rules ({flow.family.label} capture is off)"
            return replace(unsent(flow, why), assumed=tuple(assumed))
        tables = ruleset
    if isinstance(tables, RuleSet):
        tables = tables.rules
    if not isinstance(tables, Mapping):
        tables = (
            tables_holding(tables, partial(nft_rule_text, families=(flow.family,))) if nft else tables_holding(tables)
        )
    walk = _Walk(tables, flow, groups or {}, {each.name: each for each in sets}, nft)
    walked = walk.run()
    missed = tuple(description for hook, description in not_walked if hook in walk.passed)
    if missed:
        verdict = walked.verdict
        text = f"uncertain: rules the packet meets were not walked (see not walked); through the rest, {verdict.text}"
        walked = replace(walked, verdict=replace(verdict, text=text, certain=False))
    return replace(walked, assumed=tuple(assumed), not_walked=missed)


def unsent(flow: Flow, why: str) -> Trace:
    """The trace of a flow no rule sees (the plan has no rules of its family, the pod has no route)."""
    verdict = TraceVerdict(
        text=f"not captured: {why}",
        captured_by=None,
        capture=None,
        zone=None,
        mark=flow.mark,
        connmark=flow.connmark,
        dropped=False,
        certain=True,
        decided_at=None,
        uncertain_at=None,
    )
    return Trace(flow, flow.family, (), verdict)


# ---- the walk ------------------------------------------------------------------------------------------

_HOOK_TABLES: dict[str, tuple[Table, ...]] = {
    "OUTPUT": (Table.RAW, Table.MANGLE, Table.NAT, Table.FILTER),
    "PREROUTING": (Table.RAW, Table.MANGLE, Table.NAT),
    "INPUT": (Table.MANGLE, Table.FILTER),
}
MAX_EVENTS = 10_000
"""A bound on the walk, whatever the tables hold."""


@mutable_record
class _Packet:
    """The packet as the walk changes it."""

    protocol: Proto
    source: IPAddress
    source_port: int
    destination: IPAddress
    destination_port: int
    uid: int | None
    gid: int | None
    in_interface: str
    out_interface: str
    mark: int
    connmark: int
    state: CtState
    before_routing: bool = False
    """PREROUTING and INPUT: no local socket, so no owner."""
    tracked: bool = False
    """The packet has its conntrack entry (or template), so CT targets no longer apply."""
    zone: int | None = None


@mutable_record
class _TableRun:
    """How one table's walk for one hook ended."""

    hook: str
    looped_back: bool
    table: Table
    chain: str
    steps: int = 0
    skipped: str = ""
    terminal: Step | None = None
    """The REDIRECT, TPROXY, ACCEPT or DROP that ended the table."""
    terminal_target: Target | None = None
    decided: Step | str | None = None
    """When the table ended by its policy: the RETURN that led there, or the user chain whose end it was
    (the first of several ends reached in a row: the one that let the packet through)."""
    last_failure: dict[str, Step] = field(default_factory=dict)
    """Per chain, the last rule that did not match."""
    path: tuple[Step, ...] = ()
    """The jumps that led to ``terminal``, outermost first."""


class _Walk:
    def __init__(
        self,
        tables: Mapping[Table, TableState],
        flow: Flow,
        groups: Mapping[str, int],
        sets: Mapping[str, AddressSet | PortSet],
        nft: bool = False,
    ) -> None:
        self.flow = flow
        self.nft = nft
        self.groups = groups
        self.sets = sets
        self.declared = {table: state.chains for table, state in tables.items()}
        self.chains = {table: kernel_chains(state) for table, state in tables.items()}
        self.events: list[Event] = []
        self.runs: list[_TableRun] = []
        self.uncertain_at: Location | None = None
        self.dropped: Step | Note | None = None
        self.passed: list[str] = []
        """The hooks the packet went through, in order."""
        self.packet = _Packet(
            protocol=flow.protocol,
            source=flow.source,
            source_port=flow.source_port,
            destination=flow.destination,
            destination_port=flow.destination_port,
            uid=flow.uid,
            gid=flow.gid,
            in_interface=flow.in_interface or "",
            out_interface=flow.out_interface or "",
            mark=flow.mark,
            connmark=flow.connmark,
            state=flow.state,
        )

    def run(self) -> Trace:
        packet = self.packet
        if self.flow.direction is Direction.OUTBOUND:
            self.hook("OUTPUT", looped_back=False)
            if self.dropped is None and packet.out_interface == LOOPBACK_INTERFACE:
                # The packet goes out over lo and comes straight back in, with its mark and its conntrack.
                packet.in_interface, packet.out_interface = LOOPBACK_INTERFACE, ""
                packet.before_routing = True
                packet.tracked = True
                self.hook("PREROUTING", looped_back=True)
                self.hook("INPUT", looped_back=True)
        else:
            packet.before_routing = True
            self.hook("PREROUTING", looped_back=False)
            self.hook("INPUT", looped_back=False)
        return Trace(self.flow, self.flow.family, tuple(self.events), self.verdict())

    # -- tables ------------------------------------------------------------------------------------------

    def hook(self, hook: str, looped_back: bool) -> None:
        if self.dropped is None:
            self.passed.append(hook)
        for table in _HOOK_TABLES[hook]:
            if self.dropped is not None or len(self.events) >= MAX_EVENTS:
                return
            if not self.chains.get(table, {}).get(hook) and self.declared.get(table, {}).get(hook) != "DROP":
                continue
            run = _TableRun(hook, looped_back, table, hook)
            self.runs.append(run)
            skip = self.nat_skip(looped_back) if table is Table.NAT else ""
            if skip:
                run.skipped = skip
                self.note(run, hook, f"{table.value} {hook} skipped: {skip}")
                continue
            self.walk_table(run)
            if table is Table.RAW:
                self.packet.tracked = True  # conntrack runs right after raw: a CT target no longer applies

    def nat_skip(self, looped_back: bool) -> str:
        state = self.packet.state
        if state is CtState.ESTABLISHED:
            return "nat sees only a connection's first packet; an ESTABLISHED one follows its connection's NAT"
        if state is CtState.INVALID:
            return "an INVALID packet has no conntrack entry, and nat works only on tracked connections"
        if looped_back:
            return "the connection's destination NAT was already decided in nat OUTPUT"
        return ""

    def note(self, run: _TableRun, chain: str, text: str, depth: int = 0) -> Note:
        note = Note(run.hook, run.looped_back, run.table, chain, text, depth)
        self.events.append(note)
        return note

    def walk_table(self, run: _TableRun) -> None:
        chains = self.chains[run.table]
        declared = self.declared[run.table]
        stack: list[tuple[str, int]] = []
        calls: list[Step] = []  # the jump of each stack entry
        chain, index = run.chain, 0
        unwinding = False
        while len(self.events) < MAX_EVENTS:
            entries = chains.get(chain, [])
            if index >= len(entries):
                if not stack:
                    self.policy(run, declared.get(chain))
                    return
                if not unwinding:
                    run.decided = chain
                unwinding = True
                caller, index = stack.pop()
                calls.pop()
                self.note(run, chain, f"end of {chain}: back to {caller}", len(stack) + 1)
                chain = caller
                continue
            at = Location(run.hook, run.looped_back, run.table, chain, index + 1)
            entry = entries[index]
            step = self.check(at, entry, len(stack), stack[-1][0] if stack else "")
            run.steps += 1
            index += 1
            unwinding = False
            if step.outcome is not Outcome.MATCHED:
                run.last_failure[chain] = step
                continue
            assert entry.rule is not None
            target = entry.rule.target
            if isinstance(target, Jump):
                if target.chain == chain or any(target.chain == caller for caller, _ in stack):
                    self.uncertain(at)
                    self.note(run, chain, f"loop: {target.chain} is already being walked (the kernel refuses this)")
                    self.policy(run, declared.get(run.chain))
                    return
                if target.chain not in chains and target.chain not in declared:
                    self.note(run, chain, f"{target.chain} does not exist in {run.table.value}", len(stack) + 1)
                stack.append((chain, index))
                calls.append(step)
                chain, index = target.chain, 0
            elif target is Verdict.RETURN:
                run.decided = step
                if not stack:
                    self.policy(run, declared.get(chain))
                    return
                chain, index = stack.pop()
                calls.pop()
            elif isinstance(target, Verdict | Redirect | Tproxy):
                run.terminal, run.terminal_target, run.path = step, target, tuple(calls)
                if target is Verdict.DROP:
                    self.dropped = step
                return
        self.uncertain(Location(run.hook, run.looped_back, run.table, chain, 0))
        self.note(run, chain, f"stopped after {MAX_EVENTS} events")

    def policy(self, run: _TableRun, policy: str | None) -> None:
        policy = policy or "ACCEPT"
        note = self.note(run, run.chain, f"end of {run.table.value} {run.chain}: policy {policy}")
        if policy == "DROP":
            self.dropped = note

    def uncertain(self, at: Location) -> None:
        if self.uncertain_at is None:
            self.uncertain_at = at

    # -- rules -------------------------------------------------------------------------------------------

    def check(self, at: Location, entry: SavedRule, depth: int, caller: str) -> Step:
        """Evaluate one rule, apply its target's effect on the packet, and record the step."""
        rule = entry.rule
        text = f"{chain_name(at.chain)}: {entry.text}" if self.nft else entry.text
        if rule is None:
            self.uncertain(at)
            step = Step(at, text, Outcome.UNKNOWN, reason="a rule this model cannot express", depth=depth)
            self.events.append(step)
            return step
        failed: Match | None = None
        unknown = ""
        for clause in rule.clauses:
            matched, why = self.clause(clause)
            if matched is None:
                unknown = unknown or why
            elif not matched:
                failed = clause
                break
        if failed is not None:
            failed_text = self.clause_text(failed, rule)
            step = Step(at, text, Outcome.NOT_MATCHED, failed_text, self.failure(failed), depth=depth)
        elif unknown:
            self.uncertain(at)
            step = Step(at, text, Outcome.UNKNOWN, reason=unknown, depth=depth)
        else:
            step = Step(at, text, Outcome.MATCHED, effect=self.apply(rule.target, at, caller), depth=depth)
        self.events.append(step)
        return step

    def clause(self, clause: Match) -> tuple[bool | None, str]:
        """Whether the packet matches one clause (None: cannot tell, and why)."""
        packet = self.packet
        if isinstance(clause, UidOwner | GidOwner):
            if packet.before_routing:
                return False, ""
            if packet.uid is None:
                return clause.negated, ""  # xt_owner without a socket: only the negated form matches
            if isinstance(clause, UidOwner):
                return (packet.uid == clause.uid) != clause.negated, ""
            group = clause.group
            if isinstance(group, str):
                if group not in self.groups:
                    return None, f"owner group {group!r} is a name whose id is not known"
                group = self.groups[group]
            return (packet.gid == group) != clause.negated, ""
        if isinstance(clause, Source | Destination):
            address = packet.source if isinstance(clause, Source) else packet.destination
            if address.version != clause.network.version:
                return False, ""
            return (address in clause.network.network) != clause.negated, ""
        if isinstance(clause, InSet):
            members = self.sets.get(clause.name)
            if members is None:
                return None, f"the members of set {clause.name!r} are not known"
            if isinstance(members, PortSet):
                # A port set holds TCP and UDP ports alike (the model's only protocols).
                return (packet.destination_port in members.ports) != clause.negated, ""
            hit = any(packet.destination in network.network for network in members.networks)
            return hit != clause.negated, ""
        return _plain_match(clause, packet) != clause.negated, ""

    def failure(self, clause: Match) -> str:
        """Why a clause failed, where the clause alone does not say it."""
        packet = self.packet
        if isinstance(clause, UidOwner | GidOwner):
            if packet.before_routing:
                return "no local socket before routing: the owner match works only in OUTPUT"
            if packet.uid is None:
                return "the packet has no socket"
        if isinstance(clause, Source | Destination):
            address = packet.source if isinstance(clause, Source) else packet.destination
            if address.version != clause.network.version:
                return f"an IPv{clause.network.version} network never matches an IPv{address.version} packet"
        return ""

    def apply(self, target: Target, at: Location, caller: str) -> str:
        """Apply the target's effect on the packet, and describe it."""
        packet = self.packet
        leaves = f"leaves {at.table.value} {at.hook}"
        if isinstance(target, Jump):
            return f"jump to {target.chain}"
        if target is Verdict.RETURN:
            return f"RETURN to {caller}" if caller else f"RETURN: end of {at.table.value} {at.chain}"
        if target is Verdict.ACCEPT:
            return f"ACCEPT: {leaves}"
        if target is Verdict.DROP:
            return "DROP: the packet is discarded"
        if isinstance(target, Redirect):
            was = endpoint(packet.destination, packet.destination_port)
            if at.hook == "OUTPUT":
                # A local packet is redirected to the loopback address and rerouted over lo.
                packet.destination = LOOPBACK_ADDRESS[Family.of(packet.destination)]
                packet.out_interface = LOOPBACK_INTERFACE
            packet.destination_port = target.port
            after = endpoint(packet.destination, packet.destination_port)
            return f"REDIRECT to port {target.port} ({was} -> {after}); {leaves}"
        if isinstance(target, Tproxy):
            before = packet.mark
            packet.mark = (packet.mark & ~target.mask & 0xFFFFFFFF) ^ target.mark
            return f"TPROXY to port {target.port}, mark {before} -> {packet.mark}; {leaves}"
        if isinstance(target, SetMark):
            before, packet.mark = packet.mark, target.mark
            return f"mark {before} -> {packet.mark}"
        if isinstance(target, SaveMark):
            before, packet.connmark = packet.connmark, packet.mark
            return f"connmark {before} -> {packet.connmark} (saved from the mark)"
        if isinstance(target, RestoreMark):
            before, packet.mark = packet.mark, packet.connmark
            return f"mark {before} -> {packet.mark} (restored from the connmark)"
        assert isinstance(target, CtZone)
        if packet.tracked or packet.zone is not None:
            held = f"zone {packet.zone}" if packet.zone is not None else "its conntrack entry"
            return f"CT ignored: the packet already has {held}"
        packet.zone = target.zone
        return f"conntrack zone {target.zone}"

    # -- the verdict -------------------------------------------------------------------------------------

    def verdict(self) -> TraceVerdict:
        packet = self.packet
        captures = [run for run in self.runs if isinstance(run.terminal_target, Redirect | Tproxy)]
        captured_by: int | None = None
        kind: str | None = None
        decided_at: Location | None = None
        if isinstance(self.dropped, Step):
            decided_at = at = self.dropped.at
            text = f"dropped by {at.chain}" if at.chain not in BUILTIN_CHAINS else f"dropped by {at}"
        elif isinstance(self.dropped, Note):
            text = f"dropped by the DROP policy of {self.dropped.table.value} {self.dropped.chain}"
        elif captures:
            # TPROXY hands the packet to its listener's socket; a later REDIRECT (nat PREROUTING runs after
            # mangle) rewrites the destination but not that choice. Otherwise the last REDIRECT decides.
            tproxied = [run for run in captures if isinstance(run.terminal_target, Tproxy)]
            capture = tproxied[-1] if tproxied else captures[-1]
            assert capture.terminal is not None and isinstance(capture.terminal_target, Redirect | Tproxy)
            decided_at = capture.terminal.at
            captured_by = capture.terminal_target.port
            by = capture.terminal.at.chain
            if isinstance(capture.terminal_target, Tproxy):
                kind = "TPROXY"
                text = f"captured: TPROXY to {captured_by} with mark {packet.mark} by {by}"
                later = captures[captures.index(capture) + 1 :]
                if later:
                    assert later[-1].terminal is not None and isinstance(later[-1].terminal_target, Redirect)
                    text += (
                        f"; the REDIRECT by {later[-1].terminal.at.chain} after it only rewrote the destination "
                        f"to port {later[-1].terminal_target.port}, which the TPROXY socket sees as its own"
                    )
            else:
                kind = "REDIRECT"
                dns = self.flow.destination_port == 53 and by.endswith("_DNS")
                text = f"captured: {'DNS redirected' if dns else 'redirected'} to {captured_by} by {by}"
            cause = self.capture_cause(capture)
            if cause:
                text = f"captured: {cause}; {text.removeprefix('captured: ').removeprefix('DNS ')}"
        else:
            text, decided_at = self.not_captured()
        if packet.zone is not None:
            text += f"; conntrack zone {packet.zone}"
        if packet.mark != self.flow.mark and f"mark {packet.mark}" not in text:
            text += f"; mark {packet.mark}"
        if self.uncertain_at is not None:
            text = f"uncertain from {self.uncertain_at} on, taken as not matching; then {text}"
        return TraceVerdict(
            text=text,
            captured_by=captured_by,
            capture=kind,
            zone=packet.zone,
            mark=packet.mark,
            connmark=packet.connmark,
            dropped=self.dropped is not None,
            certain=self.uncertain_at is None,
            decided_at=decided_at,
            uncertain_at=self.uncertain_at,
        )

    def not_captured(self) -> tuple[str, Location | None]:
        """Why the packet was let go, from the hook where capture is decided (OUTPUT, or PREROUTING for an
        inbound flow): nat skipped, else nat's decision if it made one, else the last table's that did (raw
        aside: it only sets conntrack zones)."""
        primary = "OUTPUT" if self.flow.direction is Direction.OUTBOUND else "PREROUTING"
        runs = [run for run in self.runs if run.hook == primary and not run.looped_back]
        deciding = [
            run for run in runs if (run.terminal is not None or run.decided is not None) and run.table is not Table.RAW
        ]
        nat = [run for run in deciding if run.table is Table.NAT]
        run = (nat or deciding)[-1] if deciding else None
        accepted = run if run is not None and run.terminal is not None else None
        established = self.packet.state is CtState.ESTABLISHED
        head = "not decided by this packet" if established else "not captured"
        skipped = next((run.skipped for run in runs if run.skipped), "")
        if skipped:
            if accepted is None:
                return f"{head}: {skipped}", None
            reason, at = self.reason(accepted)
            return f"{head}: {skipped}; {reason}", at
        if run is not None:
            reason, at = self.reason(run)
            if accepted is not None and established:
                reason = f"an ESTABLISHED packet, {reason}"
            return f"{head}: {reason}", at
        if self.flow.direction is Direction.INBOUND:
            cause = causes.no_inbound_cause(self.rules_of, self.flow.protocol)
            if cause:
                return f"{head}: {cause}", None
        walked = [run for run in runs if run.steps]
        if walked:
            return f"{head}: no rule in {walked[-1].table.value} {primary} matched", None
        return f"{head}: no rules in {primary}", None

    def reason(self, run: _TableRun) -> tuple[str, Location | None]:
        """Why ``run`` let the packet go: the cause in the flags' words when the deciding rule is one of
        ours, and where it was decided."""
        flow = self.flow
        if run.terminal is not None:
            mark = f" with mark {self.packet.mark}" if self.packet.mark else ""
            jump = self.rule_at(run.path[-1].at) if run.path else None
            cause = causes.divert_cause(jump)
            accepted = f"accepted by {run.terminal.at.chain}{mark}"
            return (f"{cause} ({accepted})" if cause else accepted), run.terminal.at
        if isinstance(run.decided, Step):
            at = run.decided.at
            rule = self.rule_at(at)
            if rule is not None:
                cause = causes.return_cause(
                    rule,
                    at.number,
                    self.rules_of,
                    destination=flow.destination,
                    port=flow.destination_port,
                    gid=flow.gid,
                )
                if cause:
                    return f"{cause} ({at})", at
            condition = " ".join(self.clause_text(clause, rule) for clause in rule.clauses) if rule is not None else ""
            return f"RETURN at {at} ({condition or 'every packet'})", at
        walked = {
            step.at.chain
            for step in self.events
            if isinstance(step, Step)
            and (step.at.hook, step.at.table, step.at.looped_back) == (run.hook, run.table, run.looped_back)
        }
        cause = causes.unmatched_cause(
            run.table,
            walked,
            self.rules_of,
            protocol=flow.protocol,
            destination=flow.destination,
            port=flow.destination_port,
        )
        failure = run.last_failure.get(str(run.decided))
        last = f"rule {failure.at.number} needs {failure.failed}" if failure is not None and failure.failed else ""
        if cause:
            return cause, None
        return f"no rule of {run.table.value} {run.decided} matched" + (f" ({last})" if last else ""), None

    def capture_cause(self, capture: _TableRun) -> str:
        assert capture.terminal is not None
        terminal = self.rule_at(capture.terminal.at)
        if terminal is None:
            return ""
        jump = self.rule_at(capture.path[-1].at) if capture.path else None
        return causes.capture_cause(jump, terminal, self.flow.destination, self.flow.destination_port)

    def clause_text(self, clause: Match, rule: Rule) -> str:
        return nft_match_text(clause, rule) if self.nft else clause_text(clause)

    def rules_of(self, table: Table, chain: str) -> list[Rule]:
        return [entry.rule for entry in self.chains.get(table, {}).get(chain, []) if entry.rule is not None]

    def rule_at(self, at: Location) -> Rule | None:
        entries = self.chains[at.table].get(at.chain, [])
        return entries[at.number - 1].rule if 0 < at.number <= len(entries) else None


def _plain_match(clause: Match, packet: _Packet) -> bool:
    """The positive sense of a clause that needs nothing but the packet."""
    if isinstance(clause, Protocol):
        return packet.protocol is clause.protocol
    if isinstance(clause, InInterface):
        return _interface_matches(clause.name, packet.in_interface)
    if isinstance(clause, OutInterface):
        return _interface_matches(clause.name, packet.out_interface)
    if isinstance(clause, DestinationPort):
        return packet.destination_port == clause.port
    if isinstance(clause, SourcePort):
        return packet.source_port == clause.port
    if isinstance(clause, DestinationPorts):
        return packet.destination_port in clause.ports
    if isinstance(clause, Mark):
        return packet.mark == clause.mark
    if isinstance(clause, Connmark):
        return packet.connmark == clause.mark
    assert isinstance(clause, ConntrackState)
    return packet.state in clause.states


def _interface_matches(pattern: str, name: str) -> bool:
    """iptables' interface match: exact, or a prefix when the pattern ends with ``+``."""
    return name.startswith(pattern[:-1]) if pattern.endswith("+") else name == pattern


def clause_text(clause: Match) -> str:
    return " ".join(match_arguments(clause))


_INSERT = re.compile(r"-I\s+(\S+)(?:\s+(\d+))?\s*(.*)")


def kernel_chains(state: TableState) -> dict[str, list[SavedRule]]:
    """A table's rules per chain in the order the kernel holds them: saves list them so already; a restore
    payload's ``-I CHAIN N`` lines are put at N as the kernel does when it applies them in sequence, and
    shown as the ``-A`` line a save would print."""
    chains: dict[str, list[SavedRule]] = {}
    for entry in state.entries:
        rules = chains.setdefault(entry.chain, [])
        insert = _INSERT.fullmatch(entry.text.strip())
        if insert is None:
            rules.append(entry)
            continue
        position = int(insert[2]) if insert[2] else 1
        text = f"-A {insert[1]} {insert[3]}".rstrip()
        rule = replace(entry.rule, position=None) if entry.rule is not None else None
        rules.insert(min(position - 1, len(rules)), SavedRule(entry.chain, text, rule))
    return chains
