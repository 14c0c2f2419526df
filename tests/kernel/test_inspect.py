"""status, preflight, trace --live and --rule-comments against real namespaces (both iptables variants)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import run_cli as run_cli_in_process
from tests.kernel.namespaces import Pod, iptables_save, needs_root, normalized_save, run_cli

pytestmark = [pytest.mark.kernel, needs_root]

INIT = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
INIT += ["-d", "15090,15021,15020", "--no-ipv6"]


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_status_reports_sync_drift_and_foreign_rules(pod: Pod, variant: str) -> None:
    flags = [*INIT, "--force-iptables-binary", variant]
    fresh = run_cli(pod, [*flags, "status"])
    assert fresh.returncode == 1 and "missing  nat ISTIO_OUTPUT" in fresh.stdout
    assert run_cli(pod, flags).returncode == 0
    synced = run_cli(pod, [*flags, "status"])
    assert synced.returncode == 0, synced.stdout
    assert "ipv4 (iptables-" + variant + "): in sync" in synced.stdout

    binary = f"iptables-{variant}"
    pod.run([binary, "-t", "nat", "-D", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15021", "-j", "RETURN"])
    pod.run([binary, "-t", "nat", "-A", "PREROUTING", "-p", "udp", "--dport", "9", "-j", "RETURN"])
    drifted = run_cli(pod, [*flags, "status", "--format", "json"])
    assert drifted.returncode == 1
    report = json.loads(drifted.stdout)
    ipv4 = next(family for family in report["families"] if family["family"] == "ipv4")
    assert ipv4["missing"] == [
        {"table": "nat", "chain": "ISTIO_INBOUND", "rule": "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN"}
    ]
    assert ipv4["foreign"] == [
        {"table": "nat", "chain": "PREROUTING", "rule": "-A PREROUTING -p udp -m udp --dport 9 -j RETURN"}
    ]


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_trace_live_follows_the_rules_as_they_are(pod: Pod, variant: str) -> None:
    flags = [*INIT, "--force-iptables-binary", variant]
    assert run_cli(pod, flags).returncode == 0
    live = run_cli(pod, [*flags, "trace", "outbound", "--dst", "198.18.0.1:8080", "--live"])
    assert live.returncode == 0, live.stderr
    assert "redirected to 15001 by ISTIO_REDIRECT" in live.stdout
    pod.run([f"iptables-{variant}", "-t", "nat", "-D", "ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT"])
    broken = run_cli(pod, [*flags, "trace", "outbound", "--dst", "198.18.0.1:8080", "--live"])
    assert "verdict: not captured" in broken.stdout, broken.stdout
    planned = run_cli(pod, [*flags, "trace", "outbound", "--dst", "198.18.0.1:8080"])
    assert "redirected to 15001 by ISTIO_REDIRECT" in planned.stdout


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_preflight_names_the_variant_the_features_and_what_comes_first(pod: Pod, variant: str) -> None:
    pod.run([f"iptables-{variant}", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "RETURN"])
    before = iptables_save(pod, variant, 4)
    result = run_cli(pod, [*INIT, "-m", "TPROXY", "--redirect-dns", "--dns-servers", "198.18.0.1", "preflight"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ipv4: iptables-{variant} (it holds this namespace's rules)" in result.stdout
    for feature in ("table nat", "table mangle", "table raw", "match owner", "target TPROXY", "target CT"):
        assert f"ok      {feature}" in result.stdout
    assert "nat OUTPUT: -A OUTPUT -p udp -m udp --dport 9 -j RETURN" in result.stdout
    # The probes left nothing (but, perhaps, an empty table: legacy keeps a table once used).
    assert normalized_save(iptables_save(pod, variant, 4)) == normalized_save(before)


def test_preflight_fails_when_iptables_cannot_run(pod: Pod, tmp_path: Path) -> None:
    for name in ("ip",):
        (tmp_path / name).symlink_to(str(shutil.which(name)))
    result = run_cli(pod, [*INIT, "preflight", "--format", "json"], env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert json.loads(result.stdout)["ok"] is False


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_rule_comments_explain_the_save_and_change_nothing_else(pod: Pod, variant: str) -> None:
    flags = [*INIT, "--force-iptables-binary", variant]
    assert run_cli(pod, [*flags, "--rule-comments"]).returncode == 0
    saved = iptables_save(pod, variant, 4)
    rules = [line for line in saved.splitlines() if line.startswith("-A")]
    assert rules and all('--comment "istio-iptables: ' in line for line in rules)
    assert run_cli(pod, [*flags, "--rule-comments", "status"]).returncode == 0
    # Without comments the plan differs only by them: a re-run repairs to the plain rules, and clean-up
    # finds everything either way.
    assert run_cli(pod, flags).returncode == 0
    assert "--comment" not in iptables_save(pod, variant, 4)
    assert run_cli(pod, [*flags, "--rule-comments"]).returncode == 0
    assert run_cli(pod, [*INIT, "--cleanup-only", "--force-iptables-binary", variant]).returncode == 0
    assert "ISTIO" not in iptables_save(pod, variant, 4)
    assert os.path.exists(f"/var/run/netns/{pod.name}")


@pytest.mark.parametrize("flags", [[*INIT, "--native-nftables"], INIT], ids=["native-flag", "no-flag"])
def test_trace_live_reads_native_nftables(pod: Pod, flags: list[str]) -> None:
    """Whatever the flags say, --live walks the copy that holds our rules (here native nftables), in nft's
    spelling, and vouches for the verdict only because nothing else is hooked there."""
    assert run_cli(pod, [*INIT, "--native-nftables"]).returncode == 0
    live = run_cli(pod, [*flags, "trace", "outbound", "--dst", "198.18.0.1:8080", "--live", "--format", "json"])
    assert live.returncode == 0, live.stderr
    document = json.loads(live.stdout)
    assert document["verdict"]["captured_by"] == 15001 and document["verdict"]["certain"], document["verdict"]
    assert document["events"][0]["rule"] == "output: counter jump istio-output"
    assert document["not_walked"] == []


def test_trace_live_is_uncertain_about_rules_it_does_not_walk(pod: Pod) -> None:
    """Another table hooked where the packet passes, or another copy of rules, is named and makes the
    verdict uncertain: the trace cannot vouch for what it did not walk."""
    assert run_cli(pod, [*INIT, "--native-nftables"]).returncode == 0
    pod.run(
        ["nft", "-f", "-"],
        stdin="table inet fw {\n chain out {\n type filter hook output priority 0;\n tcp dport 9 drop\n }\n}\n",
    )
    pod.run(["iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "RETURN"])
    traced = run_cli(pod, [*INIT, "trace", "outbound", "--dst", "198.18.0.1:8080", "--live", "--format", "json"])
    document = json.loads(traced.stdout)
    assert document["verdict"]["captured_by"] == 15001 and not document["verdict"]["certain"]
    assert document["not_walked"] == [
        "iptables-legacy (ipv4): 1 rules in OUTPUT",
        "nft table inet fw, chain out (hook output): 1 rules",
    ]
    text = run_cli(pod, [*INIT, "trace", "outbound", "--dst", "198.18.0.1:8080", "--live"]).stdout
    assert "verdict: uncertain: rules the packet meets were not walked" in text
    # An inbound packet never meets those OUTPUT rules: its verdict stays certain.
    inbound = run_cli(pod, [*INIT, "trace", "inbound", "--port", "8080", "--live", "--format", "json"])
    assert json.loads(inbound.stdout)["verdict"]["certain"], inbound.stdout
    assert "not walked: nft table inet fw, chain out (hook output): 1 rules" in text


def test_reads_detect_in_the_named_namespace(pod: Pod) -> None:
    """--dry-run, graph and trace with --network-namespace detect IPv6 in that namespace, not in this
    process's own: the pod is made to differ from this namespace (IPv4 only where this one has IPv6, IPv6
    only where it has none)."""
    flags = INIT[:-1]  # no --no-ipv6: detection decides
    ipv6_here = "ip6tables-restore" in run_cli_here([*flags, "--dry-run"])
    pod.run(["ip", "-6" if ipv6_here else "-4", "addr", "flush", "scope", "global"])
    dry_run = run_cli(pod, [*flags, "--dry-run"]).stdout
    assert ("# ip6tables-restore --noflush" in dry_run) is not ipv6_here, dry_run
    graph = run_cli(pod, [*flags, "graph"]).stdout
    assert ('subgraph cluster_ipv6["IPv6"]' in graph) is not ipv6_here, graph
    traced = run_cli(pod, [*flags, "trace", "outbound", "--dst", "[2001:db8::1]:8080", "--format", "json"])
    captured_by = json.loads(traced.stdout)["verdict"]["captured_by"]
    assert captured_by == (None if ipv6_here else 15001), traced.stdout


@pytest.mark.skipif(shutil.which("ipset") is None, reason="ipset is not installed (scripts/test installs it)")
def test_trace_live_looks_up_the_live_sets(pod: Pod) -> None:
    flags = [*INIT, "--match-sets", "-x", "198.18.0.1/32"]
    assert run_cli(pod, flags).returncode == 0
    excluded = run_cli(pod, [*flags, "trace", "outbound", "--dst", "198.18.0.1:8080", "--live"])
    assert "verdict: not captured: 198.18.0.1 is excluded by -x (set ISTIO_EXCLUDE_CIDR4)" in excluded.stdout
    captured = run_cli(pod, [*flags, "trace", "outbound", "--dst", "198.18.0.3:8080", "--live"])
    assert "redirected to 15001 by ISTIO_REDIRECT" in captured.stdout, captured.stdout


def run_cli_here(arguments: list[str]) -> str:
    """A dry run in this process's own namespace (it enters none): what detection says here."""
    result = run_cli_in_process(arguments)
    assert result.code == 0, result.stderr
    return result.stdout


def test_trace_live_says_when_the_pod_has_no_route(pod: Pod) -> None:
    """The pod here has no default route: a connection elsewhere fails before any rule sees it."""
    assert run_cli(pod, INIT).returncode == 0
    traced = run_cli(pod, [*INIT, "trace", "outbound", "--dst", "10.0.0.5:443", "--live"])
    assert traced.stdout.splitlines()[1] == (
        "verdict: not captured: the namespace has no route to 10.0.0.5 (Network is unreachable): "
        "the connection fails before any rule"
    )
