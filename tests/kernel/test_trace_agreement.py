"""The tracer agrees with the kernel: random configurations, random flows, each sent for real.

A seeded generator (``SEED``; set ``TRACE_AGREEMENT_SEED`` to explore others) draws configurations from the
init container's flag space and, for each, a fresh lab with the rules applied by the real CLI. Random flows
are then sent for real (outbound TCP from several identities, inbound TCP from the peers, DNS over UDP and
TCP), many at a time by the ``batch`` actor, and the answer says who received each one:

- ``PROXY15001|`` or ``PROXY15006|`` first: the sidecar stand-in's outbound or inbound listener;
- the stub's DNS answer: the DNS stub on 15053;
- the destination's own answer (echo name, upstream DNS answer): not captured.

Each observation is compared with two traces of the same flow: one through the plan built in-process from
exactly the flags given to the CLI, one through the live rules read back with ``iptables-<variant>-save``
(``ip6tables`` for IPv6 flows) or ``nft``. Any difference, an uncertain trace, or a flow that got no answer where one
was due, fails the test with the seed, the flags, the flow, what was observed and both traces. The only
flows not counted are those sent to an address that is not the pod's (``ELSEWHERE``) that nothing captured:
nobody answers them, so their silence proves nothing.

Native nftables too: its tables are read back with ``nft -j list ruleset``, one family's view each
(``NftState.family_tables``). Istio's ``inet`` tables capture both families whatever ``--no-ipv6`` says (see
test_traffic), and the plan holds no rules for the family it leaves out, so for those flows only the live
rules are traced (and inbound ones, which the proxy cannot relay without ``::6`` on lo, are not counted).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

import pytest
import typer

from istio_iptables.capture.config import Config, load
from istio_iptables.capture.model import AddressSet, Family, Plan, PortSet, Proto, Table
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.cli import app
from istio_iptables.explain.trace import Flow, Trace, trace
from istio_iptables.explain.trace_output import render_trace_text
from istio_iptables.state import TableState, parse_tables
from istio_iptables.state.nft import parse_ruleset
from tests.helpers import run_cli
from tests.kernel import netlab
from tests.kernel.netlab import (
    APP_UID,
    PEER2_4,
    PEER2_6,
    PEER4,
    PEER6,
    POD4,
    POD4_B,
    POD6,
    POD6_B,
    PROXY_UID,
    Lab,
    apply_capture,
    check_lab_address,
)

pytestmark = pytest.mark.kernel

SEED = int(os.environ.get("TRACE_AGREEMENT_SEED", "20250611"))
CONFIGS = 12
FLOWS_PER_CONFIG = 46
MIN_FLOWS = 500
PROBE_TIMEOUT = 3.0
SILENT_TIMEOUT = 1.0
BATCH_TIMEOUT = 60.0
TIME_BUDGET = 150.0  # seconds per variant: every loop below is bounded by counts; this bounds the total too

# Every echo server (peer, peer2, the pod's app) listens on all of these: any drawn port has a listener.
PORTS = (8080, 8081, 9090, 15008, 15020, 15021, 15090)
CAPTURE_PORTS = {15001: "outbound listener", 15006: "inbound listener", 15053: "DNS stub"}
STUB_ANSWER = "198.18.99.53"
RESOLVER = "127.0.0.53"  # a node-local resolver in the pod, as systemd-resolved's
UPSTREAM_ANSWER = {
    **dict.fromkeys((PEER4, PEER6), "198.18.99.1"),
    **dict.fromkeys((PEER2_4, PEER2_6), "198.18.99.2"),
    RESOLVER: "198.18.99.127",
}
# Addresses that are not the pod's, routed to it by the peer: only a capture can answer for them (the pod
# does not forward, and its own route to them is "unreachable", so the proxy's relay fails at once).
ELSEWHERE = {"198.18.77.7": "198.18.77.0/24", "2001:db8:77::7": "2001:db8:77::/64"}

# Who answers a TCP connection that is not captured, by destination; and the pod's side of each link.
OWNER = {
    **dict.fromkeys((PEER4, PEER6), "peer"),
    **dict.fromkeys((PEER2_4, PEER2_6), "peer2"),
    **dict.fromkeys((POD4, POD4_B, POD6, POD6_B, "127.0.0.1", "127.0.0.6", "::1", "::6"), "app"),
    **dict.fromkeys(ELSEWHERE, "nobody"),
}
INTERFACE = {**dict.fromkeys((PEER4, PEER6), "eth0"), **dict.fromkeys((PEER2_4, PEER2_6), "eth1")}
POD_SIDE = {PEER4: POD4, PEER6: POD6, PEER2_4: POD4_B, PEER2_6: POD6_B}

# Identities in the pod as (uid, gid): the app most often, the proxy, a process in the proxy's group, another
# user, 1500 (a second proxy UID in some configurations), group 2000 (a proxy GID or owner group in some),
# and root.
APP = (APP_UID, APP_UID)
PROXY = (PROXY_UID, PROXY_UID)
IDENTITIES = (*[APP] * 4, PROXY, PROXY, (1001, PROXY_UID), (1001, 1001), (1500, 1500), (1002, 2000), (0, 0))

V4_CIDRS = ("198.18.0.0/24", "198.19.0.0/24", "198.18.0.1/32", "198.19.0.1/32", "198.18.0.0/15")
V6_CIDRS = ("2001:db8::/64", "2001:db8:1::/64", "2001:db8::1/128", "2001:db8::/32")


# ---- configurations --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Drawn:
    """One configuration: the flags as the init container passes them, and the IPv6 switch."""

    args: tuple[str, ...]
    ipv6: bool

    @property
    def tproxy(self) -> bool:
        return "TPROXY" in self.args

    def command(self) -> str:
        return shlex.join([*self.args, "--ipv6" if self.ipv6 else "--no-ipv6"])


def _some(rng: random.Random, items: Sequence[Any], most: int) -> list[Any]:
    return rng.sample(list(items), rng.randint(1, min(most, len(items))))


def _ports(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


def draw_config(rng: random.Random, index: int) -> Drawn:
    """A configuration from Istio's flag space: the injected init container's flags with a few of them
    changed (so most flows still meet a capturing configuration), DNS capture in most. Modes alternate and
    every third configuration has IPv6, so both are always covered; everything else is drawn."""
    ipv6 = index % 3 == 1 or rng.random() < 0.2
    flags: dict[str, str] = {
        "-p": "15001",
        "-z": "15006",
        "-u": "1337",
        "-m": "REDIRECT" if index % 2 == 0 else "TPROXY",
        "-i": "*",
        "-x": "",
        "-b": "*",
        "-d": "15090,15021,15020",
    }
    switches: list[str] = []

    def service() -> None:
        form = rng.choice(["", "list", "list", "loopback"])
        cidrs = _some(rng, V4_CIDRS, 2) + (_some(rng, V6_CIDRS, 2) if rng.random() < 0.5 else [])
        flags["-i"] = "" if form == "" else ",".join(cidrs + (["127.0.0.0/8"] if form == "loopback" else []))

    def groups() -> None:
        if rng.random() < 0.6:
            flags["--outbound-owner-groups"] = rng.choice(["1000", "1000,2000", "2000"])
        else:
            flags["--outbound-owner-groups-exclude"] = rng.choice(["2000", "1000"])

    changes: dict[str, Callable[[], None]] = {
        "uids": lambda: flags.update({"-u": "1337,1500"}),
        "gids": lambda: flags.update({"-g": rng.choice(["1337", "1337,2000", "2000"])}),
        "service": service,
        "exclude": lambda: flags.update(
            {"-x": ",".join(_some(rng, [*V4_CIDRS[1:4], "198.18.0.2/32", *V6_CIDRS[1:3]], 2))}
        ),
        "inbound": lambda: flags.update({"-b": rng.choice(["", _ports(_some(rng, PORTS, 3))])}),
        "local": lambda: flags.update({"-d": rng.choice(["", _ports(_some(rng, PORTS, 3))])}),
        "outbound-exclude": lambda: flags.update({"-o": _ports(_some(rng, (9090, 8081, 53, 15020), 2))}),
        "outbound-include": lambda: flags.update({"-q": _ports(_some(rng, (9090, 8081, 15020), 2))}),
        "interfaces": lambda: flags.update({"-c": rng.choice(["eth0", "eth1"])}),
        "kube-virt": lambda: flags.update({"-k": rng.choice(["eth0", "eth1"])}),
        "groups": groups,
        "drop-invalid": lambda: switches.append("--drop-invalid"),
        "loopback-cidr": lambda: flags.update({"--host-ipv4-loopback-cidr": "127.0.0.0/8"}),
        "tunnel": lambda: flags.update({"-e": "8081"}),
        "tproxy-mark": lambda: flags.update({"-t": "1400", "-r": "140"}),
    }
    for name in rng.sample(sorted(changes), rng.randint(1, 4)):
        changes[name]()
    dns = rng.choices(["off", "servers", "all"], weights=[3, 5, 2])[0]
    if dns != "off":
        switches.append("--redirect-dns")
        servers = [PEER4, PEER2_4, RESOLVER, *((PEER6, PEER2_6) if ipv6 else ())]
        if dns == "servers" or rng.random() < 0.5:
            flags["--dns-servers"] = ",".join(_some(rng, servers, 2))
        if dns == "all":
            switches.append("--capture-all-dns")
    args = [token for pair in flags.items() for token in pair] + switches
    return Drawn(tuple(args), ipv6)


def config_of(drawn: Drawn) -> Config:
    """The Config the CLI builds from these flags: parsed by the CLI's own command, loaded with the
    environment the CLI process gets (apply_capture passes ours on)."""
    command = typer.main.get_command(app.app)
    argv = [*drawn.args, "--ipv6" if drawn.ipv6 else "--no-ipv6"]
    with command.make_context("istio-iptables", argv) as context:
        given = dict(context.params)
    return load(given, os.environ)


# ---- flows -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One flow to send: from ``origin`` ("pod", "peer" or "peer2") as uid/gid."""

    origin: str
    uid: int
    gid: int
    kind: str  # "tcp" or "dns"
    host: str
    port: int
    protocol: Proto = Proto.TCP

    @property
    def inbound(self) -> bool:
        return self.origin != "pod"

    def request(self, number: int) -> dict[str, Any]:
        check_lab_address(self.host)
        if self.kind == "dns":
            return {"kind": "dns", "server": self.host, "port": self.port, "tcp": self.protocol is Proto.TCP}
        request = {"kind": "tcp", "host": self.host, "port": self.port, "data": f"flow{number}"}
        if self.host in ELSEWHERE:
            # Silence is expected when it is not captured; a capture answers at once (local delivery).
            request["timeout"] = SILENT_TIMEOUT
        return request

    def describe(self) -> str:
        what = f"DNS over {self.protocol.value}" if self.kind == "dns" else "TCP"
        return f"{what} from {self.origin} as {self.uid}:{self.gid} to {self.host} port {self.port}"


