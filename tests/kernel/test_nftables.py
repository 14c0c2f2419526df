"""The native nftables backend (``--native-nftables``) on the real kernel, in namespaces the tests create.

Apply, re-run, drift, clean-up, failures, concurrency, every golden configuration one after another, and the
switch between iptables and native nftables with connections flowing. Every ``nft`` that changes something
runs inside a test namespace (``ip netns exec``); the CLI enters its namespace itself.
"""

from __future__ import annotations

import grp
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.golden.cases import CASES
from tests.kernel import netlab
from tests.kernel.namespaces import CLI, Pod, as_image_user, iptables_save, needs_root, normalized_save, run_cli
from tests.kernel.test_apply import EVERYTHING, INIT_FLAGS, add_foreign_rules, wrapper

pytestmark = [
    pytest.mark.kernel,
    needs_root,
    pytest.mark.skipif(shutil.which("nft") is None, reason="the native nftables tests need nft (nftables)"),
]

NATIVE = "--native-nftables"
OUR_TABLES = ("istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw")
FOREIGN_NFT = """\
table inet firewall {
    chain input { type filter hook input priority 0 ; policy accept ; tcp dport 9999 counter accept ; }
    chain output { type filter hook output priority 10 ; meta skuid 4242 counter drop ; }
}
table ip6 other {
    chain c { ip6 daddr 2001:db8:9::9 counter return ; }
}
"""


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def ruleset(pod: Pod, handles: bool = False) -> str:
    """``nft list ruleset`` without counters (traffic moves them); with ``handles``, rule handles too, which
    change whenever a transaction rewrites a table, so an equal listing proves nothing was written."""
    return pod.run(["nft", "-s", *(["-a"] if handles else []), "list", "ruleset"]).stdout


def our_tables(pod: Pod) -> list[str]:
    listing = pod.run(["nft", "list", "tables"]).stdout
    return [name for name in OUR_TABLES if f"table inet {name}\n" in listing + "\n"]


def routing(pod: Pod) -> str:
    """Our part of routing: ip rules, the routes of table 133, and lo's IPv6 addresses."""
    listings = [pod.run(["ip", *arguments], check=False).stdout for arguments in (["rule"], ["-6", "rule"])]
    listings += [
        pod.run(["ip", *family, "route", "show", "table", "133"], check=False).stdout for family in ([], ["-6"])
    ]
    lo = pod.run(["ip", "-6", "addr", "show", "dev", "lo"]).stdout
    return "".join(listings) + "".join(line + "\n" for line in lo.splitlines() if "inet6" in line)


