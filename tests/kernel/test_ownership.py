"""Never delete what is not ours: foreign rules shaped like ours in built-in chains, and rules another program
adds while a run fails and is rolled back, on the real kernel in namespaces (both iptables variants, the
libiptc backend, and native nftables where a switch removes our iptables copy)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.namespaces import Pod, iptables_save, needs_root, normalized_save, run_cli
from tests.kernel.test_apply import EVERYTHING, VARIANTS, backend_flags, refuse_table, tool, wrapper

pytestmark = [pytest.mark.kernel, needs_root]

F = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
F += ["-d", "15090,15021,15020", "--no-ipv6"]
# Shaped like ours: an interface RETURN (a KubeVirt or excluded-interface rule of ours looks the same) and
# TPROXY's save-mark, which a REDIRECT run never writes.
FOREIGN = {
    "nat": ["-A", "PREROUTING", "-i", "eth9", "-j", "RETURN"],
    "mangle": ["-A", "PREROUTING", "-p", "tcp", "-m", "mark", "--mark", "1337", "-j", "CONNMARK", "--save-mark"],
}
FOREIGN_SAVED = [
    "-A PREROUTING -i eth9 -j RETURN",
    "-A PREROUTING -p tcp -m mark --mark 0x539 -j CONNMARK --save-mark",  # legacy adds the masks
]


def count(saved: str, line: str) -> int:
    return sum(1 for found in saved.splitlines() if found.startswith(line))


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def add_foreign(pod: Pod, variant: str) -> None:
    for table, rule in FOREIGN.items():
        pod.run([f"iptables-{variant}", "-t", table, *rule])


def assert_foreign_kept(pod: Pod, variant: str) -> None:
    saved = iptables_save(pod, variant, 4)
    for line in FOREIGN_SAVED:
        assert count(saved, line) == 1, (line, saved)


def assert_status_in_sync(pod: Pod, flags: list[str]) -> None:
    """status: in sync, the foreign rules listed as foreign only (never missing, extra or changed)."""
    result = run_cli(pod, [*flags, "status", "--format", "json"])
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["in_sync"], result.stdout
    ipv4 = next(family for family in report["families"] if family["family"] == "ipv4")
    foreign = [item["rule"] for item in ipv4["foreign"]]
    assert len(foreign) == 2 and all(count("\n".join(foreign), line) == 1 for line in FOREIGN_SAVED), foreign


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_foreign_rules_shaped_like_ours_survive_apply_rerun_repair_and_cleanup(pod: Pod, variant: str) -> None:
    flags = [*F, "--force-iptables-binary", variant]
    add_foreign(pod, variant)
    assert run_cli(pod, flags).returncode == 0
    assert_foreign_kept(pod, variant)
    assert_status_in_sync(pod, flags)

    again = run_cli(pod, flags)
    assert again.returncode == 0 and "nothing to change" in again.stderr, again.stderr
    assert_foreign_kept(pod, variant)

    # Appended after our jumps too, and then a repair of a rule of ours deleted by hand.
    add_foreign(pod, variant)
    pod.run(
        [f"iptables-{variant}", "-t", "nat", "-D", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15021", "-j", "RETURN"]
    )
    pod.run([f"iptables-{variant}", "-t", "nat", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT"])
    assert run_cli(pod, flags).returncode == 0
    saved = iptables_save(pod, variant, 4)
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN" in saved and "-A OUTPUT -j ISTIO_OUTPUT" in saved
    assert all(count(saved, line) == 2 for line in FOREIGN_SAVED), saved
    for table, rule in FOREIGN.items():
        pod.run([f"iptables-{variant}", "-t", table, "-D", *rule[1:]])
    assert_status_in_sync(pod, flags)

    assert run_cli(pod, [*flags, "--cleanup-only"]).returncode == 0
    saved = iptables_save(pod, variant, 4)
    assert "ISTIO" not in saved
    assert_foreign_kept(pod, variant)


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_rules_an_earlier_configuration_left_go_and_foreign_ones_of_their_shape_stay(pod: Pod, variant: str) -> None:
    """The plan changes between runs: the rules the earlier one put in built-in chains (excluded interfaces,
    KubeVirt, TPROXY's marks) are removed by the next run and by a clean-up with other flags, while the
    foreign rules of the same shapes, which nothing of ours vouches for, stay."""
    flags = ["--force-iptables-binary", variant]
    # EVERYTHING excludes eth9 itself: a foreign rule identical to a planned one is ours where the plan puts
    # it (nothing tells them apart), so the earlier configuration excludes another interface here.
    earlier = [*EVERYTHING[: EVERYTHING.index("eth9")], "eth6", *EVERYTHING[EVERYTHING.index("eth9") + 1 :]]
    add_foreign(pod, variant)
    before = iptables_save(pod, variant, 4)
    assert run_cli(pod, [*earlier, *flags]).returncode == 0
    assert "-A OUTPUT -o eth6 -j RETURN" in iptables_save(pod, variant, 4)
    assert run_cli(pod, [*F, *flags]).returncode == 0
    saved = iptables_save(pod, variant, 4)
    assert "-o eth6" not in saved and "veth7" not in saved and "--restore-mark" not in saved, saved
    assert_foreign_kept(pod, variant)
    assert run_cli(pod, [*earlier, *flags]).returncode == 0
    assert run_cli(pod, [*F, *flags, "--cleanup-only"]).returncode == 0
    assert normalized_save(iptables_save(pod, variant, 4)) == normalized_save(before)


def test_a_switch_to_native_nftables_removes_our_iptables_copy_only(pod: Pod) -> None:
    add_foreign(pod, "nft")
    assert run_cli(pod, [*F, "--force-iptables-binary", "nft"]).returncode == 0
    native = [*F, "--native-nftables"]
    assert run_cli(pod, native).returncode == 0
    saved = iptables_save(pod, "nft", 4)
    assert "ISTIO" not in saved
    assert_foreign_kept(pod, "nft")
    status = run_cli(pod, [*native, "status"])
    assert status.returncode == 0 and "eth9" not in status.stdout and "save-mark" not in status.stdout, status.stdout


# ---- rollback: only our changes are undone -------------------------------------------------------------

MEANWHILE = "-A OUTPUT -d 198.19.7.7/32 -j RETURN"


def writer_during_rollback(directory: Path, variant: str) -> dict[str, str]:
    """A stand-in ``iptables-<variant>-save``: the first time it finds our rules (the rollback looking at what
    the failed run left), another program appends a nat rule first."""
    name = f"iptables-{tool(variant)}-save"
    real, done = shutil.which(name), directory / "written"
    adder = f"iptables-{tool(variant)} -w -t nat {MEANWHILE}"
    script = (
        f"#!/bin/sh\nif [ ! -e {done} ] && {real} | grep -q ISTIO_OUTPUT; then touch {done}; {adder}; fi\n"
        f'exec {real} "$@"\n'
    )
    (directory / name).write_text(script)
    (directory / name).chmod(0o755)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_rollback_keeps_a_rule_another_program_added_meanwhile(pod: Pod, variant: str, tmp_path: Path) -> None:
    add_foreign(pod, tool(variant))
    before = iptables_save(pod, tool(variant), 4)
    env = writer_during_rollback(tmp_path, variant)
    if variant == "libiptc":
        refuse_table(pod, 6, "nat")  # IPv6 refused by the kernel, after IPv4 committed
    else:
        wrapper(
            tmp_path, f"ip6tables-{variant}-restore", 'echo "ip6tables-restore: line 1 failed" >&2; exit 1', once=True
        )
    result = run_cli(pod, [*F[:-1], "--ipv6", *backend_flags(variant)], env=env)
    assert result.returncode == 1 and "ipv4 rules restored" in result.stderr, result.stderr
    assert (tmp_path / "written").exists()
    after = iptables_save(pod, tool(variant), 4)
    assert MEANWHILE in after and "ISTIO" not in after, after
    assert normalized_save(after.replace(MEANWHILE + "\n", "")) == normalized_save(before)
    assert_foreign_kept(pod, tool(variant))