def draw_flows(rng: random.Random, drawn: Drawn, count: int) -> list[Probe]:
    probes = []
    for _ in range(count):
        six = rng.random() < (0.45 if drawn.ipv6 else 0.1)
        kind = rng.choices(["outbound", "inbound", "dns"], weights=[45, 25, 30])[0]
        uid, gid = rng.choice(IDENTITIES)
        if kind == "outbound":
            if six:
                hosts = [PEER6, PEER2_6, POD6, POD6_B, "::1", *(("::6",) if drawn.ipv6 else ())]
            else:
                hosts = [PEER4, PEER2_4, POD4, POD4_B, "127.0.0.1", "127.0.0.6"]
            # Peers four times as often as each of the pod's own addresses.
            host = rng.choice(hosts[:2] * 4 + hosts[2:])
            probes.append(Probe("pod", uid, gid, "tcp", host, rng.choice(PORTS)))
        elif kind == "inbound":
            origin = rng.choice(["peer", "peer", "peer2", "elsewhere"])
            host = {
                ("peer", False): POD4,
                ("peer", True): POD6,
                ("peer2", False): POD4_B,
                ("peer2", True): POD6_B,
                ("elsewhere", False): "198.18.77.7",
                ("elsewhere", True): "2001:db8:77::7",
            }[(origin, six)]
            probes.append(Probe("peer" if origin == "elsewhere" else origin, 0, 0, "tcp", host, rng.choice(PORTS)))
        else:
            server = rng.choice([PEER6, PEER2_6] if six else [PEER4, PEER2_4, RESOLVER])
            protocol = rng.choice([Proto.UDP, Proto.UDP, Proto.TCP])
            probes.append(Probe("pod", uid, gid, "dns", server, 53, protocol))
    return probes