def native(pod: Pod, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(pod, [NATIVE, *flags], env)


# ---- apply, re-run, drift ------------------------------------------------------------------------------


def test_apply_then_rerun_writes_nothing(pod: Pod) -> None:
    first = native(pod, *EVERYTHING)
    assert first.returncode == 0, first.stderr
    assert our_tables(pod) == list(OUR_TABLES)
    listing = ruleset(pod)
    assert "tproxy ip to :15006 meta mark set 0x00000539 counter accept" in listing
    assert "fwmark 0x539 lookup 133" in pod.run(["ip", "rule"]).stdout
    applied = ruleset(pod, handles=True)

    again = native(pod, *EVERYTHING)
    assert again.returncode == 0, again.stderr
    assert "nothing to change" in again.stderr
    assert ruleset(pod, handles=True) == applied  # not even an identical rewrite

    status = native(pod, *EVERYTHING, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "inet (native nftables): in sync" in status.stdout


def test_every_golden_configuration_converges_from_the_one_before(pod: Pod) -> None:
    """Each golden case applied natively over the previous one: one run reaches the plan exactly (status in
    sync, a re-run writes nothing), so the parser reads back every rule form the renderer writes."""
    applied = 0
    for name, argv in CASES:
        flags = [arg for arg in argv if arg != "--dry-run"]
        groups = [value for option, value in itertools.pairwise(flags) if option.startswith("--outbound-owner-groups")]
        if "--dry-run-format" in flags or any(_unknown_group(value) for value in groups):
            continue
        result = native(pod, *flags)
        assert result.returncode == 0, (name, result.stderr)
        status = native(pod, *flags, "status")
        assert status.returncode == 0, (name, status.stdout)
        handles = ruleset(pod, handles=True)
        again = native(pod, *flags)
        assert again.returncode == 0 and "nothing to change" in again.stderr, (name, again.stderr)
        assert ruleset(pod, handles=True) == handles, name
        applied += 1
    assert applied >= 20


def _unknown_group(argument: str) -> bool:
    """A group name the host does not know: nft (as iptables) refuses it."""
    known = {group.gr_name for group in grp.getgrall()}
    return any(name and not name.isdigit() and name not in known for name in argument.split(","))


def test_drift_is_repaired_by_default_and_refused_with_no_reconcile(pod: Pod) -> None:
    flags = [*INIT_FLAGS, "--ipv6"]
    assert native(pod, *flags).returncode == 0
    planned = ruleset(pod)
    table = ["inet", "istio-proxy-nat"]
    listing = pod.run(["nft", "-a", "list", "chain", *table, "istio-inbound"]).stdout
    handle = re.search(r"tcp dport 15021 .*# handle (\d+)", listing)
    assert handle is not None, listing
    pod.run(["nft", "delete", "rule", *table, "istio-inbound", "handle", handle[1]])
    pod.run(["nft", "insert", "rule", *table, "istio-output", "ip", "daddr", "198.19.0.0/24", "return"])
    pod.run(["nft", "add", "chain", *table, "leftover"])
    pod.run(["nft", "add", "rule", *table, "leftover", "log", "prefix", '"x"', "accept"])
    # A table of ours that this plan does not use (no DNS: no raw table), with a hooked chain.
    raw = "inet istio-proxy-raw"
    pod.run(["nft", f"add table {raw}; add chain {raw} output {{ type filter hook output priority 5 ; }}"])
    drifted = ruleset(pod, handles=True)

    refused = native(pod, *flags, "--no-reconcile")
    assert refused.returncode == 1
    assert "--- expected" in refused.stderr and "+++ live" in refused.stderr
    assert "-  meta l4proto tcp tcp dport 15021 counter return" in refused.stderr
    assert '+  log {"prefix":"x"} accept' in refused.stderr
    assert ruleset(pod, handles=True) == drifted

    status = native(pod, *flags, "status")
    assert status.returncode == 1
    assert "missing  nat istio-inbound: meta l4proto tcp tcp dport 15021 counter return" in status.stdout
    assert "extra    nat istio-output: ip daddr 198.19.0.0/24 counter return" in status.stdout

    repaired = native(pod, *flags)
    assert repaired.returncode == 0, repaired.stderr
    assert ruleset(pod) == planned
    assert native(pod, *flags, "status").returncode == 0


def test_a_changed_hook_is_rebuilt(pod: Pod) -> None:
    assert native(pod, *INIT_FLAGS, "--no-ipv6").returncode == 0
    planned = ruleset(pod)
    pod.run(["nft", "add chain inet istio-proxy-nat output { type nat hook output priority -100 ; policy drop ; }"])
    assert "policy drop" in ruleset(pod)
    result = native(pod, *INIT_FLAGS, "--no-ipv6")
    assert result.returncode == 0, result.stderr
    assert ruleset(pod) == planned


def test_match_sets_round_trip_and_a_changed_set_is_repaired(pod: Pod) -> None:
    flags = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT"]
    flags += ["-i", "10.0.0.0/8,10.1.0.0/16,fd00::/8", "-x", "192.168.0.0/25,192.168.0.128/25"]
    flags += ["-b", "80,81", "-d", "15090", "-o", "5432,5433", "-q", "25", "--ipv6", "--match-sets"]
    assert native(pod, *flags).returncode == 0
    listing = ruleset(pod)
    assert "ip daddr @istio-exclude-cidr4" in listing and "192.168.0.0/24" in listing  # merged by nft
    assert native(pod, *flags, "status").returncode == 0
    handles = ruleset(pod, handles=True)
    again = native(pod, *flags)
    assert again.returncode == 0 and "nothing to change" in again.stderr, again.stderr
    assert ruleset(pod, handles=True) == handles

    pod.run(["nft", "add", "element", "inet", "istio-proxy-nat", "istio-outbound-ports", "{ 26 }"])
    status = native(pod, *flags, "status")
    assert status.returncode == 1 and "@istio-outbound-ports: type inet_service elements { 25, 26 }" in status.stdout
    assert native(pod, *flags).returncode == 0
    assert ruleset(pod) == listing


# ---- clean-up ------------------------------------------------------------------------------------------


def test_cleanup_removes_our_tables_routes_and_address_only(pod: Pod) -> None:
    pod.run(["nft", "-f", "-"], stdin=FOREIGN_NFT)
    for family in (4, 6):
        add_foreign_rules(pod, "nft", family)
        add_foreign_rules(pod, "legacy", family)
    before = ruleset(pod)
    before_legacy = {family: iptables_save(pod, "legacy", family) for family in (4, 6)}
    routing_before = routing(pod)

    assert native(pod, *EVERYTHING).returncode == 0
    assert our_tables(pod) == list(OUR_TABLES)
    # Clean-up with other flags than the install's: the state decides.
    cleaned = native(pod, *INIT_FLAGS, "--no-ipv6", "--cleanup-only")
    assert cleaned.returncode == 0, cleaned.stderr
    assert ruleset(pod) == before
    assert {family: iptables_save(pod, "legacy", family) for family in (4, 6)} == before_legacy
    assert routing(pod) == routing_before

    again = native(pod, *INIT_FLAGS, "--cleanup-only")
    assert again.returncode == 0 and "nothing to change" in again.stderr, again.stderr


# ---- failures leave no trace ----------------------------------------------------------------------------


def nft_wrapper(directory: Path, script: str) -> dict[str, str]:
    """A stand-in ``nft``, first on PATH: ``script`` (with the real binary as $REAL) handles ``nft -f -``, the
    transaction; everything else (listing, the rollback's ``nft -j -f -``) goes to the real binary."""
    real = shutil.which("nft")
    path = directory / "nft"
    path.write_text(f'#!/bin/sh\nREAL={real}\n[ "$*" = "-f -" ] || exec "$REAL" "$@"\n{script}\n')
    path.chmod(0o755)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


def test_a_refused_transaction_changes_nothing(pod: Pod, tmp_path: Path) -> None:
    assert native(pod, *INIT_FLAGS, "--ipv6").returncode == 0
    before, routing_before = ruleset(pod, handles=True), routing(pod)
    # The kernel refuses the last line at commit (TPROXY in a nat output chain), after the others were taken.
    bad = "add rule inet istio-proxy-nat output meta l4proto tcp tproxy ip to :1"
    env = nft_wrapper(tmp_path, f'{{ cat; echo "{bad}"; }} | "$REAL" -f -')
    result = native(pod, *EVERYTHING, env=env)
    assert result.returncode == 1
    assert "Could not process rule" in result.stderr and "nothing was changed" in result.stderr
    assert ruleset(pod, handles=True) == before
    assert routing(pod) == routing_before


@pytest.mark.parametrize("start", ["empty", "older-configuration"])
def test_a_failed_route_step_rolls_the_tables_back(pod: Pod, start: str) -> None:
    pod.run(["nft", "-f", "-"], stdin=FOREIGN_NFT)
    if start == "older-configuration":
        assert native(pod, *INIT_FLAGS, "--no-ipv6").returncode == 0
    # With IPv6 disabled on lo, its IPv6 routes cannot be added: the routing step fails after the transaction.
    pod.run(["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"])
    before, routing_before = ruleset(pod), routing(pod)
    result = native(pod, *EVERYTHING)
    assert result.returncode == 1
    assert "cannot add" in result.stderr and "nftables tables restored" in result.stderr
    assert ruleset(pod) == before
    assert routing(pod) == routing_before


def test_missing_nft_binary_or_nf_tables_is_named(pod: Pod, tmp_path: Path) -> None:
    no_nft = tmp_path / "bin"
    no_nft.mkdir()
    for name in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"):
        (no_nft / name).symlink_to(str(shutil.which(name)))
    result = native(pod, *INIT_FLAGS, env={"PATH": str(no_nft)})
    assert result.returncode == 1
    assert "--native-nftables needs the nft binary" in result.stderr

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "nft").write_text(
        "#!/bin/sh\necho 'netlink: Error: cache initialization failed: Operation not supported' >&2\nexit 1\n"
    )
    (fake / "nft").chmod(0o755)
    result = native(pod, *INIT_FLAGS, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert result.returncode == 1
    assert "the kernel offers no nf_tables" in result.stderr
    preflight = native(pod, *INIT_FLAGS, "preflight", env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert preflight.returncode == 1 and "the kernel offers no nf_tables" in preflight.stdout


def test_preflight_probes_what_the_transaction_needs(pod: Pod) -> None:
    add_foreign_rules(pod, "nft", 4)
    before = ruleset(pod, handles=True)
    result = native(pod, *EVERYTHING, "preflight")
    assert result.returncode == 0, result.stdout + result.stderr
    for feature in ("tproxy (nft_tproxy)", "redirect (nft_redir)", "conntrack zones (nft_ct)", "route chains"):
        assert f"ok      {feature}" in result.stdout
    assert "ip nat OUTPUT: hook output priority -100" in result.stdout  # iptables-nft's chain, beside ours
    assert ruleset(pod, handles=True) == before  # the probes left nothing, not even a rewritten table


@pytest.mark.parametrize("seed", [20261125])
def test_killed_at_any_point_the_tables_are_old_or_new(pod: Pod, seed: int) -> None:
    old_flags, new_flags = [*INIT_FLAGS, "--ipv6"], EVERYTHING
    assert native(pod, *old_flags).returncode == 0
    old = ruleset(pod)
    assert native(pod, *new_flags).returncode == 0
    new = ruleset(pod)
    rng = random.Random(seed)
    for _ in range(6):
        assert native(pod, *old_flags).returncode == 0
        process = subprocess.Popen(
            [CLI, "--network-namespace", pod.name, *new_flags, NATIVE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        assert ruleset(pod) in (old, new)
        assert native(pod, *new_flags).returncode == 0
        assert ruleset(pod) == new


def test_twenty_concurrent_runs_end_in_one_consistent_state(pod: Pod) -> None:
    flags = [*EVERYTHING, NATIVE]
    assert run_cli(pod, flags).returncode == 0
    expected, expected_routing = ruleset(pod), routing(pod)
    assert native(pod, *INIT_FLAGS, "--cleanup-only").returncode == 0
    processes = [
        subprocess.Popen(
            [CLI, "--network-namespace", pod.name, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(20)
    ]
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0] * 20, results
    assert sum("committed one transaction" in stderr for _, stderr in results) == 1
    assert ruleset(pod) == expected
    assert routing(pod) == expected_routing


# ---- switching between iptables and native nftables --------------------------------------------------------


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_switching_keeps_exactly_one_copy(pod: Pod, variant: str) -> None:
    iptables = ["--force-iptables-binary", variant]
    for family in (4, 6):
        add_foreign_rules(pod, variant, family)
    foreign = {family: normalized_save(iptables_save(pod, variant, family)) for family in (4, 6)}
    assert run_cli(pod, [*EVERYTHING, *iptables]).returncode == 0
    installed = {family: normalized_save(iptables_save(pod, variant, family)) for family in (4, 6)}

    to_native = native(pod, *EVERYTHING)
    assert to_native.returncode == 0, to_native.stderr
    assert our_tables(pod) == list(OUR_TABLES)
    assert {family: normalized_save(iptables_save(pod, variant, family)) for family in (4, 6)} == foreign
    assert native(pod, *EVERYTHING, "status").returncode == 0

    back = run_cli(pod, [*EVERYTHING, *iptables])
    assert back.returncode == 0, back.stderr
    assert our_tables(pod) == []
    assert {family: normalized_save(iptables_save(pod, variant, family)) for family in (4, 6)} == installed
    assert run_cli(pod, [*EVERYTHING, *iptables, "status"]).returncode == 0


def test_no_reconcile_refuses_to_switch(pod: Pod) -> None:
    assert run_cli(pod, [*INIT_FLAGS, "--no-ipv6", "--force-iptables-binary", "nft"]).returncode == 0
    saved = iptables_save(pod, "nft", 4)
    refused = native(pod, *INIT_FLAGS, "--no-ipv6", "--no-reconcile")
    assert refused.returncode == 1 and "a copy an iptables run left" in refused.stderr
    assert our_tables(pod) == [] and iptables_save(pod, "nft", 4) == saved
    assert native(pod, *INIT_FLAGS, "--no-ipv6").returncode == 0
    refused = run_cli(pod, [*INIT_FLAGS, "--no-ipv6", "--force-iptables-binary", "nft", "--no-reconcile"])
    assert refused.returncode == 1 and "--native-nftables run are present" in refused.stderr
    assert our_tables(pod) == ["istio-proxy-nat"]


def test_iptables_cleanup_also_removes_our_nft_tables(pod: Pod) -> None:
    assert native(pod, *EVERYTHING).returncode == 0
    result = run_cli(pod, [*INIT_FLAGS, "--cleanup-only"])
    assert result.returncode == 0, result.stderr
    assert our_tables(pod) == []


@pytest.mark.parametrize(
    ("variant", "mode"),
    [
        ("legacy", "REDIRECT"),
        ("nft", "REDIRECT"),
        ("legacy", "TPROXY"),
        ("nft", "TPROXY"),
    ],
)
def test_switching_under_load_never_drops_or_bypasses(lab: netlab.Lab, variant: str, mode: str) -> None:
    """Connections flow, outbound from the app and inbound from the peer, while the namespace switches from
    iptables to native nftables and back, three times: every one is answered through the proxy."""
    app = lab.echo(lab.pod, "app", [8080], uid=netlab.APP_UID)
    peer = lab.echo(lab.peer, "peer", [8080])
    proxy = lab.proxy(tproxy=mode == "TPROXY")
    lab.wait_ready(app, peer, proxy)
    args = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", mode, "-i", "*", "-x", "", "-b", "*"]
    args += ["-d", "15090,15021,15020"]
    netlab.apply_capture(lab, args, variant)
    stop = lab.tmp / "stop-loops"
    loops = [
        lab.actor(lab.pod, "clientloop", netlab.PEER4, "8080", "--stop", str(stop), name="out", uid=netlab.APP_UID),
        lab.actor(lab.peer, "clientloop", netlab.POD4, "8080", "--stop", str(stop), name="in"),
    ]
    deadline = time.monotonic() + 90
    for _ in range(3):
        netlab.apply_capture(lab, args, "native")
        assert "istio-proxy-nat" in lab.sh(lab.pod, ["nft", "list", "tables"])
        assert "ISTIO" not in lab.sh(lab.pod, [f"iptables-{variant}-save"])
        netlab.apply_capture(lab, args, variant)
        assert "istio-proxy" not in lab.sh(lab.pod, ["nft", "list", "tables"])
        assert "ISTIO_OUTPUT" in lab.sh(lab.pod, [f"iptables-{variant}-save"])
        assert time.monotonic() < deadline
    stop.touch()
    for loop in loops:
        loop.popen.wait(timeout=30)
        summary = json.loads(loop.stdout.read_text())
        assert summary["total"] >= 10, (loop.name, summary)
        assert summary["failed"] == 0 and summary["direct"] == 0, (loop.name, summary)


def test_an_nft_killed_after_committing_leaves_our_tables_as_before(pod: Pod, tmp_path: Path) -> None:
    """A Ctrl-C to the process group can kill nft after the kernel took its batch: its exit status says
    failure, yet the tables changed. The run must still end as it started."""
    assert native(pod, *INIT_FLAGS, "--ipv6").returncode == 0
    before, routing_before = ruleset(pod), routing(pod)
    env = nft_wrapper(tmp_path, '"$REAL" -f - && kill -INT $$')
    result = native(pod, *EVERYTHING, env=env)
    assert result.returncode == 1, result.stderr
    assert "nft -f - was killed by signal 2; our tables were put back as listed" in result.stderr, result.stderr
    assert ruleset(pod) == before
    assert routing(pod) == routing_before


def refusing(directory: Path, tool: str, pattern: str) -> dict[str, str]:
    """A stand-in ``tool`` (``nft`` or a restore binary) that refuses any transaction or --noflush payload
    holding ``pattern`` and hands every other one to the real binary."""
    refuse = f'case "$payload" in *"{pattern}"*) echo "line 2 failed: refused for the test" >&2; exit 1;; esac'
    if tool == "nft":
        return nft_wrapper(directory, f'payload=$(cat)\n{refuse}\nprintf "%s\\n" "$payload" | "$REAL" -f -')
    return wrapper(directory, tool, f'payload=$(cat)\n{refuse}\nprintf "%s\\n" "$payload" | "$REAL" "$@"')


# A TPROXY switch takes four steps (docs/capture.md, "Switching backends"); whichever fails, the old copy stays whole.
TO_NATIVE_STEPS = {
    "old copy's save-mark out": ("iptables-legacy-restore", "--save-mark"),
    "new copy in": ("nft", "flush table"),
    "old copy out": ("ip6tables-legacy-restore", "-X ISTIO"),
    "new copy's save-mark in": ("nft", "ct mark set mark"),
}
TO_IPTABLES_STEPS = {
    "old copy's save-mark out": ("nft", "delete rule"),
    "new copy in": ("ip6tables-legacy-restore", "ISTIO_DIVERT"),
    "old copy out": ("nft", "delete table"),
    "new copy's save-mark in": ("ip6tables-legacy-restore", "--save-mark"),
}
LEGACY = ["--force-iptables-binary", "legacy"]


def saves(pod: Pod) -> dict[int, str]:
    return {family: normalized_save(iptables_save(pod, "legacy", family)) for family in (4, 6)}


@pytest.mark.parametrize("step", TO_NATIVE_STEPS)
def test_a_failed_tproxy_switch_to_native_leaves_the_iptables_copy_whole(pod: Pod, tmp_path: Path, step: str) -> None:
    assert run_cli(pod, [*EVERYTHING, *LEGACY]).returncode == 0
    before, before_nft, routing_before = saves(pod), ruleset(pod), routing(pod)
    assert all("--save-mark" in saved for saved in before.values())
    result = native(pod, *EVERYTHING, env=refusing(tmp_path, *TO_NATIVE_STEPS[step]))
    assert result.returncode == 1 and "refused for the test" in result.stderr, result.stderr
    nft_written = step in ("old copy out", "new copy's save-mark in")
    assert ("nftables tables restored" in result.stderr) == nft_written, result.stderr
    assert saves(pod) == before
    assert ruleset(pod) == before_nft and our_tables(pod) == []
    assert routing(pod) == routing_before


@pytest.mark.parametrize("step", TO_IPTABLES_STEPS)
def test_a_failed_tproxy_switch_to_iptables_leaves_the_nft_copy_whole(pod: Pod, tmp_path: Path, step: str) -> None:
    assert run_cli(pod, [*EVERYTHING, *LEGACY]).returncode == 0  # legacy's tables exist, as after a switch
    assert native(pod, *EVERYTHING).returncode == 0
    before, before_nft, routing_before = saves(pod), ruleset(pod), routing(pod)
    assert "ct mark set meta mark" in before_nft and "ISTIO" not in "".join(before.values())
    result = run_cli(pod, [*EVERYTHING, *LEGACY], env=refusing(tmp_path, *TO_IPTABLES_STEPS[step]))
    assert result.returncode == 1 and "refused for the test" in result.stderr, result.stderr
    assert saves(pod) == before
    assert ruleset(pod) == before_nft and our_tables(pod) == list(OUR_TABLES)
    assert routing(pod) == routing_before


def test_nothing_of_ours_in_the_test_runner_namespace() -> None:
    listing = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    assert "istio-proxy" not in listing


def test_applies_as_non_root_with_only_net_admin_and_net_raw(pod: Pod) -> None:
    """As the image's user, with only NET_ADMIN and NET_RAW (``as_image_user``; see test_apply's twin)."""
    with as_image_user(pod) as run_as_image_user:
        result = run_as_image_user([NATIVE, *EVERYTHING])
        assert result.returncode == 0, result.stderr
        assert our_tables(pod) == list(OUR_TABLES)
        again = run_as_image_user([NATIVE, *EVERYTHING])
        assert again.returncode == 0 and "nothing to change" in again.stderr, again.stderr
