"""Clean-up finds everything of ours and needs nothing else; nothing of ours stays, not even an empty table
where the kernel can unload it; and ``preflight`` changes nothing at all."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.kernel.namespaces import CLI, Pod, as_image_user, iptables_save, needs_root, normalized_save, run_cli

pytestmark = [pytest.mark.kernel, needs_root]

REDIRECT = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*"]
EVERYTHING = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-b", "*", "--ipv6"]
EVERYTHING += ["--redirect-dns", "--dns-servers", "198.18.0.1,2001:db8::1", "--drop-invalid"]
FOREIGN_NFT = (
    "table inet foreign {\n chain input {\n  type filter hook input priority 10;\n  tcp dport 9999 accept\n }\n}\n"
)


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def netfilter_state(pod: Pod) -> str:
    """Everything a run could leave: the nf_tables ruleset, the legacy tables that exist, their rules."""
    names = pod.run(["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]).stdout
    legacy = iptables_save(pod, "legacy", 4) + iptables_save(pod, "legacy", 6)
    return pod.run(["nft", "list", "ruleset"]).stdout + "\n" + "".join(sorted(names.splitlines())) + "\n" + legacy


def test_one_cleanup_removes_our_rules_from_both_iptables_variants(pod: Pod) -> None:
    """A run forced to one variant after a run in the other leaves two copies; one clean-up removes both."""
    for variant in ("legacy", "nft"):
        for binary in ("iptables", "ip6tables"):
            pod.run(
                [f"{binary}-{variant}", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "RETURN"]
            )
    before = {(v, f): normalized_save(iptables_save(pod, v, f)) for v in ("legacy", "nft") for f in (4, 6)}
    for variant in ("legacy", "nft"):
        assert run_cli(pod, [*EVERYTHING, "--force-iptables-binary", variant]).returncode == 0
    assert all("ISTIO_OUTPUT" in iptables_save(pod, v, f) for v, f in before)
    cleaned = run_cli(pod, [*REDIRECT, "--cleanup-only"])
    assert cleaned.returncode == 0, cleaned.stderr
    assert {key: normalized_save(iptables_save(pod, *key)) for key in before} == before
    assert "lookup 133" not in pod.run(["ip", "rule"]).stdout


def test_cleanup_in_a_namespace_with_only_loopback_needs_no_ipv6_flag() -> None:
    name = f"iit-{os.getpid()}-lo-only"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=30)
        command = [CLI, "--network-namespace", name]
        applied = subprocess.run(
            [*command, *REDIRECT, "--no-ipv6"], capture_output=True, text=True, timeout=60, check=False
        )
        assert applied.returncode == 0, applied.stderr
        cleaned = subprocess.run([*command, "--cleanup-only"], capture_output=True, text=True, timeout=60, check=False)
        assert cleaned.returncode == 0, cleaned.stderr
        for binary in ("iptables-nft-save", "ip6tables-nft-save"):
            saved = subprocess.run(
                ["ip", "netns", "exec", name, binary], capture_output=True, text=True, timeout=60, check=False
            )
            assert "ISTIO" not in saved.stdout, binary
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=30)


@pytest.mark.parametrize("backend", ["nft", "native"])
def test_nft_ruleset_is_as_before_after_install_and_cleanup(pod: Pod, backend: str) -> None:
    """With iptables-nft, the tables our rules needed go again once empty (also those a reconfiguration
    empties); a foreign table and a foreign iptables-nft rule stay as they were."""
    pod.run(["nft", "-f", "-"], stdin=FOREIGN_NFT)
    pod.run(["iptables-nft", "-t", "raw", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "RETURN"])
    before = pod.run(["nft", "list", "ruleset"]).stdout
    flags = ["--native-nftables"] if backend == "native" else ["--force-iptables-binary", "nft"]
    assert run_cli(pod, [*EVERYTHING, *flags]).returncode == 0
    if backend == "nft":
        reconfigured = run_cli(pod, [*REDIRECT, "--ipv6", *flags])
        assert reconfigured.returncode == 0, reconfigured.stderr
        assert "table ip mangle" not in pod.run(["nft", "list", "ruleset"]).stdout
    cleaned = run_cli(pod, [*REDIRECT, "--cleanup-only", *flags])
    assert cleaned.returncode == 0, cleaned.stderr
    assert pod.run(["nft", "list", "ruleset"]).stdout == before


@pytest.mark.parametrize("backend", ["legacy", "nft", "native"])
def test_preflight_changes_nothing(pod: Pod, backend: str) -> None:
    flags = ["--native-nftables"] if backend == "native" else ["--force-iptables-binary", backend]
    before = netfilter_state(pod)
    result = run_cli(pod, [*EVERYTHING, *flags, "preflight"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MISSING" not in result.stdout
    assert netfilter_state(pod) == before


def test_non_root_legacy_apply_creates_only_the_tables_it_writes(pod: Pod) -> None:
    """Without root, legacy's list of tables cannot be read and reading a table creates it: a REDIRECT
    apply of IPv4 must leave only the nat table, and no IPv6 table at all."""
    with as_image_user(pod) as run_as_image_user:
        for _ in range(2):
            flags = [*REDIRECT, "--no-ipv6", "--force-iptables-binary", "legacy"]
            result = run_as_image_user(flags)
            assert result.returncode == 0, result.stderr
        assert pod.run(["cat", "/proc/net/ip_tables_names"]).stdout.split() == ["nat"]
        assert pod.run(["cat", "/proc/net/ip6_tables_names"]).stdout.split() == []