def flow_of(probe: Probe, source: list[Any] | None) -> Flow:
    """The flow as the tracer takes it, with the source address and port the kernel actually chose (the
    probe's own socket address), or the route's choice when the probe never connected."""
    if probe.inbound:
        peer = PEER4 if probe.origin == "peer" else PEER2_4
        if ":" in probe.host:
            peer = PEER6 if probe.origin == "peer" else PEER2_6
        address, port = source if source else (peer, 40000)
        return Flow.inbound(
            probe.port,
            destination=probe.host,
            source=address,
            source_port=port,
            protocol=probe.protocol,
            in_interface=INTERFACE[peer],
        )
    local = probe.host not in INTERFACE
    address, port = source if source else (POD_SIDE.get(probe.host, probe.host), 40000)
    return Flow.outbound(
        probe.host,
        probe.port,
        protocol=probe.protocol,
        uid=probe.uid,
        gid=probe.gid,
        source=address,
        source_port=port,
        out_interface="lo" if local else INTERFACE[probe.host],
    )


# ---- observation -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    captured_by: int | None
    """The capture port that received the flow, or None when the destination itself answered."""
    detail: str
    """The answer, or the error."""
    problem: str = ""
    """Set when the answer does not say who received the flow (a failure, an unexpected answerer)."""
    silent: bool = False
    """No answer where none is due unless the flow is captured (ELSEWHERE): nobody would answer it
    directly, so silence says nothing certain; it counts only if a trace says it is captured."""


