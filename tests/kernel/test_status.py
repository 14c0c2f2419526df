"""status sees all drift and stays linear: 8,000 rules, set members added or removed (ipset and native nft
sets), a stray copy of our rules in the other iptables variant, and no family the flags leave alone."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from tests.kernel.namespaces import Pod, iptables_save, needs_root, run_cli

pytestmark = [pytest.mark.kernel, needs_root]

F = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
needs_ipset = pytest.mark.skipif(shutil.which("ipset") is None, reason="ipset is not installed (scripts/test does)")


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def report(pod: Pod, flags: list[str]) -> tuple[int, dict[str, Any]]:
    result = run_cli(pod, [*flags, "status", "--format", "json"])
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def family(document: dict[str, Any], label: str, variant: str) -> dict[str, Any]:
    return next(item for item in document["families"] if (item["family"], item["variant"]) == (label, variant))


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_status_at_8000_ports_names_exactly_what_differs(pod: Pod, variant: str) -> None:
    ports = ",".join(str(port) for port in range(20000, 28000))
    flags = [*F, "-d", ports, "--no-ipv6", "--force-iptables-binary", variant]
    assert run_cli(pod, flags).returncode == 0
    code, synced = report(pod, flags)
    assert code == 0 and synced["in_sync"], synced
    assert family(synced, "ipv4", variant)["foreign"] == []

    binary = f"iptables-{variant}"
    pod.run([binary, "-t", "nat", "-D", "ISTIO_INBOUND", "-p", "tcp", "--dport", "24000", "-j", "RETURN"])
    pod.run([binary, "-t", "nat", "-A", "ISTIO_INBOUND", "-p", "tcp", "--dport", "9", "-j", "RETURN"])
    pod.run([binary, "-t", "nat", "-A", "PREROUTING", "-p", "udp", "--dport", "9", "-j", "RETURN"])
    code, drifted = report(pod, flags)
    ipv4 = family(drifted, "ipv4", variant)
    assert code == 1
    assert [item["rule"] for item in ipv4["missing"]] == ["-A ISTIO_INBOUND -p tcp --dport 24000 -j RETURN"]
    assert [item["rule"] for item in ipv4["extra"]] == ["-A ISTIO_INBOUND -p tcp --dport 9 -j RETURN"]
    assert ipv4["changed"] == []
    assert [item["rule"] for item in ipv4["foreign"]] == ["-A PREROUTING -p udp -m udp --dport 9 -j RETURN"]


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_status_reports_a_stray_copy_in_the_other_variant(pod: Pod, variant: str) -> None:
    other = "nft" if variant == "legacy" else "legacy"
    flags = [*F, "--no-ipv6"]
    assert run_cli(pod, [*flags, "--force-iptables-binary", other]).returncode == 0
    assert run_cli(pod, [*flags, "--force-iptables-binary", variant]).returncode == 0
    assert "ISTIO_OUTPUT" in iptables_save(pod, other, 4) and "ISTIO_OUTPUT" in iptables_save(pod, variant, 4)
    code, document = report(pod, [*flags, "--force-iptables-binary", variant])
    assert code == 1 and not document["in_sync"]
    assert family(document, "ipv4", variant)["in_sync"]
    stray = family(document, "ipv4", other)
    assert (
        not stray["in_sync"]
        and {"table": "nat", "chain": "OUTPUT", "rule": "-A OUTPUT -j ISTIO_OUTPUT"} in stray["extra"]
    )
    text = run_cli(pod, [*flags, "--force-iptables-binary", variant, "status"]).stdout
    assert f"ipv4 (iptables-{other}): DRIFT" in text and f"ipv4 (iptables-{variant}): in sync" in text


def test_status_lists_no_ipv6_under_no_ipv6_unless_it_holds_rules_of_ours(pod: Pod) -> None:
    assert run_cli(pod, [*F, "--no-ipv6"]).returncode == 0
    text = run_cli(pod, [*F, "--no-ipv6", "status"])
    assert text.returncode == 0 and "ipv6" not in text.stdout, text.stdout
    # IPv6 rules of an earlier run are what an apply with --no-ipv6 removes: that is drift.
    assert run_cli(pod, [*F, "--ipv6"]).returncode == 0
    code, document = report(pod, [*F, "--no-ipv6"])
    assert code == 1 and not family(document, "ipv6", "nft")["in_sync"]


@needs_ipset
@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_set_members_added_or_removed_are_drift(pod: Pod, variant: str) -> None:
    flags = [*F, "-x", "198.19.0.0/24,198.19.1.0/24", "--no-ipv6", "--match-sets", "--force-iptables-binary", variant]
    assert run_cli(pod, flags).returncode == 0
    code, document = report(pod, flags)
    assert code == 0 and document["sets"] == {"in_sync": True, "changes": []}

    pod.run(["ipset", "del", "ISTIO_EXCLUDE_CIDR4", "198.19.1.0/24"])
    pod.run(["ipset", "add", "ISTIO_EXCLUDE_CIDR4", "198.19.9.0/24"])
    code, document = report(pod, flags)
    assert code == 1 and document["sets"]["changes"] == [
        "ISTIO_EXCLUDE_CIDR4: missing member 198.19.1.0/24",
        "ISTIO_EXCLUDE_CIDR4: extra member 198.19.9.0/24",
    ]
    assert "sets: DRIFT" in run_cli(pod, [*flags, "status"]).stdout

    drifted = pod.run(["ipset", "save", "ISTIO_EXCLUDE_CIDR4"]).stdout
    refused = run_cli(pod, [*flags, "--no-reconcile"])
    assert refused.returncode == 1 and "missing member 198.19.1.0/24" in refused.stderr, refused.stderr
    assert pod.run(["ipset", "save", "ISTIO_EXCLUDE_CIDR4"]).stdout == drifted

    assert run_cli(pod, flags).returncode == 0
    assert report(pod, flags)[0] == 0


def test_native_set_members_added_or_removed_are_drift(pod: Pod) -> None:
    flags = [*F, "-x", "198.19.0.0/24", "-o", "5432,5433", "--no-ipv6", "--match-sets", "--native-nftables"]
    assert run_cli(pod, flags).returncode == 0
    assert report(pod, flags)[0] == 0
    pod.run(["nft", "delete", "element", "inet", "istio-proxy-nat", "istio-outbound-exclude-ports", "{ 5433 }"])
    code, document = report(pod, flags)
    assert code == 1 and not family(document, "inet", "native")["in_sync"]
    refused = run_cli(pod, [*flags, "--no-reconcile"])
    assert refused.returncode == 1 and "istio-outbound-exclude-ports" in refused.stderr, refused.stderr
    assert run_cli(pod, flags).returncode == 0
    assert report(pod, flags)[0] == 0
