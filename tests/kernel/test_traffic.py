"""Real traffic through real rules: who answers each connection once the capture is programmed.

Every test builds a fresh lab (netlab.py), programs the rules with ``apply_capture`` for one iptables variant,
starts the actors (actors.py) and checks exact responses: ``PROXY15001|`` / ``PROXY15006|`` mark a
connection the sidecar stand-in relayed, the echo's ``NAME:peer:local:port:data`` says who answered, to
which address, and from which source. The proxy's event log gives each captured connection's original
destination, so a capture to the wrong place, a loop, or a missing capture fails the test.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

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
    VARIANTS,
    Actor,
    Lab,
    apply_capture,
    missing_prerequisites,
)

pytestmark = pytest.mark.kernel


@pytest.fixture(params=[*VARIANTS, "libiptc"])
def variant(request: pytest.FixtureRequest) -> str:
    """Every backend, the python-iptables one (on legacy tables) included."""
    name: str = request.param
    reason = missing_prerequisites(name)
    if reason:
        pytest.skip(reason)
    return name


# The injected init container's flags (Istio's sidecar template), as a flag -> value table.
BASE = {
    "-p": "15001",
    "-z": "15006",
    "-u": "1337",
    "-m": "REDIRECT",
    "-i": "*",
    "-x": "",
    "-b": "*",
    "-d": "15090,15021,15020",
}
PEER_PORTS = (8080, 9090)
APP_PORTS = (8080, 8081, 8082, 15008, 15020)

STUB_ANSWER = "198.18.99.53"  # the pod's DNS agent stub on 15053
UPSTREAM_ANSWER = "198.18.99.1"  # the DNS server in peer
UPSTREAM2_ANSWER = "198.18.99.2"  # the DNS server in peer2


def flags(*extra: str, **override: str) -> list[str]:
    """BASE with some values replaced (``flags(i="198.18.0.0/24")`` sets -i) and extra flags appended."""
    table = dict(BASE)
    table.update({f"-{name}": value for name, value in override.items()})
    return [token for pair in table.items() for token in pair] + list(extra)


def reply(name: str, source: str, local: str, port: int, data: str) -> str:
    """What an echo server answers: ``NAME:<peer ip>:<local ip>:<local port>:<data>``."""
    return f"{name}:{source}:{local}:{port}:{data}"


def via(listener: int, response: str) -> str:
    return f"PROXY{listener}|{response}"


@dataclass
class Pod:
    lab: Lab
    proxy: Actor
    _seen: int = 0  # events already checked

    def events(self) -> list[dict[str, object]]:
        return self.lab.events(self.proxy)

    def single_event(self) -> dict[str, object]:
        """The one connection the proxy saw since the last call (and exactly one)."""
        events = self.events()[self._seen :]
        assert len(events) == 1, f"expected one proxied connection, got {events}"
        self._seen += 1
        return events[0]

    def no_new_event(self) -> None:
        events = self.events()[self._seen :]
        assert events == [], f"unexpected proxied connections: {events}"


def start(
    lab: Lab,
    args: Sequence[str] | None,
    variant: str,
    *,
    ipv6: bool = False,
    tproxy: bool = False,
    dns: bool = False,
) -> Pod:
    """Start the peers' echo servers, the app (uid 1000) and the proxy (uid 1337); program the rules
    for ``args`` (unless None) while they boot; wait (bounded) until all listen."""
    actors = [
        lab.echo(lab.peer, "peer", PEER_PORTS),
        lab.echo(lab.peer2, "peer2", PEER_PORTS),
        lab.echo(lab.pod, "app", APP_PORTS, uid=APP_UID),
        proxy := lab.proxy(tproxy=tproxy, transparent_ports=(53,) if dns else ()),
    ]
    if dns:
        actors += [
            # Istio's agent listens on localhost only; its answers then leave from 127.0.0.1/::1 and
            # conntrack translates them back to the server the app asked.
            lab.dns(lab.pod, "stub", 15053, STUB_ANSWER, uid=PROXY_UID, binds=("127.0.0.1", "::1")),
            lab.dns(lab.peer, "upstream", 53, UPSTREAM_ANSWER),
            lab.dns(lab.peer2, "upstream2", 53, UPSTREAM2_ANSWER),
        ]
    if args is not None:
        apply_capture(lab, args, variant, ipv6=ipv6)
    lab.wait_ready(*actors)
    return Pod(lab, proxy)


# --- outbound ---------------------------------------------------------------------------------------------


def test_outbound_goes_through_the_proxy(lab: Lab, variant: str) -> None:
    pod = start(lab, None, variant)
    # Control: before the rules, the app reaches the peer directly.
    assert lab.client(PEER4, 8080, data="before") == reply("peer", POD4, PEER4, 8080, "before")

    apply_capture(lab, flags(), variant)
    assert lab.client(PEER4, 8080, data="out") == via(15001, reply("peer", POD4, PEER4, 8080, "out"))
    event = pod.single_event()
    assert event["listener"] == 15001
    assert event["method"] == "SO_ORIGINAL_DST"
    assert event["original_dst"] == [PEER4, 8080]
    assert event["client"][0] == POD4  # type: ignore[index]
    assert event["upstream"] == "connected"
    # The proxy's upstream connection (uid 1337) went straight to the peer: one relay, no loop.
    assert event["upstream_local"][0] == POD4  # type: ignore[index]

    # Any destination is captured with -i '*', the second peer too.
    assert lab.client(PEER2_4, 9090, data="b") == via(15001, reply("peer2", POD4_B, PEER2_4, 9090, "b"))
    assert pod.single_event()["original_dst"] == [PEER2_4, 9090]

    # The proxy's own connections are not captured: by uid, and by gid (-g defaults to -u).
    assert lab.client(PEER4, 8080, data="p", uid=PROXY_UID) == reply("peer", POD4, PEER4, 8080, "p")
    assert lab.client(PEER4, 8080, data="g", uid=1001, gid=PROXY_UID) == reply("peer", POD4, PEER4, 8080, "g")
    # Nor is the app's traffic to 127.0.0.1.
    assert lab.client("127.0.0.1", 8080, data="lo") == reply("app", "127.0.0.1", "127.0.0.1", 8080, "lo")
    pod.no_new_event()


@pytest.mark.parametrize(
    ("override", "expect"),
    [
        pytest.param(
            {"x": "198.19.0.0/24"},
            [(PEER4, 8080, True), (PEER2_4, 8080, False), (PEER2_4, 9090, False)],
            id="exclude-cidr",
        ),
        pytest.param(
            {"o": "9090"},
            [(PEER4, 8080, True), (PEER4, 9090, False), (PEER2_4, 9090, False), (PEER2_4, 8080, True)],
            id="exclude-port",
        ),
        pytest.param(
            {"i": "198.18.0.0/24"},
            [(PEER4, 8080, True), (PEER4, 9090, True), (PEER2_4, 8080, False)],
            id="include-cidr",
        ),
        pytest.param(
            {"i": "", "q": "9090"},
            [(PEER4, 9090, True), (PEER2_4, 9090, True), (PEER4, 8080, False), (PEER2_4, 8080, False)],
            id="include-port-only",
        ),
        pytest.param(
            {"i": "198.18.0.0/15", "x": "198.18.0.1/32"},
            [(PEER4, 8080, False), (PEER2_4, 8080, True)],
            id="exclude-beats-include",
        ),
    ],
)
def test_outbound_selection(
    lab: Lab, variant: str, override: dict[str, str], expect: list[tuple[str, int, bool]]
) -> None:
    pod = start(lab, flags(**override), variant)
    for host, port, captured in expect:
        name, source = ("peer", POD4) if host == PEER4 else ("peer2", POD4_B)
        direct = reply(name, source, host, port, "sel")
        got = lab.client(host, port, data="sel")
        if captured:
            assert got == via(15001, direct), f"{host}:{port} should go through the proxy"
            assert pod.single_event()["original_dst"] == [host, port]
        else:
            assert got == direct, f"{host}:{port} should not be captured"
            pod.no_new_event()


# --- inbound ----------------------------------------------------------------------------------------------


def test_inbound_goes_through_the_proxy(lab: Lab, variant: str) -> None:
    pod = start(lab, flags(), variant)
    got = lab.client(POD4, 8080, data="in", ns=lab.peer, uid=0)
    # The app sees the proxy's inbound passthrough source, 127.0.0.6.
    assert got == via(15006, reply("app", "127.0.0.6", POD4, 8080, "in"))
    event = pod.single_event()
    assert event["listener"] == 15006
    assert event["client"][0] == PEER4  # type: ignore[index]
    assert event["original_dst"] == [POD4, 8080]
    assert event["upstream_local"][0] == "127.0.0.6"  # type: ignore[index]
    assert event["upstream"] == "connected"

    # -d ports and the tunnel port (15008) reach the app directly.
    for port in (15020, 15008):
        assert lab.client(POD4, port, data="d", ns=lab.peer, uid=0) == reply("app", PEER4, POD4, port, "d")
    pod.no_new_event()


def test_inbound_port_list(lab: Lab, variant: str) -> None:
    pod = start(lab, flags(b="8080,8081"), variant)
    for port in (8080, 8081):
        got = lab.client(POD4, port, data="b", ns=lab.peer, uid=0)
        assert got == via(15006, reply("app", "127.0.0.6", POD4, port, "b"))
        assert pod.single_event()["original_dst"] == [POD4, port]
    # Not listed: direct (and -d is ignored when -b is a list, so 15020 is simply not listed).
    for port in (8082, 15020):
        assert lab.client(POD4, port, data="b", ns=lab.peer, uid=0) == reply("app", PEER4, POD4, port, "b")
    pod.no_new_event()


def test_no_inbound_capture_without_ports(lab: Lab, variant: str) -> None:
    pod = start(lab, flags(b=""), variant)
    assert lab.client(POD4, 8080, data="n", ns=lab.peer, uid=0) == reply("app", PEER4, POD4, 8080, "n")
    pod.no_new_event()


def test_pod_calls_itself(lab: Lab, variant: str) -> None:
    pod = start(lab, flags(), variant)
    # The proxy's own connection to the pod's address is sent to the inbound listener...
    got = lab.client(POD4, 8080, data="self", uid=PROXY_UID)
    assert got == via(15006, reply("app", "127.0.0.6", POD4, 8080, "self"))
    event = pod.single_event()
    assert event["listener"] == 15006
    assert event["client"][0] == POD4  # type: ignore[index]
    assert event["original_dst"] == [POD4, 8080]
    # ...and so is one to another local address that is not 127.0.0.1 (what Istio's validation relies on).
    got = lab.client("127.0.0.6", 8082, data="v", uid=PROXY_UID)
    assert got == via(15006, reply("app", "127.0.0.6", "127.0.0.6", 8082, "v"))
    assert pod.single_event()["original_dst"] == ["127.0.0.6", 8082]
    # The app's direct call to its own address is not captured at all.
    assert lab.client(POD4, 8080, data="self") == reply("app", POD4, POD4, 8080, "self")
    pod.no_new_event()


# --- TPROXY -----------------------------------------------------------------------------------------------


def test_tproxy_inbound(lab: Lab, variant: str) -> None:
    pod = start(lab, flags(m="TPROXY"), variant, tproxy=True)
    got = lab.client(POD4, 8080, data="tp", ns=lab.peer, uid=0)
    assert got == via(15006, reply("app", "127.0.0.6", POD4, 8080, "tp"))
    event = pod.single_event()
    assert event["method"] == "getsockname"  # no NAT: the socket's own address is the destination
    assert event["local"] == [POD4, 8080]
    assert event["client"][0] == PEER4  # type: ignore[index]
    assert event["original_dst"] == [POD4, 8080]
    assert event["upstream"] == "connected"

    # -d ports reach the app directly.
    assert lab.client(POD4, 15020, data="d", ns=lab.peer, uid=0) == reply("app", PEER4, POD4, 15020, "d")
    pod.no_new_event()
    # Istio's quirk (reference 3.9): the tunnel port's RETURN is only in nat ISTIO_INBOUND, which TPROXY
    # mode never reaches, so 15008 is captured like any other port.
    got = lab.client(POD4, 15008, data="t", ns=lab.peer, uid=0)
    assert got == via(15006, reply("app", "127.0.0.6", POD4, 15008, "t"))
    assert pod.single_event()["original_dst"] == [POD4, 15008]

    # A destination that is not the pod's: only the fwmark rule and the local route of table 133 deliver
    # it to the transparent listener. The pod's own (main table) route for it is "unreachable", so the
    # proxy's upstream attempt fails at once, and so would the delivery if the fwmark rule were missing.
    lab.batch(lab.peer, f"route add 198.18.77.0/24 via {POD4}")
    lab.batch(lab.pod, "route add unreachable 198.18.77.0/24")
    got = lab.client("198.18.77.7", 8080, data="nl", ns=lab.peer, uid=0)
    assert got.startswith("PROXY15006|ERROR:"), got
    event = pod.single_event()
    assert event["original_dst"] == ["198.18.77.7", 8080]
    assert event["client"][0] == PEER4  # type: ignore[index]

    # Outbound and the pod-to-itself path still go through nat REDIRECT in TPROXY mode.
    assert lab.client(PEER4, 8080, data="o") == via(15001, reply("peer", POD4, PEER4, 8080, "o"))
    assert pod.single_event()["original_dst"] == [PEER4, 8080]
    got = lab.client(POD4, 8081, data="s", uid=PROXY_UID)
    assert got == via(15006, reply("app", "127.0.0.6", POD4, 8081, "s"))
    event = pod.single_event()
    assert (event["method"], event["original_dst"]) == ("SO_ORIGINAL_DST", [POD4, 8081])
    assert lab.client(POD4, 8080, data="a") == reply("app", POD4, POD4, 8080, "a")
    pod.no_new_event()


# --- DNS --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["dns-servers", "resolv-conf"])
def test_dns_to_listed_server_goes_to_the_stub(lab: Lab, variant: str, source: str) -> None:
    if source == "dns-servers":
        extra = ["--redirect-dns", "--dns-servers", PEER4]
    else:
        resolv = Path(lab.tmp, "resolv.conf")
        resolv.write_text(f"search example.test\nnameserver {PEER4}\noptions ndots:5\n")
        extra = ["--redirect-dns", "--resolv-conf", str(resolv)]
    pod = start(lab, flags(*extra), variant, dns=True)
    for tcp in (False, True):
        assert lab.dnsquery(PEER4, tcp=tcp) == STUB_ANSWER, f"app, tcp={tcp}"
        # The agent's own queries (uid 1337) reach the real server.
        assert lab.dnsquery(PEER4, tcp=tcp, uid=PROXY_UID) == UPSTREAM_ANSWER, f"proxy, tcp={tcp}"
    pod.no_new_event()  # the stub answered; the proxy relayed nothing

    # The DNS forms of the loopback rules still let the app call itself and 127.0.0.1 directly.
    assert lab.client(POD4, 8080, data="a") == reply("app", POD4, POD4, 8080, "a")
    assert lab.client("127.0.0.1", 8080, data="l") == reply("app", "127.0.0.1", "127.0.0.1", 8080, "l")
    pod.no_new_event()

    # A server that is not listed: UDP goes straight there, TCP/53 is ordinary outbound TCP (Envoy relays).
    assert lab.dnsquery(PEER2_4) == UPSTREAM2_ANSWER
    pod.no_new_event()
    assert lab.dnsquery(PEER2_4, tcp=True) == UPSTREAM2_ANSWER
    assert pod.single_event()["original_dst"] == [PEER2_4, 53]


def test_dns_to_a_resolver_on_loopback(lab: Lab, variant: str) -> None:
    """nameserver 127.0.0.53 (a node-local resolver): the app's TCP/53 over lo is not let through by the
    loopback RETURN (its DNS form excludes port 53), so both UDP and TCP reach the stub; the proxy's own
    queries reach the resolver (the multiport form keeps 53 out of the inbound redirect)."""
    resolver = lab.dns(lab.pod, "resolver", 53, "198.18.99.127", binds=("127.0.0.53",))
    pod = start(lab, flags("--redirect-dns", "--dns-servers", "127.0.0.53"), variant, dns=True)
    lab.wait_ready(resolver)
    for tcp in (False, True):
        assert lab.dnsquery("127.0.0.53", tcp=tcp) == STUB_ANSWER, f"app, tcp={tcp}"
        assert lab.dnsquery("127.0.0.53", tcp=tcp, uid=PROXY_UID) == "198.18.99.127", f"proxy, tcp={tcp}"
    assert lab.dnsquery(PEER4) == UPSTREAM_ANSWER  # not a listed server
    pod.no_new_event()


def test_dns_capture_all(lab: Lab, variant: str) -> None:
    pod = start(lab, flags("--redirect-dns", "--capture-all-dns", "--dns-servers", PEER4), variant, dns=True)
    for server in (PEER4, PEER2_4):
        for tcp in (False, True):
            assert lab.dnsquery(server, tcp=tcp) == STUB_ANSWER, f"app to {server}, tcp={tcp}"
    for server, answer in ((PEER4, UPSTREAM_ANSWER), (PEER2_4, UPSTREAM2_ANSWER)):
        for tcp in (False, True):
            assert lab.dnsquery(server, tcp=tcp, uid=PROXY_UID) == answer, f"proxy to {server}, tcp={tcp}"
    pod.no_new_event()


def test_dns_ipv6_server(lab: Lab, variant: str) -> None:
    pod = start(lab, flags("--redirect-dns", "--dns-servers", PEER6), variant, ipv6=True, dns=True)
    for tcp in (False, True):
        assert lab.dnsquery(PEER6, tcp=tcp) == STUB_ANSWER, f"app, tcp={tcp}"
        assert lab.dnsquery(PEER6, tcp=tcp, uid=PROXY_UID) == UPSTREAM_ANSWER, f"proxy, tcp={tcp}"
    # No IPv4 server was given: IPv4 UDP DNS is not redirected.
    assert lab.dnsquery(PEER4) == UPSTREAM_ANSWER
    pod.no_new_event()


# --- IPv6 and dual stack ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_ipv6(lab: Lab, variant: str, mode: str) -> None:
    pod = start(lab, flags(m=mode), variant, ipv6=True, tproxy=mode == "TPROXY")
    assert lab.client(PEER6, 8080, data="o6") == via(15001, reply("peer", POD6, PEER6, 8080, "o6"))
    event = pod.single_event()
    assert (event["listener"], event["original_dst"]) == (15001, [PEER6, 8080])
    assert event["client"][0] == POD6  # type: ignore[index]

    got = lab.client(POD6, 8080, data="i6", ns=lab.peer, uid=0)
    assert got == via(15006, reply("app", "::6", POD6, 8080, "i6"))
    event = pod.single_event()
    assert (event["listener"], event["original_dst"]) == (15006, [POD6, 8080])
    assert event["client"][0] == PEER6  # type: ignore[index]
    assert event["upstream_local"][0] == "::6"  # type: ignore[index]
    assert event["method"] == ("getsockname" if mode == "TPROXY" else "SO_ORIGINAL_DST")

    got = lab.client(POD6, 8080, data="s6", uid=PROXY_UID)
    assert got == via(15006, reply("app", "::6", POD6, 8080, "s6"))
    assert pod.single_event()["original_dst"] == [POD6, 8080]

    assert lab.client(POD6, 15020, data="d", ns=lab.peer, uid=0) == reply("app", PEER6, POD6, 15020, "d")
    if mode == "TPROXY":
        # Not the pod's address: delivered to the transparent listener by the IPv6 fwmark rule and route.
        lab.batch(lab.peer, f"route add 2001:db8:77::/64 via {POD6}")
        lab.batch(lab.pod, "route add unreachable 2001:db8:77::/64")
        got = lab.client("2001:db8:77::7", 8080, data="nl", ns=lab.peer, uid=0)
        assert got.startswith("PROXY15006|ERROR:"), got
        event = pod.single_event()
        assert (event["original_dst"], event["client"][0]) == (["2001:db8:77::7", 8080], PEER6)  # type: ignore[index]
    assert lab.client("::1", 8080, data="lo") == reply("app", "::1", "::1", 8080, "lo")
    assert lab.client(POD6, 8080, data="a") == reply("app", POD6, POD6, 8080, "a")
    assert lab.client(PEER6, 8080, data="p", uid=PROXY_UID) == reply("peer", POD6, PEER6, 8080, "p")
    pod.no_new_event()


def test_dual_stack(lab: Lab, variant: str) -> None:
    pod = start(lab, flags(x="198.19.0.0/24,2001:db8:1::/64"), variant, ipv6=True)
    for peer, pod_address in ((PEER4, POD4), (PEER6, POD6)):
        got = lab.client(peer, 8080, data="o")
        assert got == via(15001, reply("peer", pod_address, peer, 8080, "o"))
        assert pod.single_event()["original_dst"] == [peer, 8080]
        got = lab.client(pod_address, 8080, data="i", ns=lab.peer, uid=0)
        passthrough = "::6" if ":" in pod_address else "127.0.0.6"
        assert got == via(15006, reply("app", passthrough, pod_address, 8080, "i"))
        assert pod.single_event()["original_dst"] == [pod_address, 8080]
    # Each family's exclusion applies to its own family.
    for peer, pod_address in ((PEER2_4, POD4_B), (PEER2_6, POD6_B)):
        assert lab.client(peer, 8080, data="x") == reply("peer2", pod_address, peer, 8080, "x")
    pod.no_new_event()


def test_ipv4_only_rules_leave_ipv6_alone(lab: Lab, variant: str) -> None:
    """--no-ipv6: IPv4 is captured, IPv6 is not (no ip6tables rules at all)."""
    if variant == "native":
        # Istio's nft form (reference 8) has one inet table for both families and adds only the v6-only
        # rules when IPv6 is on: with --no-ipv6 its address-free rules still capture IPv6.
        pytest.xfail("native nftables: Istio's inet tables capture IPv6 even with --no-ipv6")
    pod = start(lab, flags(), variant, ipv6=False)
    assert lab.client(PEER4, 8080, data="4") == via(15001, reply("peer", POD4, PEER4, 8080, "4"))
    assert pod.single_event()["original_dst"] == [PEER4, 8080]
    assert lab.client(PEER6, 8080, data="6") == reply("peer", POD6, PEER6, 8080, "6")
    assert lab.client(POD6, 8080, data="6", ns=lab.peer, uid=0) == reply("app", PEER6, POD6, 8080, "6")
    pod.no_new_event()


# ---- repair under load ---------------------------------------------------------------------------------


def test_reconcile_under_load_never_drops_or_bypasses(lab: Lab, variant: str) -> None:
    """Connections flow from the app to the peer while the rules are repaired again and again (a rule
    deleted by hand, a foreign rule added, the exclusions changed): every one is answered through the proxy."""
    peer = lab.echo(lab.peer, "peer", [8080])
    proxy = lab.proxy()
    lab.wait_ready(peer, proxy)
    apply_capture(lab, flags(), variant)
    stop = lab.tmp / "stop-loop"
    loop = lab.actor(lab.pod, "clientloop", PEER4, "8080", "--stop", str(stop), name="loop", uid=APP_UID)
    deadline = time.monotonic() + 60
    for round_ in range(8):
        drift_by_hand(lab, variant)
        exclusions = "15090,15021,15020" if round_ % 2 else f"15090,15021,15020,{9000 + round_}"
        apply_capture(lab, flags(d=exclusions), variant)
        assert time.monotonic() < deadline
    stop.touch()
    loop.popen.wait(timeout=30)
    summary = json.loads(loop.stdout.read_text())
    assert summary["total"] >= 20, summary
    assert summary["failed"] == 0 and summary["direct"] == 0, summary


def drift_by_hand(lab: Lab, variant: str) -> None:
    """A rule of ours deleted (nat ISTIO_INBOUND's RETURN for 15090) and a foreign one put first in our
    ISTIO_OUTPUT, with the tools of the variant."""
    if variant == "native":
        table = ["inet", "istio-proxy-nat"]
        listing = lab.sh(lab.pod, ["nft", "-a", "list", "chain", *table, "istio-inbound"])
        handle = re.search(r"tcp dport 15090 .*# handle (\d+)", listing)
        assert handle is not None, listing
        lab.sh(lab.pod, ["nft", "delete", "rule", *table, "istio-inbound", "handle", handle[1]])
        lab.sh(lab.pod, ["nft", "insert", "rule", *table, "istio-output", "udp", "dport", "9", "return"])
        return
    iptables = "iptables-legacy" if variant == "libiptc" else f"iptables-{variant}"
    lab.sh(lab.pod, [iptables, "-t", "nat", "-D", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15090", "-j", "RETURN"])
    lab.sh(lab.pod, [iptables, "-t", "nat", "-I", "ISTIO_OUTPUT", "1", "-p", "udp", "--dport", "9", "-j", "RETURN"])