def observe(probe: Probe, result: dict[str, Any], owner: dict[str, str] = OWNER) -> Observed:
    if not result.get("ok"):
        if probe.host in ELSEWHERE:
            return Observed(None, str(result.get("error")), silent=True)
        return Observed(None, str(result.get("error")), "no answer")
    prefixes: list[int] = result["prefixes"]
    if probe.kind == "dns":
        answer = result["answer"]
        detail = "".join(f"PROXY{port}|" for port in prefixes) + answer
        if prefixes:
            return Observed(prefixes[0], detail)
        if answer == STUB_ANSWER:
            return Observed(15053, detail)
        if answer == UPSTREAM_ANSWER[probe.host]:
            return Observed(None, detail)
        return Observed(None, detail, f"answered {answer}, neither the stub nor {probe.host}'s server")
    response: str = result["response"]
    detail = "".join(f"PROXY{port}|" for port in prefixes) + response
    if prefixes:
        return Observed(prefixes[0], detail)
    answerer = response.split(":", 1)[0]
    if answerer != owner[probe.host]:
        return Observed(None, detail, f"answered by {answerer!r}, not by {owner[probe.host]!r}")
    return Observed(None, detail)


def send(lab: Lab, probes: Sequence[Probe]) -> list[dict[str, Any]]:
    """Every probe sent for real: one batch process per (namespace, uid, gid); results in probe order."""
    groups: dict[tuple[str, int, int], list[int]] = defaultdict(list)
    for number, probe in enumerate(probes):
        groups[(probe.origin, probe.uid, probe.gid)].append(number)
    namespaces = {"pod": lab.pod, "peer": lab.peer, "peer2": lab.peer2}
    results: list[dict[str, Any]] = [{}] * len(probes)
    for batch, ((origin, uid, gid), numbers) in enumerate(sorted(groups.items())):
        path = lab.tmp / f"batch-{batch}.json"
        path.write_text(json.dumps([probes[number].request(number) for number in numbers]))
        path.chmod(0o644)
        argv = [sys.executable, "-m", "tests.kernel.actors", "batch", str(path), "--timeout", str(PROBE_TIMEOUT)]
        done = lab.run(namespaces[origin], argv, uid=uid, gid=gid, timeout=BATCH_TIMEOUT)
        lines = done.stdout.splitlines()
        if done.returncode != 0 or len(lines) != len(numbers):
            raise AssertionError(f"batch {origin} {uid}:{gid} exited {done.returncode}: {done.stderr}\n{done.stdout}")
        for number, line in zip(numbers, lines, strict=True):
            results[number] = json.loads(line)
    return results


