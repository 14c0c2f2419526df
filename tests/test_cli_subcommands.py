"""The explaining subcommands on the plan (no system access): trace and graph, and their bad input."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli

INIT = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
INIT += ["-d", "15090,15021,15020", "--no-ipv6"]


@pytest.mark.parametrize(
    ("arguments", "verdict"),
    [
        (
            ["trace", "outbound", "--dst", "10.0.0.5:443"],
            "captured: outbound TCP to any destination (-i '*'); redirected to 15001 by ISTIO_REDIRECT",
        ),
        (["trace", "outbound", "--dst", "10.0.0.5:443", "--uid", "1337"], "not captured"),
        (["trace", "outbound", "--dst", "127.0.0.1:8080"], "not captured"),
        (
            ["trace", "inbound", "--port", "8080"],
            "captured: inbound port 8080 (-b '*'); redirected to 15006 by ISTIO_IN_REDIRECT",
        ),
        (["trace", "inbound", "--port", "15090"], "not captured"),
    ],
)
def test_trace_says_where_a_flow_goes(arguments: list[str], verdict: str) -> None:
    result = run_cli([*INIT, *arguments])
    assert result.code == 0, result.stderr
    assert result.stdout.splitlines()[2].startswith(f"verdict: {verdict}")


def test_trace_json_is_machine_readable() -> None:
    result = run_cli([*INIT, "trace", "outbound", "--dst", "10.0.0.5:443", "--format", "json"])
    document = json.loads(result.stdout)
    assert document["verdict"]["captured_by"] == 15001


def test_trace_of_dns_to_the_resolv_conf_server() -> None:
    dns = [*INIT, "--redirect-dns", "--dns-servers", "10.96.0.10"]
    result = run_cli([*dns, "trace", "outbound", "--dst", "10.96.0.10:53", "--proto", "udp"])
    assert result.code == 0, result.stderr
    assert "captured: DNS to 10.96.0.10, a DNS server of the pod" in result.stdout
    assert "redirected to 15053 by ISTIO_OUTPUT_DNS" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        (["trace", "sideways", "--dst", "10.0.0.5:443"], "sideways"),
        (["trace", "outbound"], "--dst"),
        (["trace", "outbound", "--dst", "10.0.0.5"], "--dst"),
        (["trace", "outbound", "--dst", "10.0.0.5:99999"], "--dst"),
        (["trace", "outbound", "--dst", "10.0.0.5:443", "--uid", "root"], "--uid"),
        (["trace", "outbound", "--dst", "10.0.0.5:443", "--proto", "sctp"], "--proto"),
        (["trace", "outbound", "--dst", "10.0.0.5:443", "--state", "OLD"], "--state"),
        (["trace", "inbound", "--port", "0"], "--port"),
        (["trace", "outbound", "--dst", "10.0.0.5:443", "--src", "2001:db8::2"], "--src: '2001:db8::2'"),
        (["trace", "outbound", "--dst", "[2001:db8::5]:443", "--src", "198.18.0.2"], "--src: '198.18.0.2'"),
        (["trace", "outbound", "--dst", "10.0.0.5:443", "--format", "yaml"], "--format"),
        (["graph", "--format", "png"], "--format"),
        (["graph", "--family", "ipv5"], "--family"),
        (["status", "--format", "xml"], "--format"),
    ],
)
def test_bad_subcommand_input_is_one_line_and_exit_2(arguments: list[str], needle: str) -> None:
    result = run_cli([*INIT, *arguments])
    assert result.code == 2, result
    assert len(result.stderr.splitlines()) == 1 and needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("fmt", ["mermaid", "dot"])
def test_graph_draws_the_plan(fmt: str) -> None:
    result = run_cli([*INIT, "graph", "--format", fmt])
    assert result.code == 0, result.stderr
    assert "REDIRECT :15001" in result.stdout and "REDIRECT :15006" in result.stdout
    assert result.stdout.startswith("flowchart" if fmt == "mermaid" else "digraph")


def test_trace_takes_the_pod_from_pod_ip() -> None:
    """A pod at 198.18.0.1 whose peer is 198.18.0.2 (the reverse of what is assumed when nothing is said)."""
    to_peer = run_cli([*INIT, "trace", "outbound", "--dst", "198.18.0.2:80", "--pod-ip", "198.18.0.1"])
    lines = to_peer.stdout.splitlines()
    assert lines[0].startswith("flow:    outbound tcp 198.18.0.1:40000 -> 198.18.0.2:80 uid 1000 gid 1000 out eth0")
    assert lines[1].startswith("verdict: captured: outbound TCP to any destination (-i '*')")
    to_itself = run_cli([*INIT, "trace", "outbound", "--dst", "198.18.0.1:80", "--pod-ip", "198.18.0.1"])
    assert "out lo" in to_itself.stdout.splitlines()[0]
    assert to_itself.stdout.splitlines()[1].startswith(
        "verdict: not captured: the app's traffic over loopback is never captured"
    )
    inbound = run_cli([*INIT, "trace", "inbound", "--port", "8080", "--pod-ip", "2001:db8:7::9", "--format", "json"])
    document = json.loads(inbound.stdout)
    assert (document["flow"]["destination"], document["assumed"]) == ("2001:db8:7::9", [])


def test_trace_takes_an_outbound_pod_from_src_and_otherwise_says_what_it_assumed() -> None:
    given = run_cli([*INIT, "trace", "outbound", "--dst", "198.19.7.9:80", "--src", "198.19.7.9"])
    assert "assumed:" not in given.stdout and "out lo" in given.stdout.splitlines()[0]
    assumed = run_cli([*INIT, "trace", "outbound", "--dst", "10.0.0.5:443"])
    assert assumed.stdout.splitlines()[1] == (
        "assumed: pod address 198.18.0.2 (give --pod-ip, or --live in its namespace); "
        "a destination equal to it is local, sent over lo"
    )


def test_trace_of_native_nftables_rules_is_in_nft_syntax() -> None:
    result = run_cli([*INIT, "--native-nftables", "trace", "outbound", "--dst", "10.0.0.5:443"])
    assert result.code == 0, result.stderr
    assert "  + 1  output: counter jump istio-output  [jump to ISTIO_OUTPUT]" in result.stdout
    assert "istio-output: oifname lo ip saddr 127.0.0.6/32 counter return  [no: oifname lo]" in result.stdout
    assert "-A " not in result.stdout


@pytest.mark.parametrize(
    "command",
    [["--dry-run"], ["graph"], ["trace", "inbound", "--port", "80"], ["status"], ["preflight"]],
    ids=["dry-run", "graph", "trace", "status", "preflight"],
)
def test_a_missing_network_namespace_is_bad_input(command: list[str]) -> None:
    result = run_cli([*INIT, "--network-namespace", "iitest-never-created", *command])
    assert result.code == 2
    assert result.stderr.strip() == (
        "istio-iptables: invalid value for --network-namespace: 'iitest-never-created': no such network namespace "
        "(/var/run/netns/iitest-never-created)"
    )
    assert result.stdout == ""


def test_pod_ip_must_be_an_address() -> None:
    result = run_cli([*INIT, "trace", "inbound", "--port", "80", "--pod-ip", "10.0.0.300"])
    assert result.code == 2 and "--pod-ip" in result.stderr and "10.0.0.300" in result.stderr
