"""Flows walked through plans and through parsed iptables-save text, with verdicts from the reference
(section 3): the rule numbers below are kernel positions, after the ``-I`` inserts."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, ip_address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import (
    AddressSet,
    Connmark,
    ConntrackState,
    CtState,
    Destination,
    DestinationPort,
    DestinationPorts,
    Family,
    GidOwner,
    InInterface,
    Jump,
    Mark,
    OutInterface,
    Plan,
    Proto,
    Protocol,
    Redirect,
    Rule,
    RuleSet,
    Source,
    SourcePort,
    Table,
    UidOwner,
    Verdict,
)
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.explain.trace import (
    ASSUMED_POD,
    Direction,
    Flow,
    Location,
    Note,
    Outcome,
    Pod,
    Step,
    Trace,
    kernel_chains,
    parse_endpoint,
    trace,
)
from istio_iptables.explain.trace_output import render_trace_json, render_trace_text
from istio_iptables.records import replace
from istio_iptables.render.restore import render_restore
from istio_iptables.state import parse_tables
from tests.test_properties import configs_and_facts

# The injector's flags (reference 2.3 / 3.8): -p 15001 -z 15006 -u 1337 -i '*' -x "" -b '*' -d 15090,15021,15020
INJECTION: dict[str, Any] = {
    "proxy_port": 15001,
    "inbound_capture_port": 15006,
    "proxy_uids": (1337,),
    "service_cidrs": ALL,
    "service_exclude_cidrs": (),
    "inbound_ports": ALL,
    "local_exclude_ports": (15090, 15021, 15020),
    "ipv6": False,
}
DNS_SERVER = IPv4Address("10.96.0.10")
APP_TO_SERVICE = Flow.outbound("10.0.0.5", 443)
PROXY_TO_SERVICE = Flow.outbound("10.0.0.5", 443, uid=1337)


def plan_of(**overrides: Any) -> Plan:
    return build_plan(Config(**{**INJECTION, **overrides}), HostFacts())


REDIRECT_PLAN = plan_of()
TPROXY_PLAN = plan_of(mode=Mode.TPROXY)
DNS_PLAN = plan_of(redirect_dns=True, dns_servers=(DNS_SERVER,))


def at(table: str, chain: str, number: int, hook: str = "OUTPUT", looped_back: bool = False) -> Location:
    return Location(hook, looped_back, Table(table), chain, number)


def step_at(result: Trace, location: Location) -> Step:
    return next(step for step in result.steps if step.at == location)


# ---- the flow ------------------------------------------------------------------------------------------


def test_outbound_defaults() -> None:
    flow = Flow.outbound("10.0.0.5", 443)
    assert flow.direction is Direction.OUTBOUND
    assert (flow.source, flow.source_port) == (IPv4Address("198.18.0.2"), 40000)
    assert (flow.uid, flow.gid) == (1000, 1000)
    assert (flow.in_interface, flow.out_interface) == (None, "eth0")
    assert (flow.protocol, flow.mark, flow.connmark, flow.state) == (Proto.TCP, 0, 0, CtState.NEW)
    assert flow.family is Family.V4


def test_gid_follows_uid_unless_given() -> None:
    assert (Flow.outbound("10.0.0.5", 443, uid=1337).gid) == 1337
    assert (Flow.outbound("10.0.0.5", 443, uid=1337, gid=5).gid) == 5


@pytest.mark.parametrize(
    ("destination", "interface"),
    [
        ("127.0.0.1", "lo"),
        ("127.0.0.6", "lo"),
        ("127.1.2.3", "lo"),
        ("::1", "lo"),
        ("::6", "lo"),
        ("198.18.0.2", "lo"),  # the pod's own address
        ("2001:db8::2", "lo"),
        ("10.0.0.5", "eth0"),
        ("2001:db8::5", "eth0"),
    ],
)
def test_outbound_interface_is_lo_for_local_destinations(destination: str, interface: str) -> None:
    assert Flow.outbound(destination, 80).out_interface == interface


def test_outbound_to_the_given_source_goes_over_lo() -> None:
    assert Flow.outbound("198.18.5.5", 80, source="198.18.5.5").out_interface == "lo"
    assert Flow.outbound("10.0.0.5", 80, out_interface="eth1").out_interface == "eth1"


def test_inbound_defaults() -> None:
    flow = Flow.inbound(8080)
    assert (flow.source, flow.destination, flow.destination_port) == (
        IPv4Address("198.18.0.1"),
        IPv4Address("198.18.0.2"),
        8080,
    )
    assert (flow.in_interface, flow.out_interface, flow.uid, flow.gid) == ("eth0", None, None, None)
    six = Flow.inbound(8080, family=Family.V6)
    assert (six.source, six.destination) == (IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2"))
    assert Flow.inbound(53, source="2001:db8::53").destination == IPv6Address("2001:db8::2")


POD = Pod((IPv4Address("198.19.7.9"), IPv6Address("2001:db8:7::9")), "--pod-ip")


@pytest.mark.parametrize(
    ("destination", "interface"),
    [
        ("198.19.7.9", "lo"),  # the pod's own address
        ("2001:db8:7::9", "lo"),
        ("198.18.0.2", "eth0"),  # the address assumed when nothing is known: a peer here
        ("2001:db8::2", "eth0"),
        ("198.19.7.20", "eth0"),
        ("127.0.0.1", "lo"),
        ("::6", "lo"),
    ],
)
def test_a_given_pod_decides_what_is_local(destination: str, interface: str) -> None:
    flow = Flow.outbound(destination, 80, pod=POD)
    assert flow.out_interface == interface
    assert str(flow.source) == ("198.19.7.9" if flow.family is Family.V4 else "2001:db8:7::9")


def test_inbound_arrives_at_the_given_pod_from_a_peer_that_is_not_the_pod() -> None:
    six = Flow.inbound(8080, pod=Pod((IPv6Address("2001:db8:7::9"),), "--pod-ip"))
    assert (six.destination, six.source, six.in_interface) == (
        IPv6Address("2001:db8:7::9"),
        IPv6Address("2001:db8::1"),
        "eth0",
    )
    # A pod at the default peer's address gets another peer, never itself.
    swapped = Flow.inbound(8080, pod=Pod((IPv4Address("198.18.0.1"),), "--pod-ip"))
    assert (swapped.destination, swapped.source) == (IPv4Address("198.18.0.1"), IPv4Address("198.18.0.2"))
    named = Pod((IPv4Address("10.1.0.9"),), "the namespace", ((IPv4Address("10.1.0.9"), "net1"),))
    assert Flow.inbound(80, pod=named).in_interface == "net1"
    assert Flow.outbound("10.2.0.1", 80, pod=named).out_interface == "net1"


def test_the_assumption_is_said_only_for_what_is_not_known() -> None:
    assert "pod address 198.18.0.2" in ASSUMED_POD.assumption(Family.V4)
    assert "local" in ASSUMED_POD.assumption(Family.V4)
    v4_only = Pod((IPv4Address("198.19.7.9"),), "--pod-ip")
    assert v4_only.assumption(Family.V4) == ""
    assert "2001:db8::2" in v4_only.assumption(Family.V6)
    result = trace(REDIRECT_PLAN, APP_TO_SERVICE, assumed=("x",))
    assert result.assumed == ("x",)
    assert render_trace_text(result).splitlines()[1] == "assumed: x"


def test_rules_not_walked_make_the_verdict_uncertain() -> None:
    elsewhere = ("INPUT", "nft table inet fw, chain in (hook input): 2 rules")
    fw = ("OUTPUT", "nft table inet fw, chain out (hook output): 1 rules")
    result = trace(REDIRECT_PLAN, APP_TO_SERVICE, not_walked=(elsewhere, fw))
    assert not result.verdict.certain and result.verdict.captured_by == 15001
    assert result.verdict.text.startswith("uncertain: rules the packet meets were not walked")
    # Redirected, the packet comes back in over lo: it meets INPUT too.
    assert result.not_walked == (elsewhere[1], fw[1])
    # A packet that never passes INPUT (the proxy's, leaving on eth0) is certain whatever INPUT holds.
    unaffected = trace(REDIRECT_PLAN, Flow.outbound("10.0.0.5", 443, uid=1337), not_walked=(elsewhere,))
    assert unaffected.verdict.certain and unaffected.not_walked == ()
    assert "not walked: nft table inet fw" in render_trace_text(result)
    assert json.loads(render_trace_json(result))["not_walked"] == list(result.not_walked)


def test_flow_rejects_what_cannot_be() -> None:
    with pytest.raises(ValueError, match="different families"):
        Flow.outbound("10.0.0.5", 443, source="2001:db8::2")
    with pytest.raises(ValueError, match="no owner"):
        Flow(Direction.INBOUND, IPv4Address("1.1.1.1"), 1, IPv4Address("2.2.2.2"), 2, uid=5)
    with pytest.raises(ValueError, match="out interface"):
        Flow(Direction.INBOUND, IPv4Address("1.1.1.1"), 1, IPv4Address("2.2.2.2"), 2, out_interface="eth0")
    with pytest.raises(ValueError, match="in interface"):
        Flow(Direction.OUTBOUND, IPv4Address("1.1.1.1"), 1, IPv4Address("2.2.2.2"), 2, in_interface="eth0")
    with pytest.raises(ValueError, match="not a port"):
        Flow.outbound("10.0.0.5", 70000)
    with pytest.raises(ValueError, match="32-bit"):
        Flow.outbound("10.0.0.5", 1, mark=2**32)
    with pytest.raises(ValueError):
        Flow.outbound("10.0.0.5", 1, protocol="icmp")


def test_parse_endpoint() -> None:
    assert parse_endpoint("10.0.0.5:443") == (IPv4Address("10.0.0.5"), 443)
    assert parse_endpoint("[2001:db8::5]:53") == (IPv6Address("2001:db8::5"), 53)
    for bad in ("10.0.0.5", "2001:db8::5:53", "host:80", "10.0.0.5:99999", "[::1]"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


# ---- default injection, REDIRECT -------------------------------------------------------------------------


def test_app_to_a_service_is_redirected_to_15001() -> None:
    result = trace(REDIRECT_PLAN, APP_TO_SERVICE)
    verdict = result.verdict
    assert verdict.text == "captured: outbound TCP to any destination (-i '*'); redirected to 15001 by ISTIO_REDIRECT"
    assert (verdict.captured_by, verdict.capture, verdict.zone, verdict.mark) == (15001, "REDIRECT", None, 0)
    assert verdict.certain and not verdict.dropped
    assert verdict.decided_at == at("nat", "ISTIO_REDIRECT", 1)
    # Every ISTIO_OUTPUT rule was checked in order; the first failing clause is named.
    output = [step for step in result.steps if step.at.chain == "ISTIO_OUTPUT"]
    assert [step.at.number for step in output] == list(range(1, 10))
    assert [step.failed for step in output[:8]] == [
        "-o lo",
        "-o lo",
        "-o lo",
        "-m owner --uid-owner 1337",
        "-o lo",
        "-o lo",
        "-m owner --gid-owner 1337",
        "-d 127.0.0.1/32",
    ]
    assert output[8].outcome is Outcome.MATCHED and output[8].effect == "jump to ISTIO_REDIRECT"
    assert output[8].text == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"
    assert output[8].depth == 1


def test_redirected_packet_comes_back_over_lo_without_a_second_nat() -> None:
    result = trace(REDIRECT_PLAN, APP_TO_SERVICE)
    redirect = step_at(result, at("nat", "ISTIO_REDIRECT", 1))
    assert "10.0.0.5:443 -> 127.0.0.1:15001" in redirect.effect
    notes = [event for event in result.events if isinstance(event, Note) and event.looped_back]
    assert [note.text for note in notes] == [
        "nat PREROUTING skipped: the connection's destination NAT was already decided in nat OUTPUT"
    ]


def test_proxy_traffic_returns_at_its_uid_rule() -> None:
    verdict = trace(REDIRECT_PLAN, PROXY_TO_SERVICE).verdict
    assert (
        verdict.text
        == "not captured: the proxy's own traffic (uid 1337, -u) is never captured (nat ISTIO_OUTPUT rule 4)"
    )
    assert verdict.captured_by is None
    assert verdict.decided_at == at("nat", "ISTIO_OUTPUT", 4)


def test_a_process_in_the_proxy_group_returns_at_the_gid_rule() -> None:
    verdict = trace(REDIRECT_PLAN, Flow.outbound("10.0.0.5", 443, uid=1000, gid=1337)).verdict
    assert (
        verdict.text
        == "not captured: the proxy's own traffic (gid 1337, -g) is never captured (nat ISTIO_OUTPUT rule 7)"
    )


def test_app_to_localhost_is_not_captured() -> None:
    verdict = trace(REDIRECT_PLAN, Flow.outbound("127.0.0.1", 8080)).verdict
    assert verdict.text == "not captured: the app's traffic over loopback is never captured (nat ISTIO_OUTPUT rule 3)"


def test_loopback_destination_not_over_lo_returns_at_the_loopback_rule() -> None:
    flow = Flow.outbound("127.0.0.1", 8080, out_interface="eth0")
    verdict = trace(REDIRECT_PLAN, flow).verdict
    assert (
        verdict.text
        == "not captured: 127.0.0.1 is a loopback address (127.0.0.1/32): never captured (nat ISTIO_OUTPUT rule 8)"
    )


def test_proxy_to_its_own_pod_address_goes_to_the_inbound_listener() -> None:
    result = trace(REDIRECT_PLAN, Flow.outbound("198.18.0.2", 8080, uid=1337))
    assert result.verdict.text == (
        "captured: the proxy (uid 1337, -u) calling the pod's own address over lo goes to the inbound listener; "
        "redirected to 15006 by ISTIO_IN_REDIRECT"
    )
    assert result.verdict.captured_by == 15006
    assert step_at(result, at("nat", "ISTIO_OUTPUT", 2)).effect == "jump to ISTIO_IN_REDIRECT"


def test_proxy_to_its_own_tunnel_port_is_not_captured() -> None:
    verdict = trace(REDIRECT_PLAN, Flow.outbound("198.18.0.2", 15008, uid=1337)).verdict
    assert (
        verdict.text
        == "not captured: the proxy's own traffic (uid 1337, -u) is never captured (nat ISTIO_OUTPUT rule 4)"
    )


def test_app_to_its_own_pod_address_is_not_captured() -> None:
    verdict = trace(REDIRECT_PLAN, Flow.outbound("198.18.0.2", 8080)).verdict
    assert verdict.decided_at == at("nat", "ISTIO_OUTPUT", 3)


def test_inbound_passthrough_from_127_0_0_6_reaches_the_app() -> None:
    flow = Flow.outbound("198.18.0.2", 8080, uid=1337, source="127.0.0.6")
    assert flow.out_interface == "lo"
    verdict = trace(REDIRECT_PLAN, flow).verdict
    assert verdict.text == (
        "not captured: the proxy's inbound passthrough (from 127.0.0.6 over lo) reaches "
        "the app uncaptured (nat ISTIO_OUTPUT rule 1)"
    )


def test_inbound_to_an_app_port_goes_to_15006() -> None:
    result = trace(REDIRECT_PLAN, Flow.inbound(8080))
    assert result.verdict.text == "captured: inbound port 8080 (-b '*'); redirected to 15006 by ISTIO_IN_REDIRECT"
    assert result.verdict.decided_at == at("nat", "ISTIO_IN_REDIRECT", 1, hook="PREROUTING")
    assert [step.at.number for step in result.steps if step.at.chain == "ISTIO_INBOUND"] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(("port", "number"), [(15008, 1), (15090, 2), (15021, 3), (15020, 4)])
def test_inbound_to_excluded_ports_is_not_captured(port: int, number: int) -> None:
    verdict = trace(REDIRECT_PLAN, Flow.inbound(port)).verdict
    why = "is the HBONE tunnel port (-e), never captured inbound" if port == 15008 else "is excluded by -d"
    assert verdict.text == f"not captured: port {port} {why} (nat ISTIO_INBOUND rule {number})"
    assert verdict.decided_at == at("nat", "ISTIO_INBOUND", number, hook="PREROUTING")


def test_inbound_udp_is_not_captured() -> None:
    verdict = trace(REDIRECT_PLAN, Flow.inbound(5000, protocol="udp")).verdict
    assert verdict.text == "not captured: inbound UDP is never captured, only TCP"


def test_outbound_udp_is_not_captured_without_dns() -> None:
    verdict = trace(REDIRECT_PLAN, Flow.outbound("10.0.0.5", 5000, protocol="udp")).verdict
    assert verdict.text == "not captured: UDP is never captured, DNS aside (--redirect-dns)"


def test_established_packets_skip_nat() -> None:
    result = trace(REDIRECT_PLAN, replace(APP_TO_SERVICE, state=CtState.ESTABLISHED))
    assert result.verdict.text == (
        "not decided by this packet: nat sees only a connection's first packet; "
        "an ESTABLISHED one follows its connection's NAT"
    )
    assert result.verdict.captured_by is None
    assert not [step for step in result.steps if step.at.table is Table.NAT]


def test_invalid_packets_slip_past_nat_without_drop_invalid() -> None:
    verdict = trace(REDIRECT_PLAN, Flow.inbound(8080, state="INVALID")).verdict
    assert verdict.text.startswith("not captured: an INVALID packet has no conntrack entry")
    assert not verdict.dropped


def test_related_packets_go_through_nat() -> None:
    assert trace(REDIRECT_PLAN, Flow.inbound(8080, state="RELATED")).verdict.captured_by == 15006


def test_packet_without_a_socket_fails_owner_and_passes_negated_owner() -> None:
    to_service = replace(APP_TO_SERVICE, uid=None, gid=None)
    result = trace(REDIRECT_PLAN, to_service)
    assert result.verdict.captured_by == 15001
    assert step_at(result, at("nat", "ISTIO_OUTPUT", 4)).reason == "the packet has no socket"
    over_lo = replace(Flow.outbound("127.0.0.1", 8080), uid=None, gid=None)
    assert trace(REDIRECT_PLAN, over_lo).verdict.decided_at == at("nat", "ISTIO_OUTPUT", 3)
    assert "no socket" in over_lo.describe()


# ---- TPROXY ----------------------------------------------------------------------------------------------


def test_tproxy_inbound_is_marked_and_sent_to_15006() -> None:
    result = trace(TPROXY_PLAN, Flow.inbound(8080))
    verdict = result.verdict
    assert verdict.text == "captured: inbound port 8080 (-b '*'); TPROXY to 15006 with mark 1337 by ISTIO_TPROXY"
    assert (verdict.captured_by, verdict.capture, verdict.mark) == (15006, "TPROXY", 1337)
    assert verdict.decided_at == at("mangle", "ISTIO_TPROXY", 1, hook="PREROUTING")
    # TPROXY ends the mangle table: the CONNMARK --save-mark rule after the jump is not reached.
    assert not [step for step in result.steps if step.at == at("mangle", "PREROUTING", 2, hook="PREROUTING")]


def test_tproxy_inserts_come_first_in_the_kernel() -> None:
    verdict = trace(TPROXY_PLAN, Flow.inbound(15090)).verdict
    assert verdict.text == "not captured: port 15090 is excluded by -d (mangle ISTIO_INBOUND rule 4)"


def test_tproxy_does_not_exclude_the_tunnel_port() -> None:
    # Reference 3.9: the tunnel RETURN is in nat ISTIO_INBOUND, which PREROUTING never reaches in TPROXY mode.
    result = trace(TPROXY_PLAN, Flow.inbound(15008))
    assert result.verdict.captured_by == 15006
    assert not [step for step in result.steps if step.at.table is Table.NAT]


def test_tproxy_socket_wins_over_a_later_redirect() -> None:
    # Kube-virt in TPROXY mode (reference 3.3 steps 2, 7, 18): mangle PREROUTING's TPROXY hands the packet to
    # the 15006 listener, then nat PREROUTING's kube-virt REDIRECT rewrites its port to 15001. The kernel
    # keeps the socket TPROXY chose (the kernel test saw 15006 accept it, addressed to port 15001).
    plan = plan_of(mode=Mode.TPROXY, kube_virt_interfaces=("eth1",))
    result = trace(plan, Flow.inbound(8080, in_interface="eth1"))
    verdict = result.verdict
    assert (verdict.captured_by, verdict.capture, verdict.mark) == (15006, "TPROXY", 1337)
    assert verdict.decided_at == at("mangle", "ISTIO_TPROXY", 1, hook="PREROUTING")
    assert verdict.text == (
        "captured: inbound port 8080 (-b '*'); TPROXY to 15006 with mark 1337 by ISTIO_TPROXY; the REDIRECT by "
        "ISTIO_REDIRECT after it only rewrote the destination to port 15001, which the TPROXY socket sees as its own"
    )
    assert step_at(result, at("nat", "ISTIO_REDIRECT", 1, hook="PREROUTING")).outcome is Outcome.MATCHED
    # In REDIRECT mode the kube-virt REDIRECT alone decides.
    verdict = trace(plan_of(kube_virt_interfaces=("eth1",)), Flow.inbound(8080, in_interface="eth1")).verdict
    assert (verdict.captured_by, verdict.capture) == (15001, "REDIRECT")


def test_tproxy_established_packets_are_diverted() -> None:
    verdict = trace(TPROXY_PLAN, Flow.inbound(8080, state="ESTABLISHED")).verdict
    assert verdict.text == (
        "not decided by this packet: an ESTABLISHED packet, an inbound connection the proxy "
        "already holds (accepted by ISTIO_DIVERT with mark 1337)"
    )
    assert (verdict.captured_by, verdict.mark) == (None, 1337)
    assert verdict.decided_at == at("mangle", "ISTIO_DIVERT", 2, hook="PREROUTING")


def test_tproxy_proxy_to_own_address_is_marked_1338_and_redirected() -> None:
    result = trace(TPROXY_PLAN, Flow.outbound("198.18.0.2", 8080, uid=1337))
    assert result.verdict.text == (
        "captured: the proxy (uid 1337, -u) calling the pod's own address over lo goes to the inbound "
        "listener; redirected to 15006 by ISTIO_IN_REDIRECT; mark 1338"
    )
    assert step_at(result, at("mangle", "OUTPUT", 2)).effect == "mark 0 -> 1338"
    # Back in over lo, addressed to 127.0.0.1 by the REDIRECT, so ISTIO_TPROXY's ! -d 127.0.0.1/32 fails.
    tproxy = step_at(result, at("mangle", "ISTIO_TPROXY", 1, hook="PREROUTING", looped_back=True))
    assert tproxy.failed == "! -d 127.0.0.1/32"


def test_tproxy_proxy_to_own_tunnel_port_is_tproxied_when_it_comes_back_over_lo() -> None:
    result = trace(TPROXY_PLAN, Flow.outbound("198.18.0.2", 15008, uid=1337))
    assert (
        result.verdict.text == "captured: inbound port 15008 (-b '*'); TPROXY to 15006 with mark 1337 by ISTIO_TPROXY"
    )
    assert result.verdict.decided_at == at("mangle", "ISTIO_TPROXY", 1, hook="PREROUTING", looped_back=True)


def test_tproxy_app_to_own_address_returns_on_lo_without_mark_1338() -> None:
    result = trace(TPROXY_PLAN, Flow.outbound("198.18.0.2", 8080))
    assert result.verdict.decided_at == at("nat", "ISTIO_OUTPUT", 3)
    back = step_at(result, at("mangle", "ISTIO_INBOUND", 3, hook="PREROUTING", looped_back=True))
    assert back.outcome is Outcome.MATCHED and back.effect == "RETURN to PREROUTING"


def test_tproxy_passthrough_returns_at_the_127_0_0_6_insert() -> None:
    flow = Flow.outbound("198.18.0.2", 8080, uid=1337, source="127.0.0.6")
    result = trace(TPROXY_PLAN, flow)
    assert result.verdict.text == (
        "not captured: the proxy's inbound passthrough (from 127.0.0.6 over lo) reaches the app "
        "uncaptured (nat ISTIO_OUTPUT rule 1); mark 1338"
    )
    back = step_at(result, at("mangle", "ISTIO_INBOUND", 2, hook="PREROUTING", looped_back=True))
    assert back.outcome is Outcome.MATCHED


def test_tproxy_reply_restores_the_connection_mark() -> None:
    flow = Flow.outbound("198.18.0.1", 40000, uid=1337, connmark=1337, state="ESTABLISHED")
    verdict = trace(TPROXY_PLAN, flow).verdict
    assert (verdict.mark, verdict.connmark) == (1337, 1337)
    assert verdict.text.endswith("; mark 1337")


def test_tproxy_outbound_is_redirected_like_redirect_mode() -> None:
    assert (
        trace(TPROXY_PLAN, APP_TO_SERVICE).verdict.text
        == "captured: outbound TCP to any destination (-i '*'); redirected to 15001 by ISTIO_REDIRECT"
    )
    assert trace(TPROXY_PLAN, PROXY_TO_SERVICE).verdict.decided_at == at("nat", "ISTIO_OUTPUT", 4)


# ---- DNS -------------------------------------------------------------------------------------------------


def test_app_dns_query_to_the_server_goes_to_15053_in_zone_2() -> None:
    verdict = trace(DNS_PLAN, Flow.outbound(DNS_SERVER, 53, protocol="udp")).verdict
    assert verdict.text == (
        "captured: DNS to 10.96.0.10, a DNS server of the pod (resolv.conf, or --dns-servers); "
        "redirected to 15053 by ISTIO_OUTPUT_DNS; conntrack zone 2"
    )
    assert (verdict.captured_by, verdict.zone) == (15053, 2)
    assert verdict.decided_at == at("nat", "ISTIO_OUTPUT_DNS", 2)


def test_app_dns_over_tcp_goes_to_15053_without_a_zone() -> None:
    verdict = trace(DNS_PLAN, Flow.outbound(DNS_SERVER, 53)).verdict
    assert (verdict.captured_by, verdict.zone) == (15053, None)
    assert verdict.decided_at == at("nat", "ISTIO_OUTPUT_DNS", 1)


def test_proxy_dns_query_is_not_redirected_and_goes_to_zone_1() -> None:
    result = trace(DNS_PLAN, Flow.outbound(DNS_SERVER, 53, protocol="udp", uid=1337))
    verdict = result.verdict
    assert verdict.text == (
        "not captured: the proxy's own traffic (uid 1337, -u) is never captured (nat "
        "ISTIO_OUTPUT rule 4); conntrack zone 1"
    )
    assert (verdict.captured_by, verdict.zone) == (None, 1)
    # The first CT target wins; the later server rule (zone 2) finds a template already there.
    later = step_at(result, at("raw", "ISTIO_OUTPUT_DNS", 3))
    assert later.effect == "CT ignored: the packet already has zone 1"
    assert step_at(result, at("raw", "ISTIO_OUTPUT_DNS", 5)).effect == "CT ignored: the packet already has zone 1"


def test_dns_to_another_server_is_not_captured() -> None:
    verdict = trace(DNS_PLAN, Flow.outbound("8.8.8.8", 53, protocol="udp")).verdict
    assert verdict.text == (
        "not captured: UDP 53 to 8.8.8.8 is not a DNS server of the pod (resolv.conf, or --dns-servers; "
        "--capture-all-dns captures all)"
    )
    assert verdict.zone is None
    # TCP to another server is ordinary outbound TCP.
    assert trace(DNS_PLAN, Flow.outbound("8.8.8.8", 53)).verdict.captured_by == 15001


def test_app_dns_to_localhost_returns_at_the_loopback_rule() -> None:
    verdict = trace(DNS_PLAN, Flow.outbound("127.0.0.1", 53)).verdict
    assert (
        verdict.text
        == "not captured: 127.0.0.1 is a loopback address (127.0.0.1/32): never captured (nat ISTIO_OUTPUT rule 9)"
    )


def test_proxy_tcp_dns_to_own_address_is_not_sent_to_15006() -> None:
    result = trace(DNS_PLAN, Flow.outbound("198.18.0.2", 53, uid=1337))
    assert step_at(result, at("nat", "ISTIO_OUTPUT", 2)).failed == "-m multiport ! --dports 53,15008"
    assert result.verdict.decided_at == at("nat", "ISTIO_OUTPUT", 4)


def test_gid_loopback_rule_has_no_dns_form() -> None:
    # Reference 3.9: a process with the proxy's gid (not uid) sending TCP 53 to the pod address over lo is
    # sent to the inbound listener by the GID rule, which lacks the multiport 53 exclusion.
    flow = Flow.outbound("198.18.0.2", 53, uid=1000, gid=1337)
    result = trace(DNS_PLAN, flow)
    assert result.verdict.captured_by == 15006
    assert result.verdict.decided_at == at("nat", "ISTIO_IN_REDIRECT", 1)
    assert step_at(result, at("nat", "ISTIO_OUTPUT", 5)).effect == "jump to ISTIO_IN_REDIRECT"


def test_dns_answer_from_the_proxy_is_in_zone_2() -> None:
    answer = Flow.outbound("127.0.0.1", 40000, protocol="udp", uid=1337, source="127.0.0.1", state="ESTABLISHED")
    answer = replace(answer, source_port=15053)
    verdict = trace(DNS_PLAN, answer).verdict
    assert verdict.zone == 2
    assert verdict.text.startswith("not decided by this packet")


def test_upstream_dns_answer_is_in_zone_1() -> None:
    answer = Flow.inbound(40000, protocol="udp", source=DNS_SERVER, state="ESTABLISHED")
    answer = replace(answer, source_port=53)
    result = trace(DNS_PLAN, answer)
    assert result.verdict.zone == 1
    assert step_at(result, at("raw", "ISTIO_INBOUND", 1, hook="PREROUTING")).effect == "conntrack zone 1"


def test_capture_all_dns() -> None:
    plan = plan_of(redirect_dns=True, capture_all_dns=True)
    app = trace(plan, Flow.outbound("8.8.8.8", 53, protocol="udp")).verdict
    assert (app.captured_by, app.zone) == (15053, 2)
    proxy = trace(plan, Flow.outbound("8.8.8.8", 53, protocol="udp", uid=1337)).verdict
    assert (proxy.captured_by, proxy.zone) == (None, 1)
    answer = replace(Flow.inbound(40000, protocol="udp", source="8.8.8.8"), source_port=53)
    assert trace(plan, answer).verdict.zone == 1


def test_dns_in_tproxy_mode() -> None:
    plan = plan_of(mode=Mode.TPROXY, redirect_dns=True, dns_servers=(DNS_SERVER,))
    verdict = trace(plan, Flow.outbound(DNS_SERVER, 53, protocol="udp")).verdict
    assert (verdict.captured_by, verdict.zone) == (15053, 2)


# ---- CIDR and port lists, owner groups, interfaces -------------------------------------------------------


def test_excluded_cidr() -> None:
    plan = plan_of(service_exclude_cidrs=(IPv4Interface("10.0.0.0/8"),))
    verdict = trace(plan, Flow.outbound("10.1.2.3", 443)).verdict
    assert verdict.text == "not captured: 10.0.0.0/8 is excluded by -x (nat ISTIO_OUTPUT rule 9)"
    assert trace(plan, Flow.outbound("8.8.8.8", 443)).verdict.captured_by == 15001


def test_excluded_cidr_with_host_bits_matches_its_network() -> None:
    plan = plan_of(service_exclude_cidrs=(IPv4Interface("10.0.0.1/8"),))
    assert trace(plan, Flow.outbound("10.200.0.1", 443)).verdict.decided_at == at("nat", "ISTIO_OUTPUT", 9)


def test_included_cidrs_only() -> None:
    plan = plan_of(service_cidrs=(IPv4Interface("10.96.0.0/12"),))
    assert trace(plan, Flow.outbound("10.96.0.1", 443)).verdict.captured_by == 15001
    verdict = trace(plan, Flow.outbound("8.8.8.8", 443)).verdict
    assert verdict.text == "not captured: 8.8.8.8 is in none of the CIDRs of -i"


def test_no_include_cidrs_captures_nothing_outbound() -> None:
    plan = plan_of(service_cidrs=())
    assert trace(plan, APP_TO_SERVICE).verdict.captured_by is None


def test_excluded_outbound_ports_tcp_and_udp() -> None:
    plan = plan_of(local_outbound_ports_exclude=(5432,))
    verdict = trace(plan, Flow.outbound("10.0.0.5", 5432)).verdict
    assert verdict.text == "not captured: port 5432 is excluded by -o (nat ISTIO_OUTPUT rule 1)"
    udp = trace(plan, Flow.outbound("10.0.0.5", 5432, protocol="udp")).verdict
    assert udp.decided_at == at("nat", "ISTIO_OUTPUT", 2)


def test_included_outbound_ports_win_without_include_cidrs() -> None:
    plan = plan_of(service_cidrs=(), outbound_ports=(3306,))
    assert trace(plan, Flow.outbound("8.8.8.8", 3306)).verdict.captured_by == 15001
    assert trace(plan, Flow.outbound("8.8.8.8", 443)).verdict.captured_by is None


def test_excluded_cidr_wins_over_included_port() -> None:
    plan = plan_of(service_cidrs=(), outbound_ports=(3306,), service_exclude_cidrs=(IPv4Interface("10.0.0.0/8"),))
    assert trace(plan, Flow.outbound("10.0.0.5", 3306)).verdict.captured_by is None


def test_inbound_port_list() -> None:
    plan = plan_of(inbound_ports=(8080, 9090))
    assert trace(plan, Flow.inbound(9090)).verdict.captured_by == 15006
    verdict = trace(plan, Flow.inbound(15090)).verdict
    assert verdict.text == "not captured: inbound port 15090 is not listed in -b"


def test_no_inbound_ports_captures_nothing_inbound() -> None:
    verdict = trace(plan_of(inbound_ports=()), Flow.inbound(8080)).verdict
    assert verdict.text == "not captured: -b is empty, so no inbound port is captured"


def test_owner_group_include_by_name() -> None:
    plan = plan_of(owner_groups_include=("java",))
    in_group = trace(plan, APP_TO_SERVICE, groups={"java": 1000}).verdict
    assert in_group.captured_by == 15001 and in_group.certain
    other = trace(plan, APP_TO_SERVICE, groups={"java": 2000}).verdict
    assert other.text == "not captured: group 1000 is not in --outbound-owner-groups (java) (nat ISTIO_OUTPUT rule 8)"


def test_owner_group_name_without_an_id_is_uncertain() -> None:
    plan = plan_of(owner_groups_include=("java", 202))
    result = trace(plan, APP_TO_SERVICE)
    unknown = step_at(result, at("nat", "ISTIO_OUTPUT", 8))
    assert unknown.outcome is Outcome.UNKNOWN
    assert unknown.reason == "owner group 'java' is a name whose id is not known"
    verdict = result.verdict
    assert not verdict.certain
    assert verdict.uncertain_at == at("nat", "ISTIO_OUTPUT", 8)
    assert verdict.text == (
        "uncertain from nat ISTIO_OUTPUT rule 8 on, taken as not matching; "
        "then captured: outbound TCP to any destination (-i '*'); redirected to 15001 by ISTIO_REDIRECT"
    )
    # A clause that surely fails decides, whatever the unknown one would say.
    known = trace(plan, replace(APP_TO_SERVICE, gid=202))
    assert known.verdict.certain
    assert step_at(known, at("nat", "ISTIO_OUTPUT", 8)).failed == "-m owner ! --gid-owner 202"
    assert known.verdict.captured_by == 15001


def test_owner_group_with_failing_id_is_certain() -> None:
    plan = plan_of(owner_groups_include=(202,))
    assert trace(plan, replace(APP_TO_SERVICE, gid=202)).verdict.captured_by == 15001
    verdict = trace(plan, APP_TO_SERVICE).verdict
    assert verdict.text == "not captured: group 1000 is not in --outbound-owner-groups (202) (nat ISTIO_OUTPUT rule 8)"


def test_owner_group_exclude() -> None:
    plan = plan_of(owner_groups_exclude=(202,))
    assert trace(plan, replace(APP_TO_SERVICE, gid=202)).verdict.decided_at == at("nat", "ISTIO_OUTPUT", 8)
    assert trace(plan, APP_TO_SERVICE).verdict.captured_by == 15001


def test_empty_owner_group_include_turns_off_outbound_capture() -> None:
    verdict = trace(plan_of(owner_groups_include=()), APP_TO_SERVICE).verdict
    assert (
        verdict.text
        == "not captured: --outbound-owner-groups is empty: no outbound traffic is captured (nat ISTIO_OUTPUT rule 8)"
    )


def test_excluded_interface() -> None:
    plan = plan_of(exclude_interfaces=("eth2",))
    inbound = trace(plan, Flow.inbound(8080, in_interface="eth2")).verdict
    assert (
        inbound.text
        == "not captured: eth2 is excluded by -c: nothing in or out of it is captured (nat PREROUTING rule 1)"
    )
    outbound = trace(plan, Flow.outbound("10.0.0.5", 443, out_interface="eth2")).verdict
    assert (
        outbound.text == "not captured: eth2 is excluded by -c: nothing in or out of it is captured (nat OUTPUT rule 1)"
    )
    assert trace(plan, Flow.inbound(8080)).verdict.captured_by == 15006


def test_excluded_interface_in_tproxy_mode() -> None:
    plan = plan_of(mode=Mode.TPROXY, exclude_interfaces=("eth2",))
    verdict = trace(plan, Flow.inbound(8080, in_interface="eth2")).verdict
    assert verdict.captured_by is None
    assert verdict.decided_at == at("nat", "PREROUTING", 1, hook="PREROUTING")
    assert trace(plan, Flow.inbound(8080)).verdict.capture == "TPROXY"


def test_kube_virt_wildcard_sends_vm_traffic_to_15001() -> None:
    plan = plan_of(kube_virt_interfaces=("eth1",))
    result = trace(plan, Flow.inbound(443, in_interface="eth1", destination="8.8.8.8"))
    assert result.verdict.text == (
        "captured: traffic in from eth1, a KubeVirt interface (-k), goes to the outbound listener; "
        "redirected to 15001 by ISTIO_REDIRECT"
    )
    # The ISTIO_REDIRECT insert is above the RETURN insert (reference 3.9).
    first = step_at(result, at("nat", "PREROUTING", 1, hook="PREROUTING"))
    assert first.text == "-A PREROUTING -i eth1 -j ISTIO_REDIRECT"


def test_kube_virt_with_cidrs() -> None:
    plan = plan_of(kube_virt_interfaces=("eth1",), service_cidrs=(IPv4Interface("10.96.0.0/12"),))
    inside = trace(plan, Flow.inbound(443, in_interface="eth1", destination="10.96.0.5"))
    assert inside.verdict.captured_by == 15001
    outside = trace(plan, Flow.inbound(443, in_interface="eth1", destination="8.8.8.8")).verdict
    assert (
        outside.text
        == "not captured: eth1 is a KubeVirt interface (-k): not captured as inbound (nat PREROUTING rule 2)"
    )


def test_drop_invalid() -> None:
    plan = plan_of(drop_invalid=True)
    result = trace(plan, Flow.inbound(8080, state="INVALID"))
    assert result.verdict.text == "dropped by ISTIO_DROP"
    assert result.verdict.dropped and result.verdict.captured_by is None
    assert result.verdict.decided_at == at("mangle", "ISTIO_DROP", 1, hook="PREROUTING")
    assert not [step for step in result.steps if step.at.table is Table.NAT]
    assert trace(plan, Flow.inbound(8080)).verdict.captured_by == 15006


def test_drop_invalid_tproxy_ipv6() -> None:
    plan = plan_of(drop_invalid=True, mode=Mode.TPROXY, ipv6=True)
    assert trace(plan, Flow.inbound(8080, family=Family.V6, state="INVALID")).verdict.dropped
    assert trace(plan, Flow.inbound(8080, family=Family.V6)).verdict.capture == "TPROXY"


def test_ipv6() -> None:
    plan = plan_of(ipv6=True)
    assert trace(plan, Flow.outbound("2001:db8::5", 443)).verdict.captured_by == 15001
    assert trace(plan, Flow.outbound("::1", 8080)).verdict.decided_at == at("nat", "ISTIO_OUTPUT", 3)
    passthrough = Flow.outbound("2001:db8::2", 8080, uid=1337, source="::6")
    assert trace(plan, passthrough).verdict.text == (
        "not captured: the proxy's inbound passthrough (from 127.0.0.6 over lo) reaches "
        "the app uncaptured (nat ISTIO_OUTPUT rule 1)"
    )
    assert trace(plan, Flow.outbound("2001:db8::2", 8080, uid=1337)).verdict.captured_by == 15006
    assert trace(plan, Flow.inbound(8080, family=Family.V6)).verdict.captured_by == 15006
    assert trace(plan, Flow.inbound(15090, family=Family.V6)).verdict.captured_by is None
    assert trace(plan, APP_TO_SERVICE).verdict.captured_by == 15001


def test_plan_ruleset_and_rules_trace_alike() -> None:
    ruleset = TPROXY_PLAN.rulesets[0]
    expected = trace(TPROXY_PLAN, Flow.inbound(15090))
    assert trace(ruleset, Flow.inbound(15090)) == expected
    assert trace(list(ruleset.rules), Flow.inbound(15090)) == expected


def test_ipv6_flow_on_an_ipv4_only_plan() -> None:
    result = trace(REDIRECT_PLAN, Flow.outbound("2001:db8::5", 443))
    assert result.verdict.text == "not captured: the plan has no ipv6 rules (ipv6 capture is off)"
    assert result.events == ()


def test_ipv6_dns_server() -> None:
    server = ip_address("fd00:10:96::a")
    plan = plan_of(ipv6=True, redirect_dns=True, dns_servers=(DNS_SERVER, server))
    verdict = trace(plan, Flow.outbound(server, 53, protocol="udp")).verdict
    assert (verdict.captured_by, verdict.zone) == (15053, 2)


def test_custom_ports_and_mark() -> None:
    plan = plan_of(proxy_port=16001, inbound_capture_port=16006, mode=Mode.TPROXY, tproxy_mark=77)
    assert trace(plan, APP_TO_SERVICE).verdict.captured_by == 16001
    verdict = trace(plan, Flow.inbound(8080)).verdict
    assert (verdict.captured_by, verdict.mark) == (16006, 77)
    assert verdict.text == "captured: inbound port 8080 (-b '*'); TPROXY to 16006 with mark 77 by ISTIO_TPROXY"


# ---- live state: iptables-save text ----------------------------------------------------------------------

# The default injection with DNS and TPROXY as iptables-save prints it: its clause order, -m tcp/-m udp,
# hexadecimal marks, --set-xmark, CONNMARK masks, TPROXY --on-ip, REDIRECT --to-ports for UDP too.
UID_LOOP_REDIRECT = (
    "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m multiport ! --dports 53,15008 -m owner --uid-owner 1337 "
    "-j ISTIO_IN_REDIRECT"
)
SAVE = f"""\
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Jan  1 00:00:00 2026
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_OUTPUT_DNS - [0:0]
-A PREROUTING -j ISTIO_INBOUND
-A OUTPUT -j ISTIO_OUTPUT_DNS
-A ISTIO_INBOUND -s 10.96.0.10/32 -p udp -m udp --sport 53 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp -m udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2
-A ISTIO_OUTPUT_DNS -p udp -m udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1
-A ISTIO_OUTPUT_DNS -p udp -m udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2
-A ISTIO_OUTPUT_DNS -d 10.96.0.10/32 -p udp -m udp --dport 53 -j CT --zone 2
COMMIT
# Completed on Thu Jan  1 00:00:00 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Jan  1 00:00:00 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_DIVERT - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_TPROXY - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A OUTPUT -o lo -p tcp -m mark --mark 0x539 -j RETURN
-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff
-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff
-A OUTPUT -p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_DIVERT -j MARK --set-xmark 0x539/0xffffffff
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_INBOUND -p tcp -m mark --mark 0x539 -j RETURN
-A ISTIO_INBOUND -s 127.0.0.6/32 -i lo -p tcp -j RETURN
-A ISTIO_INBOUND -i lo -p tcp -m mark ! --mark 0x53a -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
COMMIT
# Completed on Thu Jan  1 00:00:00 2026
# Generated by iptables-save v1.8.9 (nf_tables) on Thu Jan  1 00:00:00 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_OUTPUT_DNS - [0:0]
:ISTIO_REDIRECT - [0:0]
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
{UID_LOOP_REDIRECT}
-A ISTIO_OUTPUT -o lo -p tcp -m tcp ! --dport 53 -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -p tcp -m tcp ! --dport 53 -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_OUTPUT_DNS -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_OUTPUT_DNS -d 10.96.0.10/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed on Thu Jan  1 00:00:00 2026
"""
SAVED_PLAN = plan_of(mode=Mode.TPROXY, redirect_dns=True, dns_servers=(DNS_SERVER,))

FLOWS = [
    APP_TO_SERVICE,
    PROXY_TO_SERVICE,
    Flow.outbound("127.0.0.1", 8080),
    Flow.outbound("198.18.0.2", 8080),
    Flow.outbound("198.18.0.2", 8080, uid=1337),
    Flow.outbound("198.18.0.2", 15008, uid=1337),
    Flow.outbound("198.18.0.2", 8080, uid=1337, source="127.0.0.6"),
    Flow.outbound(DNS_SERVER, 53, protocol="udp"),
    Flow.outbound(DNS_SERVER, 53, protocol="udp", uid=1337),
    Flow.outbound(DNS_SERVER, 53),
    Flow.outbound("8.8.8.8", 53, protocol="udp"),
    Flow.outbound("198.18.0.1", 40000, uid=1337, connmark=1337, state="ESTABLISHED"),
    Flow.inbound(8080),
    Flow.inbound(15090),
    Flow.inbound(15008),
    Flow.inbound(8080, state="ESTABLISHED"),
    replace(Flow.inbound(40000, protocol="udp", source=DNS_SERVER), source_port=53),
]


def test_save_is_fully_understood() -> None:
    tables = parse_tables(SAVE)
    assert all(state.unparsed == [] for state in tables.values())


@pytest.mark.parametrize("flow", FLOWS, ids=[flow.describe() for flow in FLOWS])
def test_live_save_and_plan_agree(flow: Flow) -> None:
    live = trace(parse_tables(SAVE), flow)
    planned = trace(SAVED_PLAN, flow)
    # The same verdict; its wording differs only where a save orders a rule's clauses its own way.
    assert replace(live.verdict, text="") == replace(planned.verdict, text="")
    assert live.verdict.text.split("(")[0] == planned.verdict.text.split("(")[0]
    assert [(step.at, step.outcome) for step in live.steps] == [(step.at, step.outcome) for step in planned.steps]


def test_live_trace_shows_the_save_spelling() -> None:
    result = trace(parse_tables(SAVE), Flow.inbound(8080))
    assert result.verdict.text == "captured: inbound port 8080 (-b '*'); TPROXY to 15006 with mark 1337 by ISTIO_TPROXY"
    texts = [step.text for step in result.steps]
    assert "-A ISTIO_INBOUND -i lo -p tcp -m mark ! --mark 0x53a -j RETURN" in texts
    assert texts[-1].endswith("--on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff")


def test_match_set_looks_up_the_plans_sets() -> None:
    plan = plan_of(
        match_sets=True,
        service_exclude_cidrs=(IPv4Interface("10.1.0.0/16"),),
        local_outbound_ports_exclude=(9090,),
    )
    excluded = trace(plan, Flow.outbound("10.1.2.3", 80)).verdict
    assert (
        excluded.text == "not captured: 10.1.2.3 is excluded by -x (set ISTIO_EXCLUDE_CIDR4) (nat ISTIO_OUTPUT rule 11)"
    )
    port = trace(plan, Flow.outbound("10.2.0.1", 9090, protocol="udp")).verdict
    assert port.decided_at == at("nat", "ISTIO_OUTPUT", 2)
    assert trace(plan, Flow.outbound("10.2.0.1", 80)).verdict.captured_by == 15001
    assert trace(plan, Flow.inbound(15090)).verdict.captured_by is None  # -d's set


def test_match_set_without_its_members_is_uncertain() -> None:
    save = SAVE.replace(
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n",
        "-A ISTIO_OUTPUT -m set --match-set no-mesh dst -j RETURN\n-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n",
    )
    result = trace(parse_tables(save), APP_TO_SERVICE)
    unknown = step_at(result, at("nat", "ISTIO_OUTPUT", 9))
    assert (unknown.outcome, unknown.reason) == (Outcome.UNKNOWN, "the members of set 'no-mesh' are not known")
    assert result.verdict.uncertain_at == at("nat", "ISTIO_OUTPUT", 9)
    known = AddressSet("no-mesh", Family.V4, (IPv4Interface("10.0.0.0/8"),))
    verdict = trace(parse_tables(save), APP_TO_SERVICE, sets=[known]).verdict
    assert verdict.certain and verdict.decided_at == at("nat", "ISTIO_OUTPUT", 9)


def test_unparsable_rule_on_the_path_makes_the_verdict_uncertain() -> None:
    save = SAVE.replace(
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n",
        "-A ISTIO_OUTPUT -m statistic --mode random --probability 0.5 -j RETURN\n"
        "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN\n",
    )
    result = trace(parse_tables(save), APP_TO_SERVICE)
    unknown = step_at(result, at("nat", "ISTIO_OUTPUT", 9))
    assert unknown.outcome is Outcome.UNKNOWN
    assert unknown.text == "-A ISTIO_OUTPUT -m statistic --mode random --probability 0.5 -j RETURN"
    assert unknown.reason == "a rule this model cannot express"
    verdict = result.verdict
    assert not verdict.certain and verdict.uncertain_at == at("nat", "ISTIO_OUTPUT", 9)
    assert verdict.text == (
        "uncertain from nat ISTIO_OUTPUT rule 9 on, taken as not matching; "
        "then captured: outbound TCP to any destination (-i '*'); redirected to 15001 by ISTIO_REDIRECT"
    )
    # The rules after it are still walked, numbered in the chain as the kernel holds it.
    assert step_at(result, at("nat", "ISTIO_OUTPUT", 11)).outcome is Outcome.MATCHED
    text = render_trace_text(result)
    assert "? 9  -A ISTIO_OUTPUT -m statistic --mode random --probability 0.5 -j RETURN  [could not interpret" in text
    assert json.loads(render_trace_json(result))["verdict"]["certain"] is False


def test_unparsable_rule_off_the_path_leaves_the_verdict_certain() -> None:
    save = SAVE.replace(
        "COMMIT\n", "-A POSTROUTING -o eth0 -j MASQUERADE\n-A FORWARD -m set --match-set x src\nCOMMIT\n"
    )
    tables = parse_tables(save)
    assert tables[Table.NAT].unparsed
    verdict = trace(tables, APP_TO_SERVICE).verdict
    assert verdict.certain
    assert verdict.captured_by == 15001


def test_foreign_dnat_before_our_jump_is_shown_and_uncertain() -> None:
    save = SAVE.replace(
        "-A OUTPUT -j ISTIO_OUTPUT\n",
        "-A OUTPUT -p tcp -j DNAT --to-destination 10.9.9.9:80\n-A OUTPUT -j ISTIO_OUTPUT\n",
    )
    result = trace(parse_tables(save), APP_TO_SERVICE)
    dnat = step_at(result, at("nat", "OUTPUT", 1))
    assert dnat.outcome is Outcome.UNKNOWN
    assert dnat.text == "-A OUTPUT -p tcp -j DNAT --to-destination 10.9.9.9:80"
    assert result.verdict.uncertain_at == at("nat", "OUTPUT", 1)
    assert result.verdict.text.startswith("uncertain from nat OUTPUT rule 1 on")


def test_policy_drop_and_guardrails() -> None:
    dropped = trace(parse_tables("*filter\n:OUTPUT DROP [0:0]\nCOMMIT\n"), APP_TO_SERVICE).verdict
    assert dropped.text == "dropped by the DROP policy of filter OUTPUT"
    assert dropped.dropped
    guarded = SAVE + "*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-I OUTPUT 1 -p tcp -j DROP\nCOMMIT\n"
    result = trace(parse_tables(guarded), APP_TO_SERVICE)
    # nat redirected the packet first; filter OUTPUT comes after nat and drops it.
    assert result.verdict.text == "dropped by filter OUTPUT rule 1"
    assert trace(parse_tables(guarded), Flow.inbound(8080)).verdict.capture == "TPROXY"


def test_restore_payload_inserts_are_put_in_place() -> None:
    ruleset = TPROXY_PLAN.rulesets[0]
    payload = render_restore(ruleset)
    assert "-I ISTIO_INBOUND 1 " in payload
    chains = kernel_chains(parse_tables(payload)[Table.MANGLE])
    assert [entry.text for entry in chains["ISTIO_INBOUND"][:4]] == [
        "-A ISTIO_INBOUND -p tcp -m mark --mark 1337 -j RETURN",
        "-A ISTIO_INBOUND -p tcp -s 127.0.0.6/32 -i lo -j RETURN",
        "-A ISTIO_INBOUND -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
    ]
    assert trace(parse_tables(payload), Flow.inbound(15090)) == trace(TPROXY_PLAN, Flow.inbound(15090))


def test_family_mismatch_never_matches() -> None:
    result = trace(parse_tables(SAVE), Flow.outbound("2001:db8::5", 443))
    step = step_at(result, at("nat", "ISTIO_OUTPUT", 9))
    assert step.failed == "-d 127.0.0.1/32"
    assert step.reason == "an IPv4 network never matches an IPv6 packet"
    negated = step_at(result, at("nat", "ISTIO_OUTPUT", 2))
    assert negated.failed == "! -d 127.0.0.1/32"
    assert negated.reason == step.reason


# ---- match semantics on hand-made rules -----------------------------------------------------------------


def rules(*made: Rule) -> RuleSet:
    return RuleSet(Family.V4, made)


def nat_output(*clauses: Any, target: Any = Verdict.RETURN) -> Rule:
    return Rule(Table.NAT, "OUTPUT", tuple(clauses), target)


@pytest.mark.parametrize(
    ("clause", "flow", "matched"),
    [
        (OutInterface("eth+"), Flow.outbound("10.0.0.5", 1), True),
        (OutInterface("eth+"), Flow.outbound("127.0.0.1", 1), False),
        (OutInterface("eth+", negated=True), Flow.outbound("127.0.0.1", 1), True),
        (OutInterface("+"), Flow.outbound("127.0.0.1", 1), True),
        (OutInterface("eth"), Flow.outbound("10.0.0.5", 1), False),
        (InInterface("lo"), Flow.outbound("10.0.0.5", 1), False),  # no in interface in OUTPUT
        (InInterface("lo", negated=True), Flow.outbound("10.0.0.5", 1), True),
        (Protocol(Proto.UDP, negated=True), Flow.outbound("10.0.0.5", 1), True),
        (Source(IPv4Interface("198.18.0.0/15")), Flow.outbound("10.0.0.5", 1), True),
        (Destination(IPv4Interface("10.0.0.0/8"), negated=True), Flow.outbound("10.0.0.5", 1), False),
        (DestinationPort(443), Flow.outbound("10.0.0.5", 443), True),
        (SourcePort(40000), Flow.outbound("10.0.0.5", 443), True),
        (SourcePort(40000, negated=True), Flow.outbound("10.0.0.5", 443), False),
        (DestinationPorts((80, 443)), Flow.outbound("10.0.0.5", 443), True),
        (DestinationPorts((80, 443), negated=True), Flow.outbound("10.0.0.5", 443), False),
        (UidOwner(1000), Flow.outbound("10.0.0.5", 1), True),
        (UidOwner(1000, negated=True), Flow.outbound("10.0.0.5", 1), False),
        (GidOwner(5), Flow.outbound("10.0.0.5", 1, gid=5), True),
        (Mark(1337), Flow.outbound("10.0.0.5", 1, mark=1337), True),
        (Mark(1337, negated=True), Flow.outbound("10.0.0.5", 1), True),
        (Connmark(7), Flow.outbound("10.0.0.5", 1, connmark=7), True),
        (Connmark(7, negated=True), Flow.outbound("10.0.0.5", 1, connmark=7), False),
        (ConntrackState((CtState.NEW,)), Flow.outbound("10.0.0.5", 1), True),
        (ConntrackState((CtState.RELATED, CtState.ESTABLISHED)), Flow.outbound("10.0.0.5", 1), False),
        (ConntrackState((CtState.INVALID,), negated=True), Flow.outbound("10.0.0.5", 1), True),
    ],
)
def test_clause_semantics(clause: Any, flow: Flow, matched: bool) -> None:
    result = trace(rules(nat_output(clause)), flow)
    assert result.steps[0].outcome is (Outcome.MATCHED if matched else Outcome.NOT_MATCHED)


@pytest.mark.parametrize("negated", [False, True])
def test_owner_never_matches_before_routing(negated: bool) -> None:
    rule = Rule(Table.MANGLE, "PREROUTING", (UidOwner(0, negated=negated),), Verdict.DROP)
    step = trace(rules(rule), Flow.inbound(80)).steps[0]
    assert step.outcome is Outcome.NOT_MATCHED
    assert step.reason == "no local socket before routing: the owner match works only in OUTPUT"


def test_return_from_a_builtin_chain_ends_the_table() -> None:
    made = rules(nat_output(target=Verdict.RETURN), nat_output(target=Redirect(1)))
    result = trace(made, APP_TO_SERVICE)
    assert len(result.steps) == 1
    assert result.steps[0].effect == "RETURN: end of nat OUTPUT"


def test_accept_ends_only_its_table() -> None:
    made = rules(
        Rule(Table.MANGLE, "OUTPUT", (), Verdict.ACCEPT),
        Rule(Table.MANGLE, "OUTPUT", (), Verdict.DROP),
        nat_output(target=Redirect(9)),
    )
    result = trace(made, APP_TO_SERVICE)
    assert result.verdict.captured_by == 9
    assert [step.at.table for step in result.steps] == [Table.MANGLE, Table.NAT]


def test_jump_loops_are_cut() -> None:
    made = rules(
        nat_output(target=Jump("A")),
        Rule(Table.NAT, "A", (), Jump("B")),
        Rule(Table.NAT, "B", (), Jump("A")),
    )
    result = trace(made, APP_TO_SERVICE)
    assert not result.verdict.certain
    assert any(isinstance(event, Note) and event.text.startswith("loop: A") for event in result.events)


def test_jump_to_a_missing_chain_falls_through() -> None:
    text = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j NOWHERE\n-A OUTPUT -p tcp -j REDIRECT --to-ports 7\nCOMMIT\n"
    result = trace(parse_tables(text), APP_TO_SERVICE)
    assert result.verdict.captured_by == 7
    assert any(isinstance(event, Note) and "NOWHERE does not exist" in event.text for event in result.events)


def test_tproxy_mask_keeps_other_bits() -> None:
    text = (
        "*mangle\n:PREROUTING ACCEPT [0:0]\n"
        "-A PREROUTING -p tcp -j TPROXY --on-port 15006 --tproxy-mark 0x1/0x1\nCOMMIT\n"
    )
    verdict = trace(parse_tables(text), Flow.inbound(80, mark=0x100)).verdict
    assert verdict.mark == 0x101


# ---- rendering -------------------------------------------------------------------------------------------


def test_text_rendering() -> None:
    text = render_trace_text(trace(REDIRECT_PLAN, APP_TO_SERVICE))
    lines = text.splitlines()
    assert lines[0] == "flow:    outbound tcp 198.18.0.2:40000 -> 10.0.0.5:443 uid 1000 gid 1000 out eth0 NEW (ipv4)"
    assert (
        lines[1] == "verdict: captured: outbound TCP to any destination (-i '*'); redirected to 15001 by ISTIO_REDIRECT"
    )
    assert "OUTPUT: nat" in lines
    assert "  + 1  -A OUTPUT -j ISTIO_OUTPUT  [jump to ISTIO_OUTPUT]" in lines
    assert "    - 1  -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN  [no: -o lo]" in lines
    assert "PREROUTING (back in over lo): nat" in lines
    assert text.endswith("\n")


def test_json_rendering() -> None:
    result = trace(DNS_PLAN, Flow.outbound(DNS_SERVER, 53, protocol="udp", uid=1337))
    document = json.loads(render_trace_json(result))
    assert document["flow"]["destination"] == "10.96.0.10"
    assert document["flow"]["protocol"] == "udp"
    assert document["family"] == "ipv4"
    verdict = document["verdict"]
    assert (verdict["captured_by"], verdict["zone"], verdict["dropped"], verdict["certain"]) == (None, 1, False, True)
    assert verdict["decided_at"] == {
        "hook": "OUTPUT",
        "looped_back": False,
        "table": "nat",
        "chain": "ISTIO_OUTPUT",
        "number": 4,
    }
    kinds = {event["kind"] for event in document["events"]}
    assert kinds == {"rule", "note"}
    first = document["events"][0]
    assert first["rule"] == "-A OUTPUT -j ISTIO_OUTPUT_DNS" and first["outcome"] == "matched"
    assert len(document["events"]) == len(result.events)


def test_empty_trace_renders() -> None:
    result = trace(REDIRECT_PLAN, Flow.inbound(80, family=Family.V6))
    assert render_trace_text(result).count("\n") == 2
    assert json.loads(render_trace_json(result))["events"] == []


# ---- plan and live evaluate identically ----------------------------------------------------------------

FLOW_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def flows_for(draw: st.DrawFn, plan: Plan) -> Flow:
    """A flow built from the values the plan's rules test, mixed with others, so that rules both match and
    fail."""
    family = draw(st.sampled_from(plan.families))
    ruleset = plan.ruleset(family)
    assert ruleset is not None
    addresses = {
        clause.network.ip
        for rule in ruleset.rules
        for clause in rule.clauses
        if isinstance(clause, Source | Destination)
    }
    addresses |= {ip_address("127.0.0.1"), ip_address("127.0.0.6"), ip_address("198.18.0.2"), ip_address("8.8.8.8")}
    addresses |= {ip_address("::1"), ip_address("::6"), ip_address("2001:db8::2"), ip_address("2001:4860::8888")}
    ports = {clause.port for rule in ruleset.rules for clause in rule.clauses if isinstance(clause, DestinationPort)}
    ports |= {53, 80, 443, 8080, 15001, 15006, 15008, 15053, 15090}
    ids = {
        value
        for rule in ruleset.rules
        for clause in rule.clauses
        if isinstance(clause, UidOwner | GidOwner)
        for value in [clause.uid if isinstance(clause, UidOwner) else clause.group]
        if isinstance(value, int)
    } | {0, 1000, 1337}
    interfaces = {
        clause.name
        for rule in ruleset.rules
        for clause in rule.clauses
        if isinstance(clause, InInterface | OutInterface)
    } | {"lo", "eth0"}
    marks = {0, 1337, 1338} | {
        clause.mark for rule in ruleset.rules for clause in rule.clauses if isinstance(clause, Mark)
    }
    same_family = sorted((a for a in addresses if a.version == family.value), key=str)
    address = st.sampled_from(same_family)
    port = st.one_of(st.sampled_from(sorted(ports)), st.integers(0, 65535))
    # Mostly the first packet of a TCP connection, which is what capture decides on.
    protocol = draw(st.one_of(st.just(Proto.TCP), st.sampled_from(Proto)))
    state = draw(st.one_of(st.just(CtState.NEW), st.sampled_from(CtState)))
    mark, connmark = draw(st.sampled_from(sorted(marks))), draw(st.sampled_from(sorted(marks)))
    if draw(st.booleans()):
        uid = draw(st.one_of(st.just(1000), st.none(), st.sampled_from(sorted(ids))))
        return Flow(
            Direction.OUTBOUND,
            draw(address),
            draw(port),
            draw(address),
            draw(port),
            protocol,
            uid=uid,
            gid=None if uid is None else draw(st.sampled_from(sorted(ids))),
            out_interface=draw(st.sampled_from(sorted(interfaces))),
            mark=mark,
            connmark=connmark,
            state=state,
        )
    return Flow(
        Direction.INBOUND,
        draw(address),
        draw(port),
        draw(address),
        draw(port),
        protocol,
        in_interface=draw(st.sampled_from(sorted(interfaces))),
        mark=mark,
        connmark=connmark,
        state=state,
    )


@FLOW_SETTINGS
@given(configs_and_facts(), st.data())
def test_plan_and_parsed_restore_trace_identically(case: Any, data: st.DataObject) -> None:
    plan = build_plan(*case)
    for _ in range(3):
        flow = data.draw(flows_for(plan))
        ruleset = plan.ruleset(flow.family)
        assert ruleset is not None
        planned = trace(plan, flow)
        live = trace(parse_tables(render_restore(ruleset)), flow)
        assert planned == live
        check_trace_invariants(plan, planned)


def check_trace_invariants(plan: Plan, result: Trace) -> None:
    config_ports = {
        rule.target.port
        for ruleset in plan.rulesets
        for rule in ruleset.rules
        if isinstance(rule.target, Redirect) or type(rule.target).__name__ == "Tproxy"
    }
    verdict = result.verdict
    assert verdict.captured_by is None or verdict.captured_by in config_ports
    assert (verdict.capture is None) == (verdict.captured_by is None)
    assert not (verdict.dropped and verdict.captured_by is not None)
    has_group_names = any(
        isinstance(clause, GidOwner) and isinstance(clause.group, str)
        for ruleset in plan.rulesets
        for rule in ruleset.rules
        for clause in rule.clauses
    )
    if not has_group_names:
        assert verdict.certain
    if verdict.decided_at is not None and verdict.decided_at.number:
        decided = step_at(result, verdict.decided_at)
        assert decided.outcome is Outcome.MATCHED
    for step in result.steps:
        assert step.at.number >= 1
        assert step.text.startswith(f"-A {step.at.chain}")
        if step.outcome is Outcome.NOT_MATCHED:
            assert step.failed
        if step.outcome is Outcome.MATCHED:
            assert step.effect
    if result.flow.direction is Direction.INBOUND:
        assert all(step.at.hook != "OUTPUT" for step in result.steps)


FALLBACKS = ("RETURN at ", "no rule of ", "no rule in ", "captured: redirected", "captured: DNS redirected")


@FLOW_SETTINGS
@given(configs_and_facts(), st.data())
def test_every_verdict_on_our_rules_names_its_cause(case: Any, data: st.DataObject) -> None:
    """Whatever the flags and the flow, a verdict reached through the plan's rules says why in the flags'
    words: no verdict falls back on a bare rule location (causes.py knows every shape plan.py writes)."""
    plan = build_plan(*case)
    for _ in range(3):
        result = trace(plan, data.draw(flows_for(plan)))
        text = result.verdict.text
        assert not any(fallback in text for fallback in FALLBACKS), render_trace_text(result)
        if result.verdict.captured_by is not None:
            assert "captured: " in text and ";" in text, text