# ---- the comparison --------------------------------------------------------------------------------------


@dataclass
class Tally:
    flows: int = 0
    ipv6: int = 0
    unobservable: int = 0
    captured: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    reports: list[str] = field(default_factory=list)


def live_tables(lab: Lab, variant: str) -> tuple[dict[Family, dict[Table, TableState]], Sequence[AddressSet | PortSet]]:
    """Each family's live tables, and the sets they look up."""
    if variant == "native":
        state = parse_ruleset(lab.sh(lab.pod, ["nft", "-j", "list", "ruleset"]))
        return {family: state.family_tables(family) for family in Family}, state.sets
    tools = ((Family.V4, "iptables"), (Family.V6, "ip6tables"))
    return {family: parse_tables(lab.sh(lab.pod, [f"{tool}-{variant}-save"])) for family, tool in tools}, ()


def check_config(variant: str, index: int, drawn: Drawn, probes: list[Probe], tally: Tally) -> None:
    plan: Plan = build_plan(config_of(drawn), HostFacts())
    with Lab() as lab:
        actors = [
            lab.echo(lab.peer, "peer", PORTS),
            lab.echo(lab.peer2, "peer2", PORTS),
            lab.echo(lab.pod, "app", PORTS, uid=APP_UID),
            lab.proxy(tproxy=drawn.tproxy),
            # The pod's DNS agent: localhost only, as the proxy's uid (its answers go through zone 2).
            lab.dns(lab.pod, "stub", 15053, STUB_ANSWER, uid=PROXY_UID, binds=("127.0.0.1", "::1")),
            lab.dns(lab.peer, "upstream", 53, UPSTREAM_ANSWER[PEER4]),
            lab.dns(lab.peer2, "upstream2", 53, UPSTREAM_ANSWER[PEER2_4]),
            lab.dns(lab.pod, "resolver", 53, UPSTREAM_ANSWER[RESOLVER], binds=(RESOLVER,)),
        ]
        for address, network in ELSEWHERE.items():
            lab.batch(lab.peer, f"route add {network} via {POD6 if ':' in address else POD4}")
            lab.batch(lab.pod, f"route add unreachable {network}")
        apply_capture(lab, drawn.args, variant, ipv6=drawn.ipv6)
        lab.wait_ready(*actors)
        live, sets = live_tables(lab, variant)
        results = send(lab, probes)
    for number, (probe, result) in enumerate(zip(probes, results, strict=True)):
        observed = observe(probe, result)
        flow = flow_of(probe, result.get("source"))
        walked = trace(live[flow.family], flow, sets=sets)
        left_out = variant == "native" and flow.family not in plan.families
        planned = walked if left_out else trace(plan, flow)
        # Native, a family left out: inbound is captured, but no ::6 on lo, so the proxy cannot relay it.
        relay_failed = left_out and observed.problem and walked.verdict.captured_by == 15006
        if relay_failed or (observed.silent and planned.verdict.captured_by is walked.verdict.captured_by is None):
            tally.unobservable += 1
            continue
        agree = (
            not observed.problem
            and planned.verdict.certain
            and walked.verdict.certain
            and observed.captured_by == planned.verdict.captured_by == walked.verdict.captured_by
        )
        if agree:
            tally.flows += 1
            tally.ipv6 += flow.family is Family.V6
            tally.captured[CAPTURE_PORTS.get(observed.captured_by or 0, "not captured")] += 1
        else:
            where = f"{variant}, config {index}, flow {number}"
            tally.reports.append(report(where, drawn, probe, observed, planned=planned, walked=walked))


