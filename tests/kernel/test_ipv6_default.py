"""A dual-stack pod applied with the injector's flags, which name neither --ipv6 nor --no-ipv6.

The lab's pod lists its IPv4 addresses first and has global IPv6 ones (2001:db8::2 on eth0, 2001:db8:1::2 on
eth1) plus link-local ones. Istio decides from the first address and programs IPv4 only, so the pod's IPv6
connections reach peers directly; here any usable IPv6 address turns IPv6 capture on, and the log says so.
An explicit ``--no-ipv6`` keeps IPv6 out, with one warning naming the addresses whose traffic escapes.
Real connections through the proxy stand-in decide, under iptables-legacy, iptables-nft and native nftables.
"""

from __future__ import annotations

import pytest

from tests.kernel.netlab import PEER4, PEER6, POD4, POD6, POD6_B, Lab, apply_capture
from tests.kernel.test_traffic import flags, reply, start, via

pytestmark = pytest.mark.kernel


def log_lines(stderr: str, level: str) -> list[str]:
    """The log lines of one level (Istio's format: time, tab, level, tab, message)."""
    return [line for line in stderr.splitlines() if line.split("\t")[1:2] == [level]]


def test_dual_stack_pod_gets_its_ipv6_captured_without_flags(lab: Lab, variant: str) -> None:
    pod = start(lab, None, variant)
    stderr = apply_capture(lab, flags(), variant, ipv6=None)

    # IPv6 both ways through the proxy, the app's connection out and a peer's connection in.
    assert lab.client(PEER6, 8080, data="o6") == via(15001, reply("peer", POD6, PEER6, 8080, "o6"))
    assert pod.single_event()["original_dst"] == [PEER6, 8080]
    got = lab.client(POD6, 8080, data="i6", ns=lab.peer, uid=0)
    assert got == via(15006, reply("app", "::6", POD6, 8080, "i6"))
    assert pod.single_event()["original_dst"] == [POD6, 8080]
    # IPv4 as before.
    assert lab.client(PEER4, 8080, data="o4") == via(15001, reply("peer", POD4, PEER4, 8080, "o4"))
    assert pod.single_event()["original_dst"] == [PEER4, 8080]
    pod.no_new_event()

    [info] = [line for line in log_lines(stderr, "info") if "IPv6 captured as well as IPv4" in line]
    assert POD6 in info and POD6_B in info and "fe80" not in info, info
    assert log_lines(stderr, "warn") == []


def test_no_ipv6_warns_once_naming_the_addresses_that_escape(lab: Lab, variant: str) -> None:
    pod = start(lab, None, variant)
    stderr = apply_capture(lab, flags(), variant, ipv6=False)

    [warning] = log_lines(stderr, "warn")
    assert "--no-ipv6" in warning and POD6 in warning and POD6_B in warning and "fe80" not in warning, warning
    assert not any("IPv6 captured" in line for line in stderr.splitlines())
    assert lab.client(PEER4, 8080, data="4") == via(15001, reply("peer", POD4, PEER4, 8080, "4"))
    assert pod.single_event()["original_dst"] == [PEER4, 8080]
    if variant != "native":  # Istio's inet tables capture IPv6 even with --no-ipv6 (docs/capture.md, native nftables)
        assert "escapes the proxy" in warning
        assert lab.client(PEER6, 8080, data="6") == reply("peer", POD6, PEER6, 8080, "6")
        pod.no_new_event()
