"""What other programs leave in the namespace, in forms and bytes of their own: a table written with plain
``nft`` where iptables-nft keeps its tables, and comments that are not UTF-8 (the kernel stores any bytes)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.kernel.namespaces import CLI, Pod, needs_root, run_cli

pytestmark = [pytest.mark.kernel, needs_root]

FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*", "--no-ipv6"]
ODD = b"caf\xe9 \xff\xfe"
"""Latin-1 and bytes that are no text at all: what a foreign program may put in a comment."""


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def raw(pod: Pod, *command: str | bytes) -> bytes:
    """A command's output as the kernel's bytes."""
    result = subprocess.run(["ip", "netns", "exec", pod.name, *command], capture_output=True, timeout=60, check=True)
    return result.stdout


def run_cli_lossless(pod: Pod, arguments: list[str]) -> subprocess.CompletedProcess[str]:
    """The program, its output read as it wrote it (a foreign comment's bytes included), in a locale whose
    streams refuse what is not UTF-8 (as a UTF-8 locale other than C.UTF-8 has them)."""
    return subprocess.run(
        [CLI, "--network-namespace", pod.name, *arguments],
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
        capture_output=True,
        text=True,
        errors="surrogateescape",
        timeout=120,
        check=False,
    )


def nft_ruleset(pod: Pod) -> bytes:
    return raw(pod, "nft", "list", "ruleset")


# ---- a table written with plain nft ------------------------------------------------------------------

PLAIN_NFT = b"""table ip nat {
  chain PREROUTING {
    type nat hook prerouting priority dstnat; policy accept;
    meta l4proto tcp th dport 9999 redirect to :9998;
  }
}
"""


def assert_refused(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result.stderr
    assert "table nat" in result.stderr and "incompatible" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # One line of error; any other line is a log line (--no-ipv6 warns about this pod's IPv6 addresses).
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("istio-iptables: ")] == lines[-1:], result.stderr
    assert all(re.match(r"\d{4}-\d\d-\d\dT", line) for line in lines[:-1]), result.stderr


def test_a_plain_nft_nat_table_is_refused_before_anything_changes(pod: Pod) -> None:
    subprocess.run(["ip", "netns", "exec", pod.name, "nft", "-f", "-"], input=PLAIN_NFT, check=True, timeout=30)
    before = nft_ruleset(pod)
    for extra in ([], ["--force-iptables-binary", "nft"], ["--cleanup-only"]):
        assert_refused(run_cli(pod, [*FLAGS, *extra]))
        assert nft_ruleset(pod) == before, extra
    assert run_cli(pod, [*FLAGS, "status"]).returncode == 1
    assert nft_ruleset(pod) == before


def test_our_table_made_unreadable_by_a_plain_nft_rule_is_never_reported_clean(pod: Pod) -> None:
    """Our rules applied, then someone adds an nft-only rule to the same ``ip nat`` table: a re-run must not
    add another jump, and a clean-up must not say "nothing to change" while the capture stays."""
    assert run_cli(pod, FLAGS).returncode == 0
    rule = "meta l4proto tcp th dport 9999 redirect to :9998"
    subprocess.run(["ip", "netns", "exec", pod.name, "sh", "-c", f"nft add rule ip nat PREROUTING {rule}"], check=True)
    before = nft_ruleset(pod)
    assert_refused(run_cli(pod, FLAGS))
    assert_refused(run_cli(pod, [*FLAGS, "--cleanup-only"]))
    assert nft_ruleset(pod) == before
    assert before.count(b"jump ISTIO_OUTPUT") == 1


# ---- bytes that are not UTF-8 -----------------------------------------------------------------------


def commented_rules(pod: Pod, variant: str) -> list[bytes]:
    saved = raw(pod, f"iptables-{variant}-save") + raw(pod, f"ip6tables-{variant}-save")
    return [line for line in saved.splitlines() if ODD in line]


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_foreign_comments_in_any_bytes_survive_apply_status_and_cleanup(pod: Pod, variant: str) -> None:
    for binary in ("iptables", "ip6tables"):
        for table, chain in (("nat", "PREROUTING"), ("nat", "OUTPUT"), ("mangle", "PREROUTING")):
            comment = ["-m", "comment", "--comment", ODD]
            raw(pod, f"{binary}-{variant}", "-t", table, "-A", chain, *comment, "-j", "RETURN")
    foreign = commented_rules(pod, variant)
    assert len(foreign) == 6
    forced = ["--force-iptables-binary", variant]
    runs = [
        [*FLAGS, *forced],
        [*FLAGS, *forced],
        [*FLAGS[:-1], "--ipv6", "-m", "TPROXY", *forced],
        [*FLAGS, *forced, "status"],
        [*FLAGS, *forced, "status", "--format", "json"],
        [*FLAGS, *forced, "trace", "inbound", "--port", "80", "--live"],
        [*FLAGS, *forced, "--cleanup-only"],
    ]
    for arguments in runs:
        result = run_cli_lossless(pod, arguments)
        assert "Traceback" not in result.stderr and "Error" not in result.stderr, (arguments, result.stderr)
        assert result.returncode in (0, 1), (arguments, result.stderr)
        if "status" not in arguments:
            assert result.returncode == 0, (arguments, result.stderr)
        assert commented_rules(pod, variant) == foreign, arguments
    assert b"ISTIO" not in raw(pod, f"iptables-{variant}-save") + raw(pod, f"ip6tables-{variant}-save")


def test_foreign_ipset_comments_in_any_bytes_survive_match_sets(pod: Pod) -> None:
    raw(pod, "ipset", "create", "foreign-odd", "hash:ip", "comment")
    raw(pod, "ipset", "add", "foreign-odd", "198.19.1.1", "comment", ODD)
    before = raw(pod, "ipset", "save", "foreign-odd")
    flags = ["-p", "15001", "-u", "1337", "-i", "198.19.0.0/16,198.20.0.0/16", "-x", "198.21.0.0/16"]
    flags += ["--no-ipv6", "--match-sets"]
    for arguments in (flags, [*flags, "-x", "198.22.0.0/16"], [*flags, "status"], [*flags, "--cleanup-only"]):
        result = run_cli_lossless(pod, arguments)
        assert "Traceback" not in result.stderr and "Error" not in result.stderr, (arguments, result.stderr)
        assert result.returncode in (0, 1) if "status" in arguments else result.returncode == 0, result.stderr
        assert raw(pod, "ipset", "save", "foreign-odd") == before, arguments
    assert b"ISTIO" not in raw(pod, "ipset", "save")