def report(where: str, drawn: Drawn, probe: Probe, observed: Observed, *, planned: Trace, walked: Trace) -> str:
    if observed.problem:
        seen = f"unobservable: {observed.problem}"
    elif observed.silent:
        seen = "no answer (nobody but a capture would answer)"
    else:
        seen = f"captured by {observed.captured_by}" if observed.captured_by else "not captured"
    return "\n".join(
        [
            f"=== seed {SEED}, {where}: {probe.describe()}",
            f"flags:    istio-iptables {drawn.command()}",
            f"observed: {seen} ({observed.detail!r})",
            f"plan:     {planned.verdict.captured_by} (certain={planned.verdict.certain})",
            f"live:     {walked.verdict.captured_by} (certain={walked.verdict.certain})",
            "--- trace through the plan ---",
            render_trace_text(planned),
            "--- trace through the live rules ---",
            render_trace_text(walked),
        ]
    )


def test_tracer_agrees_with_the_kernel(variant: str, lab_unavailable: str | None) -> None:
    if lab_unavailable:
        pytest.skip(lab_unavailable)
    rng = random.Random(SEED)  # the same configurations and flows for every variant
    tally = Tally()
    started = time.monotonic()
    for index in range(CONFIGS):
        drawn = draw_config(rng, index)
        probes = draw_flows(rng, drawn, FLOWS_PER_CONFIG)
        check_config(variant, index, drawn, probes, tally)
        assert time.monotonic() - started < TIME_BUDGET, f"over {TIME_BUDGET}s after {index + 1} configurations"
    elapsed = time.monotonic() - started
    print(
        f"seed {SEED}, {variant}: {tally.flows} flows agree ({tally.ipv6} IPv6) in {elapsed:.1f}s: "
        f"{dict(tally.captured)}; {tally.unobservable} not counted (nobody could answer: sent elsewhere and not "
        "captured, or native IPv6 inbound with --no-ipv6)"
    )
    shown = "\n\n".join(tally.reports[:15])
    assert not tally.reports, f"{len(tally.reports)} disagreements (first 15 below)\n\n{shown}"
    assert tally.flows >= MIN_FLOWS, f"only {tally.flows} flows compared"
    assert tally.ipv6 >= MIN_FLOWS // 10, f"only {tally.ipv6} IPv6 flows compared"
    assert all(tally.captured[kind] for kind in (*CAPTURE_PORTS.values(), "not captured")), dict(tally.captured)


def test_observation_reads_the_answer() -> None:
    """Pure: who received a flow, from the batch actor's answer."""
    tcp = Probe("pod", *APP, "tcp", PEER4, 8080)
    assert observe(tcp, {"ok": True, "prefixes": [15001], "response": "peer:x"}).captured_by == 15001
    assert observe(tcp, {"ok": True, "prefixes": [], "response": "peer:x"}) == Observed(None, "peer:x")
    assert observe(tcp, {"ok": True, "prefixes": [], "response": "app:x"}).problem
    assert observe(tcp, {"ok": False, "error": "timeout"}).problem == "no answer"
    dns = Probe("pod", *APP, "dns", PEER2_4, 53, Proto.UDP)
    assert observe(dns, {"ok": True, "prefixes": [], "answer": STUB_ANSWER}).captured_by == 15053
    assert observe(dns, {"ok": True, "prefixes": [], "answer": UPSTREAM_ANSWER[PEER2_4]}).captured_by is None
    assert observe(dns, {"ok": True, "prefixes": [], "answer": UPSTREAM_ANSWER[PEER4]}).problem
    assert observe(dns, {"ok": True, "prefixes": [15001], "answer": "x"}).captured_by == 15001


