"""Apply, re-run, drift, reconcile, clean-up and failure injection on the real kernel, in namespaces.

Every test works in network namespaces it creates (never in the one the runner lives in) and compares
``iptables-save`` before and after. Both iptables variants are exercised, and the libiptc backend
(python-iptables, legacy tables), inspected with the legacy tools.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.namespaces import (
    CLI,
    Pod,
    as_image_user,
    iptables_save,
    needs_root,
    normalized_save,
    run_cli,
)

pytestmark = [pytest.mark.kernel, needs_root]

INIT_FLAGS = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
INIT_FLAGS += ["-d", "15090,15021,15020"]
EVERYTHING = [
    *["-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-x", "198.19.0.0/24", "-b", "*"],
    *["-d", "15090", "--redirect-dns", "--dns-servers", "198.18.0.1,2001:db8::1", "--drop-invalid"],
    *["-c", "eth9", "-k", "veth7", "-o", "5432", "-q", "25", "--ipv6"],
]
TOOLS = ["legacy", "nft"]
"""The iptables variants, as binaries."""
needs_python_iptables = pytest.mark.skipif(
    importlib.util.find_spec("iptc") is None,
    reason="python-iptables is not installed: pip install '.[libiptc]' (the dev extra has it)",
)
VARIANTS = [*TOOLS, pytest.param("libiptc", marks=needs_python_iptables)]
"""How rules get written: the two iptables-restore variants, and --backend libiptc (legacy tables)."""

FOREIGN = {
    "nat": ["-A PREROUTING -p udp --dport 9999 -j RETURN", "-A OUTPUT -d {peer} -j RETURN"],
    "mangle": ["-A PREROUTING -p tcp --dport 9999 -j MARK --set-mark 7", "-A OUTPUT -o lo -j RETURN"],
    "raw": ["-A PREROUTING -p udp --dport 9999 -j NOTRACK", "-A OUTPUT -p udp --dport 9999 -j RETURN"],
    "filter": ["-A INPUT -p tcp --dport 9999 -j ACCEPT", "-A OUTPUT -p tcp --dport 9999 -j ACCEPT"],
}


def backend_flags(variant: str) -> list[str]:
    """The CLI flags that make a run use the variant."""
    return ["--backend", "libiptc"] if variant == "libiptc" else ["--force-iptables-binary", variant]


def tool(variant: str) -> str:
    """The iptables binaries that show a variant's tables (and write the tests' foreign rules there)."""
    return "legacy" if variant == "libiptc" else variant


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def add_foreign_rules(pod: Pod, variant: str, family: int) -> None:
    binary = f"{'ip6tables' if family == 6 else 'iptables'}-{tool(variant)}-restore"
    payload = ""
    for table, rules in FOREIGN.items():
        payload += f"*{table}\n:FOREIGN_CHAIN - [0:0]\n-A FOREIGN_CHAIN -j RETURN\n"
        peer = "2001:db8:9::9/128" if family == 6 else "198.19.9.9/32"
        payload += "".join(rule.format(peer=peer) + "\n" for rule in rules) + "COMMIT\n"
    pod.run([binary, "--noflush"], stdin=payload)


@pytest.mark.parametrize("variant", VARIANTS)
def test_apply_then_rerun_changes_nothing(pod: Pod, variant: str) -> None:
    first = run_cli(pod, [*INIT_FLAGS, "--no-ipv6", *backend_flags(variant)])
    assert first.returncode == 0, first.stderr
    applied = iptables_save(pod, tool(variant), 4)
    assert applied.count("-A ISTIO_OUTPUT") == 9
    assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" in applied

    again = run_cli(pod, [*INIT_FLAGS, "--no-ipv6", *backend_flags(variant)])
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stderr
    assert iptables_save(pod, tool(variant), 4) == applied


def test_detection_prefers_nft_then_the_variant_holding_rules(pod: Pod) -> None:
    add_foreign_rules(pod, "legacy", 4)
    result = run_cli(pod, [*INIT_FLAGS, "--no-ipv6"])
    assert result.returncode == 0, result.stderr
    assert "ISTIO_OUTPUT" in iptables_save(pod, "legacy", 4)
    assert "ISTIO_OUTPUT" not in iptables_save(pod, "nft", 4)


def test_detection_defaults_to_nft_in_a_fresh_namespace(pod: Pod) -> None:
    result = run_cli(pod, [*INIT_FLAGS, "--no-ipv6"])
    assert result.returncode == 0, result.stderr
    assert "ISTIO_OUTPUT" in iptables_save(pod, "nft", 4)
    assert "ISTIO_OUTPUT" not in iptables_save(pod, "legacy", 4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_drift_is_repaired_by_default_and_refused_with_no_reconcile(pod: Pod, variant: str) -> None:
    flags = [*INIT_FLAGS, "--no-ipv6", *backend_flags(variant)]
    assert run_cli(pod, flags).returncode == 0
    planned = iptables_save(pod, tool(variant), 4)
    binary = f"iptables-{tool(variant)}"
    pod.run([binary, "-t", "nat", "-D", "ISTIO_INBOUND", "-p", "tcp", "--dport", "15021", "-j", "RETURN"])
    pod.run([binary, "-t", "nat", "-A", "ISTIO_OUTPUT", "-d", "198.19.0.0/24", "-j", "RETURN"])
    pod.run([binary, "-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT"])  # a duplicate jump
    drifted = iptables_save(pod, tool(variant), 4)

    refused = run_cli(pod, [*flags, "--no-reconcile"])
    assert refused.returncode == 1
    assert "--- expected" in refused.stderr and "+++ live" in refused.stderr
    assert "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN" in refused.stderr
    assert iptables_save(pod, tool(variant), 4) == drifted

    repaired = run_cli(pod, flags)
    assert repaired.returncode == 0, repaired.stderr
    assert normalized_save(iptables_save(pod, tool(variant), 4)) == normalized_save(planned)


@pytest.mark.parametrize("variant", VARIANTS)
def test_half_applied_and_changed_configurations_converge(pod: Pod, variant: str) -> None:
    base = backend_flags(variant)
    assert run_cli(pod, [*INIT_FLAGS, "--no-ipv6", *base]).returncode == 0
    assert "ISTIO" not in iptables_save(pod, tool(variant), 6)

    # IPv4 applied, IPv6 not: the re-run with IPv6 completes it.
    assert run_cli(pod, [*INIT_FLAGS, "--ipv6", *base]).returncode == 0
    v4, v6 = iptables_save(pod, tool(variant), 4), iptables_save(pod, tool(variant), 6)
    assert "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN" in v6

    # Everything on, then back: nothing of the richer configuration may stay behind.
    assert run_cli(pod, [*EVERYTHING, *base]).returncode == 0
    assert "ISTIO_OUTPUT_DNS" in iptables_save(pod, tool(variant), 4)
    assert "fwmark 0x539 lookup 133" in pod.run(["ip", "rule"]).stdout
    assert run_cli(pod, [*INIT_FLAGS, "--ipv6", *base]).returncode == 0
    assert normalized_save(iptables_save(pod, tool(variant), 4)) == normalized_save(v4)
    assert normalized_save(iptables_save(pod, tool(variant), 6)) == normalized_save(v6)
    assert "lookup 133" not in pod.run(["ip", "rule"]).stdout
    assert "::6/128" in pod.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout

    # IPv6 turned off: its rules and ::6 go.
    assert run_cli(pod, [*INIT_FLAGS, "--no-ipv6", *base]).returncode == 0
    assert "ISTIO" not in iptables_save(pod, tool(variant), 6)
    assert "::6/128" not in pod.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_cleanup_removes_everything_of_ours_and_keeps_foreign_rules(pod: Pod, variant: str) -> None:
    for family in (4, 6):
        add_foreign_rules(pod, variant, family)
    before = {family: iptables_save(pod, tool(variant), family) for family in (4, 6)}
    rules_before = pod.run(["ip", "rule"]).stdout + pod.run(["ip", "-6", "rule"]).stdout
    addresses_before = pod.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout

    assert run_cli(pod, [*EVERYTHING, *backend_flags(variant)]).returncode == 0
    assert "ISTIO_DIVERT" in iptables_save(pod, tool(variant), 6)
    # Clean-up with other flags than the install's: state decides, not flags.
    cleaned = run_cli(pod, [*INIT_FLAGS, "--no-ipv6", "--cleanup-only", *backend_flags(variant)])
    assert cleaned.returncode == 0, cleaned.stderr
    for family in (4, 6):
        assert normalized_save(iptables_save(pod, tool(variant), family)) == normalized_save(before[family])
    assert pod.run(["ip", "rule"]).stdout + pod.run(["ip", "-6", "rule"]).stdout == rules_before
    assert pod.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout == addresses_before
    assert "133" not in pod.run(["ip", "route", "show", "table", "all"]).stdout


def test_istio_clean_iptables_script_cleans(pod: Pod) -> None:
    assert run_cli(pod, [*INIT_FLAGS, "--no-ipv6"]).returncode == 0
    clean = Path(CLI).with_name("istio-clean-iptables")
    result = subprocess.run(
        [str(clean), "--network-namespace", pod.name], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "ISTIO" not in iptables_save(pod, "nft", 4)


# ---- failures leave no trace ------------------------------------------------------------------------


def wrapper(directory: Path, name: str, script: str, *, once: bool = False) -> dict[str, str]:
    """A stand-in for a restore binary, first on PATH: ``script`` (with the real binary as $REAL) handles every
    payload, or with ``once`` only the first (the apply's; the rollback's and the feature probes' then go to the
    real binary)."""
    real = shutil.which(name)
    path, used = directory / name, directory / f"{name}.used"
    first = f'[ -e {used} ] && exec "$REAL" "$@"\ntouch {used}\n' if once else ""
    path.write_text(f"#!/bin/sh\nREAL={real}\n{first}{script}\n")
    path.chmod(0o755)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


REFUSED_BY_LIBIPTC = "-X ISTIO_TPROXY: can't delete chain ISTIO_TPROXY"


def refuse_table(pod: Pod, family: int, table: str) -> None:
    """Make a legacy table refuse the next transition for real, as a stand-in binary cannot for the in-process
    libiptc backend: a stale chain of ours (ISTIO_TPROXY, which only mangle holds) that a foreign rule still
    jumps to. The transition deletes the chain; libiptc refuses to delete a chain in use (so would
    iptables-restore), and that table commits nothing."""
    binary = f"{'ip6tables' if family == 6 else 'iptables'}-legacy-restore"
    payload = f"*{table}\n:ISTIO_TPROXY - [0:0]\n:FOREIGN_JUMP - [0:0]\n-A FOREIGN_JUMP -j ISTIO_TPROXY\nCOMMIT\n"
    pod.run([binary, "--noflush"], stdin=payload)


@pytest.mark.parametrize("variant", VARIANTS)
def test_refused_ipv6_restore_rolls_back_ipv4(pod: Pod, variant: str, tmp_path: Path) -> None:
    add_foreign_rules(pod, variant, 4)
    before = iptables_save(pod, tool(variant), 4)
    if variant == "libiptc":
        refuse_table(pod, 6, "nat")
        env, failed = {}, REFUSED_BY_LIBIPTC
        before_v6 = iptables_save(pod, "legacy", 6)
    else:
        refusal = 'echo "ip6tables-restore: line 1 failed" >&2; exit 1'
        env = wrapper(tmp_path, f"ip6tables-{variant}-restore", refusal, once=True)
        failed = "line 1 failed"
    result = run_cli(pod, [*INIT_FLAGS, "--ipv6", *backend_flags(variant)], env=env)
    assert result.returncode == 1
    assert failed in result.stderr and "ipv4 rules restored" in result.stderr
    assert normalized_save(iptables_save(pod, tool(variant), 4)) == normalized_save(before)
    if variant == "libiptc":
        assert iptables_save(pod, "legacy", 6) == before_v6  # the refused table was never committed


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_table_refused_mid_payload_rolls_back_the_tables_before_it(pod: Pod, variant: str, tmp_path: Path) -> None:
    for family in (4, 6):
        add_foreign_rules(pod, variant, family)
    if variant == "libiptc":
        # The last table of the IPv4 payload (raw) is refused, after mangle and nat committed.
        refuse_table(pod, 4, "raw")
        env, refused = {}, REFUSED_BY_LIBIPTC
    else:
        # The last table of the IPv4 payload (nat) gets a rule the kernel refuses, after mangle and raw committed.
        bad = '{ sed "$ d"; echo "-A ISTIO_OUTPUT -j NO_SUCH_CHAIN_X"; echo COMMIT; } | "$REAL" "$@"'
        env, refused = wrapper(tmp_path, f"iptables-{variant}-restore", bad, once=True), "NO_SUCH_CHAIN_X"
    before = {family: iptables_save(pod, tool(variant), family) for family in (4, 6)}
    result = run_cli(pod, [*EVERYTHING, *backend_flags(variant)], env=env)
    assert result.returncode == 1
    assert refused in result.stderr
    for family in (4, 6):
        assert normalized_save(iptables_save(pod, tool(variant), family)) == normalized_save(before[family])
    assert "lookup 133" not in pod.run(["ip", "rule"]).stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_reconcile_failure_keeps_the_old_configuration(pod: Pod, variant: str, tmp_path: Path) -> None:
    assert run_cli(pod, [*INIT_FLAGS, "--no-ipv6", *backend_flags(variant)]).returncode == 0
    if variant == "libiptc":
        refuse_table(pod, 4, "nat")  # after mangle committed
        env = {}
    else:
        refusal = 'echo "iptables-restore: line 3 failed" >&2; exit 1'
        env = wrapper(tmp_path, f"iptables-{variant}-restore", refusal, once=True)
    old = iptables_save(pod, tool(variant), 4)
    result = run_cli(pod, [*EVERYTHING[:-1], "--no-ipv6", *backend_flags(variant)], env=env)
    assert result.returncode == 1
    if variant == "libiptc":
        assert REFUSED_BY_LIBIPTC in result.stderr and "ipv4 rules restored" in result.stderr
    assert normalized_save(iptables_save(pod, tool(variant), 4)) == normalized_save(old)


def test_missing_binary_is_named_and_changes_nothing(pod: Pod, tmp_path: Path) -> None:
    add_foreign_rules(pod, "nft", 4)
    before = iptables_save(pod, "nft", 4)
    # Everything but ip6tables-nft-restore: IPv4 applies, IPv6 cannot, IPv4 is put back.
    for name in ("iptables-nft-save", "iptables-nft-restore", "ip6tables-nft-save", "iptables-legacy-save"):
        (tmp_path / name).symlink_to(str(shutil.which(name)))
    result = run_cli(pod, [*INIT_FLAGS, "--ipv6"], env={"PATH": str(tmp_path)})
    assert result.returncode == 1
    assert "ip6tables-nft-restore not found" in result.stderr
    assert iptables_save(pod, "nft", 4) == before


@pytest.mark.parametrize("variant", VARIANTS)
def test_refused_ip_rule_rolls_back_the_rules(pod: Pod, variant: str) -> None:
    before = {family: iptables_save(pod, tool(variant), family) for family in (4, 6)}
    # With IPv6 disabled on lo, its IPv6 routes cannot be added: the routing step fails after the rules.
    pod.run(["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"])
    result = run_cli(pod, [*EVERYTHING, *backend_flags(variant)])
    assert result.returncode == 1
    assert "cannot add" in result.stderr and "(ipv6)" in result.stderr
    for family in (4, 6):
        assert normalized_save(iptables_save(pod, tool(variant), family)) == normalized_save(before[family])
    assert "lookup 133" not in pod.run(["ip", "rule"]).stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_killed_at_any_point_each_table_is_old_or_new_and_a_rerun_completes(
    pod: Pod, variant: str, tmp_path: Path
) -> None:
    flags = [*EVERYTHING, *backend_flags(variant)]
    assert run_cli(pod, [*INIT_FLAGS, "--ipv6", *backend_flags(variant)]).returncode == 0
    old = {family: iptables_save(pod, tool(variant), family) for family in (4, 6)}
    assert run_cli(pod, flags).returncode == 0
    new = {family: iptables_save(pod, tool(variant), family) for family in (4, 6)}
    rng = random.Random(20261125)
    for _ in range(6):
        assert run_cli(pod, [*INIT_FLAGS, "--ipv6", *backend_flags(variant)]).returncode == 0
        process = subprocess.Popen(
            [CLI, "--network-namespace", pod.name, *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        for family in (4, 6):
            for table, text in tables_of(iptables_save(pod, tool(variant), family)).items():
                assert text in (tables_of(old[family]).get(table), tables_of(new[family]).get(table)), (family, table)
        assert run_cli(pod, flags).returncode == 0
        for family in (4, 6):
            assert normalized_save(iptables_save(pod, tool(variant), family)) == normalized_save(new[family])


def tables_of(saved: str) -> dict[str, str]:
    tables: dict[str, str] = {}
    current = ""
    for line in normalized_save(saved).splitlines():
        if line.startswith("*"):
            current = line
            tables[current] = ""
        elif current:
            tables[current] += line + "\n"
    return tables


@pytest.mark.parametrize("variant", VARIANTS)
def test_twenty_concurrent_runs_end_in_one_consistent_state(pod: Pod, variant: str) -> None:
    flags = [*INIT_FLAGS, "--ipv6", *backend_flags(variant)]
    assert run_cli(pod, flags).returncode == 0
    expected = {family: normalized_save(iptables_save(pod, tool(variant), family)) for family in (4, 6)}
    assert run_cli(pod, [*INIT_FLAGS, "--no-ipv6", "--cleanup-only", *backend_flags(variant)]).returncode == 0
    processes = [
        subprocess.Popen(
            [CLI, "--network-namespace", pod.name, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(20)
    ]
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 20, results
    for family in (4, 6):
        assert normalized_save(iptables_save(pod, tool(variant), family)) == expected[family]


# ---- validation --------------------------------------------------------------------------------------


def test_validation_passes_after_apply_and_as_the_proxy_user(pod: Pod) -> None:
    result = run_cli(pod, [*INIT_FLAGS, "--no-ipv6", "--run-validation"])
    assert result.returncode == 0, result.stderr
    assert "Validation passed" in result.stderr
    as_proxy_user = ["setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups"]
    as_proxy = pod.run(
        [*as_proxy_user, CLI, *INIT_FLAGS, "--no-ipv6", "--skip-rule-apply", "--run-validation"], check=False
    )
    assert as_proxy.returncode == 0, as_proxy.stderr


def test_validation_fails_with_126_without_rules(pod: Pod) -> None:
    started = time.monotonic()
    result = run_cli(pod, [*INIT_FLAGS, "--no-ipv6", "--skip-rule-apply", "--run-validation", "--probe-timeout", "1s"])
    assert result.returncode == 126
    assert "validation timeout" in result.stderr
    assert time.monotonic() - started < 10


def test_nothing_is_ever_written_to_the_test_runner_namespace() -> None:
    for variant in TOOLS:
        for family in (4, 6):
            binary = f"{'ip6tables' if family == 6 else 'iptables'}-{variant}-save"
            saved = subprocess.run([binary], capture_output=True, text=True, check=False).stdout
            assert "ISTIO_" not in saved, (binary, sys.argv)


# ---- non-root, as the init container image runs -------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_applies_as_non_root_with_only_net_admin_and_net_raw(pod: Pod, variant: str) -> None:
    """As the image's user, with only NET_ADMIN and NET_RAW (``as_image_user``): TPROXY, both families."""
    with as_image_user(pod) as run_as_image_user:
        flags = [*EVERYTHING, *backend_flags(variant)]
        result = run_as_image_user(flags)
        assert result.returncode == 0, result.stderr
        assert "ISTIO_TPROXY" in iptables_save(pod, tool(variant), 6)
        assert "fwmark 0x539 lookup 133" in pod.run(["ip", "rule"]).stdout
        again = run_as_image_user(flags)
        assert again.returncode == 0 and "nothing to change" in again.stderr, again.stderr


def test_an_apply_loads_the_native_and_ipset_code_only_when_it_needs_it(pod: Pod) -> None:
    """The init container's start-up is mostly imports: a plain apply loads neither the native nftables
    backend nor the ipset one, which it needs only for match sets and to remove a --native-nftables copy."""
    optional = ["istio_iptables.backends.ipset", "istio_iptables.backends.nft", "istio_iptables.state.nft"]
    probe = (
        "import sys\nfrom istio_iptables.cli import fast\n"
        "try: fast.main(sys.argv[1:])\nexcept SystemExit as end: assert end.code == 0, end.code\n"
        f"print(' '.join(name for name in {optional!r} if name in sys.modules))"
    )

    def loaded(*flags: str) -> list[str]:
        argv = [sys.executable, "-c", probe, "--network-namespace", pod.name, *INIT_FLAGS, "--no-ipv6", *flags]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert loaded() == []
    assert loaded("--match-sets") == ["istio_iptables.backends.ipset"]
    assert loaded("--native-nftables") == ["istio_iptables.backends.nft", "istio_iptables.state.nft"]
    # An iptables run after a native one removes the native copy: only then the native code.
    assert loaded() == ["istio_iptables.backends.nft", "istio_iptables.state.nft"]
    assert loaded() == []
