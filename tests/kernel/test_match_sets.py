"""--match-sets with the iptables backends: sets created before and destroyed after the rules that use
them, refilled atomically, repaired, cleaned up, and the capture they give identical to the rule lists."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.kernel.namespaces import Pod, iptables_save, needs_root, run_cli
from tests.kernel.netlab import PEER2_4, PEER4, Lab, apply_capture

pytestmark = [
    pytest.mark.kernel,
    needs_root,
    pytest.mark.skipif(shutil.which("ipset") is None, reason="ipset is not installed (scripts/test installs it)"),
]

INIT = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*", "--no-ipv6"]


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def sets_of(pod: Pod) -> str:
    return "".join(line + "\n" for line in pod.run(["ipset", "save"]).stdout.splitlines() if "ISTIO_" in line)


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_sets_follow_the_lists_and_clean_up_leaves_foreign_sets(pod: Pod, variant: str) -> None:
    pod.run(["ipset", "create", "FOREIGN", "hash:ip"])
    flags = [*INIT, "--match-sets", "--force-iptables-binary", variant]
    assert run_cli(pod, [*flags, "-x", "10.0.0.0/8,1.2.0.0/16", "-o", "5432,3306"]).returncode == 0
    assert "add ISTIO_EXCLUDE_CIDR4 1.2.0.0/16" in sets_of(pod)
    saved = iptables_save(pod, variant, 4)
    assert "-A ISTIO_OUTPUT -m set --match-set ISTIO_EXCLUDE_CIDR4 dst -j RETURN" in saved
    assert "1.2.0.0/16" not in saved

    again = run_cli(pod, [*flags, "-x", "10.0.0.0/8,1.2.0.0/16", "-o", "5432,3306"])
    assert again.returncode == 0 and "nothing to change" in again.stderr

    # Members changed: refilled and swapped in; a list gone: its set goes after the rule using it.
    assert run_cli(pod, [*flags, "-x", "10.0.0.0/8,9.9.0.0/16"]).returncode == 0
    current = sets_of(pod)
    assert "add ISTIO_EXCLUDE_CIDR4 9.9.0.0/16" in current and "1.2.0.0/16" not in current
    assert "ISTIO_OUTBOUND_EXCLUDE_PORTS" not in current and ".n" not in current

    # Drift in a set is repaired like drift in a rule.
    pod.run(["ipset", "del", "ISTIO_EXCLUDE_CIDR4", "9.9.0.0/16"])
    assert run_cli(pod, [*flags, "-x", "10.0.0.0/8,9.9.0.0/16"]).returncode == 0
    assert "add ISTIO_EXCLUDE_CIDR4 9.9.0.0/16" in sets_of(pod)

    assert run_cli(pod, [*INIT, "--cleanup-only", "--force-iptables-binary", variant]).returncode == 0
    assert sets_of(pod) == ""
    assert "ISTIO" not in iptables_save(pod, variant, 4)
    assert "FOREIGN" in pod.run(["ipset", "list", "-n"]).stdout


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_a_refused_restore_puts_the_sets_back_as_they_were(pod: Pod, variant: str) -> None:
    flags = [*INIT, "--match-sets", "--force-iptables-binary", variant]
    dns = ["--redirect-dns", "--dns-servers", "198.18.0.1"]
    assert run_cli(pod, [*flags, *dns, "-x", "10.0.0.0/8"]).returncode == 0
    # A foreign rule jumping to our DNS chain makes the next transition's -X of that chain fail.
    pod.run([f"iptables-{variant}", "-t", "nat", "-N", "FOREIGN"])
    pod.run([f"iptables-{variant}", "-t", "nat", "-A", "FOREIGN", "-j", "ISTIO_OUTPUT_DNS"])
    before, rules = sets_of(pod), iptables_save(pod, variant, 4)
    refused = run_cli(pod, [*flags, "-x", "10.0.0.0/8,9.9.0.0/16", "-o", "25"])
    assert refused.returncode == 1, refused.stderr
    assert sets_of(pod) == before
    assert iptables_save(pod, variant, 4) == rules


def test_capture_with_sets_is_the_capture_with_lists(lab: Lab, variant: str) -> None:
    """The same flows, once with rule lists and once with sets: the same answers."""
    peer, peer2, proxy = lab.echo(lab.peer, "peer", [8080, 5432]), lab.echo(lab.peer2, "peer2", [8080]), lab.proxy()
    lab.wait_ready(peer, peer2, proxy)
    answers = []
    for extra in ([], ["--match-sets"]):
        apply_capture(
            lab,
            [
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-i",
                "198.18.0.0/24,198.20.0.0/16",
                "-x",
                "198.19.0.0/24",
                "-o",
                "5432",
                *extra,
            ],
            variant,
        )
        answers.append([lab.client(PEER4, 8080), lab.client(PEER2_4, 8080), lab.client(PEER4, 5432)])
    assert answers[0] == answers[1]
    captured, excluded, port_excluded = answers[1]
    assert (
        captured.startswith("PROXY15001|peer:") and excluded.startswith("peer2:") and port_excluded.startswith("peer:")
    )


def test_no_reconcile_refuses_sets_that_drifted_and_changes_nothing(pod: Pod) -> None:
    flags = [*INIT, "--match-sets", "--force-iptables-binary", "nft"]
    assert run_cli(pod, [*flags, "-x", "10.0.0.0/8,1.2.0.0/16"]).returncode == 0
    pod.run(["ipset", "add", "ISTIO_EXCLUDE_CIDR4", "9.9.0.0/16"])  # another writer's member
    before, saved = sets_of(pod), iptables_save(pod, "nft", 4)
    refused = run_cli(pod, [*flags, "-x", "10.0.0.0/8,1.2.0.0/16", "--no-reconcile"])
    assert refused.returncode != 0
    assert "live sets differ from the plan" in refused.stderr
    assert "ISTIO_EXCLUDE_CIDR4: extra member 9.9.0.0/16" in refused.stderr
    assert (sets_of(pod), iptables_save(pod, "nft", 4)) == (before, saved)