def test_flows_carry_the_kernel_source_and_interface() -> None:
    """Pure: the traced flow has the route's interface and the socket's real source."""
    out = flow_of(Probe("pod", 1001, 1337, "tcp", PEER2_4, 9090), [POD4_B, 41234])
    assert (str(out.source), out.source_port, out.out_interface, out.uid, out.gid) == (
        POD4_B,
        41234,
        "eth1",
        1001,
        1337,
    )
    local = flow_of(Probe("pod", *PROXY, "tcp", "127.0.0.6", 8080), None)
    assert (str(local.source), local.out_interface) == ("127.0.0.6", "lo")
    inbound = flow_of(Probe("peer2", 0, 0, "tcp", POD6_B, 8080), [PEER2_6, 50000])
    assert (inbound.destination, inbound.in_interface) == (ip_address(POD6_B), "eth1")
    dns = flow_of(Probe("pod", *APP, "dns", PEER6, 53, Proto.UDP), [POD6, 5353])
    assert (dns.protocol, dns.family) == (Proto.UDP, Family.V6)


def test_drawn_configurations_are_valid_and_varied() -> None:
    """Pure: every drawn configuration loads, and the draws cover the modes, IPv6, DNS and port lists."""
    rng = random.Random(SEED)
    drawn = [draw_config(rng, index) for index in range(CONFIGS)]
    for each in drawn:
        config_of(each)
        draw_flows(rng, each, FLOWS_PER_CONFIG)
    assert {each.tproxy for each in drawn} == {True, False}
    assert {each.ipv6 for each in drawn} == {True, False}
    assert any("--redirect-dns" in each.args for each in drawn)
    assert netlab.VARIANTS[:2] == ("legacy", "nft")


# ---- the CLI's trace, for pods at addresses of their own -------------------------------------------------

# A pod whose addresses are none of the code's constants; its peer also holds those constants (so the pod
# reaches them through its default route) and an address -x excludes.
OWN_ADDRESSES = netlab.Addresses(
    "198.19.7.9",
    "198.19.7.20",
    "2001:db8:7::9",
    "2001:db8:7::20",
    peer_extra=("198.18.0.2", "198.18.0.1", "2001:db8::2", "2001:db8::1", "198.18.99.1", "2001:db8:99::1"),
)
# The pod and its peer with the default addresses swapped: the pod at 198.18.0.1, its peer at 198.18.0.2.
SWAPPED_ADDRESSES = netlab.Addresses(PEER4, POD4, PEER6, POD6, peer_extra=("198.18.99.1", "2001:db8:99::1"))
CLI_FLAGS = (
    *("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*"),
    *("-x", "198.18.99.0/24,2001:db8:99::/64", "-b", "*", "-d", "15090,15021,15020"),
)
CLI_PARALLEL = 4


def cli_probes(at: netlab.Addresses) -> list[tuple[Probe, int | None]]:
    """Flows whose fate hangs on which addresses are the pod's, each with the port that should receive it."""
    probes: list[tuple[Probe, int | None]] = []
    for pod, peer, loopback, excluded in (
        (at.pod4, at.peer4, "127.0.0.1", "198.18.99.1"),
        (at.pod6, at.peer6, "::1", "2001:db8:99::1"),
    ):
        others = [extra for extra in at.peer_extra if (":" in extra) == (":" in pod) and extra != excluded]
        probes += [
            (Probe("pod", *APP, "tcp", peer, 8080), 15001),
            (Probe("pod", *APP, "tcp", pod, 8080), None),
            (Probe("pod", *APP, "tcp", loopback, 8080), None),
            (Probe("pod", *APP, "tcp", excluded, 8080), None),
            (Probe("pod", *PROXY, "tcp", pod, 8080), 15006),
            (Probe("pod", *PROXY, "tcp", peer, 8080), None),
            *((Probe("pod", *APP, "tcp", other, 8080), 15001) for other in others),
            (Probe("peer", 0, 0, "tcp", pod, 8080), 15006),
            (Probe("peer", 0, 0, "tcp", pod, 15020), None),
        ]
    return probes


def cli_trace(lab: Lab, variant: str, flags: Sequence[str], probe: Probe, *, peer: str, how: str) -> dict[str, Any]:
    """The CLI's trace of ``probe`` as JSON: ``live`` (--live in the pod's namespace), ``namespace`` (the
    plan, with the pod read from its namespace) or ``pod-ip`` (the plan, the pod given by --pod-ip, run here
    without entering any namespace)."""
    if probe.inbound:
        what = ["trace", "inbound", "--port", str(probe.port), "--src", peer]
    else:
        destination = f"[{probe.host}]" if ":" in probe.host else probe.host
        what = ["trace", "outbound", "--dst", f"{destination}:{probe.port}", "--uid", str(probe.uid)]
        what += ["--gid", str(probe.gid)]
    backend = netlab.BACKEND_FLAGS[variant]
    if how == "pod-ip":
        at = lab.addresses
        result = run_cli(
            [*backend, *flags, "--ipv6", *what, "--pod-ip", at.pod4, "--pod-ip", at.pod6, "--format", "json"]
        )
        assert result.code == 0, result.stderr
        return dict(json.loads(result.stdout))
    argv = [str(netlab.ISTIO_IPTABLES), "--network-namespace", lab.pod, *backend, *flags, "--ipv6", *what]
    argv += ["--format", "json", *(["--live"] if how == "live" else [])]
    env = {**os.environ, "XTABLES_LOCKFILE": lab.env["XTABLES_LOCKFILE"]}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env, check=False)
    assert done.returncode == 0, f"{shlex.join(argv)}: {done.stderr}"
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize(
    ("addresses", "match_sets"),
    [(OWN_ADDRESSES, False), (OWN_ADDRESSES, True), (SWAPPED_ADDRESSES, False)],
    ids=["own-addresses", "own-addresses-sets", "swapped"],
)
def test_cli_trace_knows_the_pod(
    variant: str, match_sets: bool, addresses: netlab.Addresses, lab_unavailable: str | None
) -> None:
    """``trace``, ``trace --live`` and ``trace --pod-ip`` agree with real connections for a pod whose addresses
    are not the code's defaults, destinations equal to its own address and to its peers' included; with
    every rule interpreted (native nftables and set members too), so every verdict is certain."""
    if lab_unavailable:
        pytest.skip(lab_unavailable)
    flags = (*CLI_FLAGS, *(["--match-sets"] if match_sets else []))
    probes = cli_probes(addresses)
    owner = {
        **dict.fromkeys((addresses.peer4, addresses.peer6, *addresses.peer_extra), "peer"),
        **dict.fromkeys((addresses.pod4, addresses.pod6, "127.0.0.1", "::1"), "app"),
    }
    with Lab(addresses) as lab:
        actors = [lab.echo(lab.peer, "peer", PORTS), lab.echo(lab.pod, "app", PORTS, uid=APP_UID), lab.proxy()]
        apply_capture(lab, flags, variant, ipv6=True)
        lab.wait_ready(*actors)
        results = send(lab, [probe for probe, _ in probes])
        peer_of = {addresses.pod4: addresses.peer4, addresses.pod6: addresses.peer6}

        def traced_as(job: tuple[Probe, int | None, str]) -> dict[str, Any]:
            return cli_trace(lab, variant, flags, job[0], peer=peer_of.get(job[0].host, ""), how=job[2])

        jobs = [(probe, expected, how) for probe, expected in probes for how in ("live", "namespace")]
        with ThreadPoolExecutor(CLI_PARALLEL) as pool:
            traced = list(pool.map(traced_as, jobs))
        # --pod-ip runs in this process (it enters no namespace): one at a time, as it redirects stdout.
        jobs += [(probe, expected, "pod-ip") for probe, expected in probes]
        traced += [traced_as(job) for job in jobs[len(traced) :]]
        problems = []
        observed = {probe: observe(probe, result, owner) for (probe, _), result in zip(probes, results, strict=True)}
        for (probe, expected, how), document in zip(jobs, traced, strict=True):
            seen = observed[probe]
            verdict = document["verdict"]
            if seen.problem or seen.captured_by != expected:
                problems.append(f"{probe.describe()}: observed {seen} where {expected} was meant")
            elif verdict["captured_by"] != seen.captured_by or not verdict["certain"] or document["assumed"]:
                problems.append(f"{probe.describe()} ({how}): observed {seen.captured_by}, traced {document}")
        if problems:
            print(lab.report())
        assert not problems, "\n".join(dict.fromkeys(problems))
