"""The libiptc backend (python-iptables) on the real kernel: restore semantics, line by line, in namespaces.

python-iptables acts on the network namespace of the process that calls it, so every restore here runs in a
fresh interpreter started inside the test's namespace (``ip netns exec``); the test runner never imports
iptc. The CLI tests of ``--backend libiptc`` live in test_apply.py beside the other backends.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.namespaces import Pod, iptables_save, needs_root, run_cli

needs_python_iptables = pytest.mark.skipif(
    importlib.util.find_spec("iptc") is None,
    reason="python-iptables is not installed: pip install '.[libiptc]' (the dev extra has it)",
)
pytestmark = [pytest.mark.kernel, needs_root, needs_python_iptables]

# Runs inside the namespace: one Libiptc.restore of stdin, an ApplyError on stderr with exit status 1.
RESTORE = """
import sys
from istio_iptables.backends.libiptc import Libiptc
from istio_iptables.capture.config import IptablesVariant
from istio_iptables.errors import ApplyError
from istio_iptables.capture.model import Family

family, lock = Family(int(sys.argv[1])), sys.argv[2]
backend = Libiptc(family, IptablesVariant.LEGACY, "", {"XTABLES_LOCKFILE": lock})
for payload in sys.stdin.read().split("\\n---\\n"):
    try:
        backend.restore(payload)
    except ApplyError as error:
        print(error, file=sys.stderr)
        sys.exit(1)
"""


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def restore(pod: Pod, payload: str, tmp_path: Path, family: int = 4) -> subprocess.CompletedProcess[str]:
    """Payloads separated by a ``---`` line are restored one after the other by one process."""
    arguments = [sys.executable, "-c", RESTORE, str(family)]
    return pod.run([*arguments, str(tmp_path / "xtables.lock")], stdin=payload, check=False)


def rules(pod: Pod, table: str, family: int = 4) -> list[str]:
    """The rule and chain lines of one legacy table."""
    saved = iptables_save(pod, "legacy", family)
    lines, inside = [], False
    for line in saved.splitlines():
        if line.startswith("*"):
            inside = line == f"*{table}"
        elif inside and line.startswith(("-A", ":")):
            lines.append(line)
    return lines


def test_chains_are_created_flushed_when_declared_again_and_deleted(pod: Pod, tmp_path: Path) -> None:
    first = "*filter\n:ISTIO_A - [0:0]\n-A ISTIO_A -p tcp --dport 1 -j ACCEPT\n-A ISTIO_A -j RETURN\nCOMMIT\n"
    assert restore(pod, first, tmp_path).returncode == 0
    assert rules(pod, "filter")[-3:] == [
        ":ISTIO_A - [0:0]",
        "-A ISTIO_A -p tcp -m tcp --dport 1 -j ACCEPT",
        "-A ISTIO_A -j RETURN",
    ]
    # Declared again (--noflush): emptied, not duplicated, and refilled.
    again = "* filter\n:ISTIO_A - [0:0]\n-N ISTIO_B\n-A ISTIO_A -j ISTIO_B\n-A ISTIO_B -j DROP\nCOMMIT\n"
    assert restore(pod, again, tmp_path).returncode == 0
    assert [line for line in rules(pod, "filter") if "ISTIO" in line] == [
        ":ISTIO_A - [0:0]",
        ":ISTIO_B - [0:0]",
        "-A ISTIO_A -j ISTIO_B",
        "-A ISTIO_B -j DROP",
    ]
    # A chain still referenced, or holding rules, cannot go (as with iptables); emptied first, both can.
    referenced = restore(pod, "*filter\n-X ISTIO_B\nCOMMIT\n", tmp_path)
    assert referenced.returncode == 1
    assert "table filter, line 2: -X ISTIO_B" in referenced.stderr
    not_empty = restore(pod, "*filter\n:ISTIO_A - [0:0]\n-X ISTIO_B\nCOMMIT\n", tmp_path)
    assert not_empty.returncode == 1 and "line 3: -X ISTIO_B: can't delete chain ISTIO_B" in not_empty.stderr
    gone = "*filter\n:ISTIO_A - [0:0]\n:ISTIO_B - [0:0]\n-X ISTIO_B\n-X ISTIO_A\nCOMMIT\n"
    assert restore(pod, gone, tmp_path).returncode == 0
    assert not [line for line in rules(pod, "filter") if "ISTIO" in line]
    # -N of an existing chain is refused, as iptables-restore refuses it.
    assert restore(pod, "*filter\n-N INPUT\nCOMMIT\n", tmp_path).returncode == 1


def test_insert_positions(pod: Pod, tmp_path: Path) -> None:
    payload = (
        "*nat\n:ISTIO_X - [0:0]\n-A ISTIO_X -s 198.18.0.1/32 -j RETURN\n-A ISTIO_X -s 198.18.0.3/32 -j RETURN\n"
        "-I ISTIO_X 2 -s 198.18.0.2/32 -j RETURN\n-I ISTIO_X -s 198.18.0.0/32 -j RETURN\n"
        "-I ISTIO_X 5 -s 198.18.0.4/32 -j RETURN\nCOMMIT\n"
    )
    assert restore(pod, payload, tmp_path).returncode == 0
    assert [line.split()[3] for line in rules(pod, "nat") if line.startswith("-A ISTIO_X")] == [
        f"198.18.0.{number}/32" for number in range(5)
    ]
    too_far = restore(pod, "*nat\n-I ISTIO_X 9 -j RETURN\nCOMMIT\n", tmp_path)
    assert too_far.returncode == 1 and "line 2: -I ISTIO_X 9 -j RETURN" in too_far.stderr


def test_delete_removes_the_first_rule_equal_to_the_spec(pod: Pod, tmp_path: Path) -> None:
    payload = (
        "*mangle\n:ISTIO_X - [0:0]\n-A ISTIO_X -p tcp --dport 9 -j MARK --set-mark 7\n-A ISTIO_X -j RETURN\n"
        "-A ISTIO_X -p tcp --dport 9 -j MARK --set-mark 7\nCOMMIT\n"
    )
    assert restore(pod, payload, tmp_path).returncode == 0
    # In the kernel's spelling (as a transition payload writes it, from the save) or in Istio's: one rule.
    assert (
        restore(
            pod, "*mangle\n-D ISTIO_X -p tcp -m tcp --dport 9 -j MARK --set-xmark 0x7/0xffffffff\nCOMMIT\n", tmp_path
        ).returncode
        == 0
    )
    assert [line for line in rules(pod, "mangle") if line.startswith("-A ISTIO_X")] == [
        "-A ISTIO_X -j RETURN",
        "-A ISTIO_X -p tcp -m tcp --dport 9 -j MARK --set-xmark 0x7/0xffffffff",
    ]
    # A rule that differs in one value is not the same rule.
    missing = restore(pod, "*mangle\n-D ISTIO_X -p tcp --dport 9 -j MARK --set-mark 8\nCOMMIT\n", tmp_path)
    assert missing.returncode == 1
    assert "table mangle, line 2: -D ISTIO_X -p tcp --dport 9 -j MARK --set-mark 8" in missing.stderr
    assert restore(pod, "*mangle\n-D ISTIO_X -p tcp --dport 9 -j MARK --set-mark 7\nCOMMIT\n", tmp_path).returncode == 0
    assert [line for line in rules(pod, "mangle") if line.startswith("-A ISTIO_X")] == ["-A ISTIO_X -j RETURN"]


def test_a_builtin_chain_line_sets_its_policy_and_keeps_its_rules(pod: Pod, tmp_path: Path) -> None:
    """As iptables-restore --noflush: a built-in chain's line sets its policy and keeps its rules."""
    pod.run(["iptables-legacy", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "ACCEPT"])
    kept = (
        "*filter\n:ISTIO_X - [0:0]\n:FORWARD DROP [3:4]\n-A FORWARD -j ISTIO_X\nCOMMIT\n"
        "*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n"
    )
    assert restore(pod, kept, tmp_path).returncode == 0
    assert rules(pod, "filter") == [
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":ISTIO_X - [0:0]",
        "-A FORWARD -j ISTIO_X",
        "-A OUTPUT -p udp -m udp --dport 9999 -j ACCEPT",
    ]


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("-A ISTIO_X -j NO_SUCH_CHAIN_X", "NO_SUCH_CHAIN_X"),  # refused while building the rule
        ("-A ISTIO_X -p tcp -j TPROXY --on-port 1 --tproxy-mark 1/1", "COMMIT"),  # refused by the kernel at commit
        ("-A ISTIO_X -p tcp --no-such-option 1 -j RETURN", "--no-such-option"),
    ],
)
def test_a_refused_table_is_unchanged_and_later_tables_are_not_applied(
    pod: Pod, tmp_path: Path, bad: str, why: str
) -> None:
    before = iptables_save(pod, "legacy", 4)
    payload = (
        "*mangle\n:ISTIO_M - [0:0]\n-A ISTIO_M -j RETURN\nCOMMIT\n"
        f"*nat\n:ISTIO_X - [0:0]\n-A ISTIO_X -j RETURN\n{bad}\n-A OUTPUT -j ISTIO_X\nCOMMIT\n"
        "*raw\n:ISTIO_R - [0:0]\n-A ISTIO_R -j RETURN\nCOMMIT\n"
    )
    result = restore(pod, payload, tmp_path)
    assert result.returncode == 1
    number = 8 if why != "COMMIT" else 10
    assert f"table nat, line {number}:" in result.stderr and why in result.stderr, result.stderr
    if why == "COMMIT":
        assert "the kernel lacks" not in result.stderr  # TPROXY exists; it is the nat table that refuses it
    assert "ISTIO_M" in "".join(rules(pod, "mangle"))  # committed before the refused table, as iptables-restore
    assert not [line for line in rules(pod, "nat") if "ISTIO" in line]
    assert not [line for line in rules(pod, "raw") if "ISTIO" in line]
    assert "ISTIO_X" not in before


def test_errors_name_the_line(pod: Pod, tmp_path: Path) -> None:
    unterminated = restore(pod, "*nat\n:ISTIO_X - [0:0]\n", tmp_path)
    assert unterminated.returncode == 1 and "COMMIT expected" in unterminated.stderr
    assert not [line for line in rules(pod, "nat") if "ISTIO" in line]
    outside = restore(pod, "-A OUTPUT -j RETURN\n", tmp_path)
    assert outside.returncode == 1 and "line 1: -A OUTPUT -j RETURN" in outside.stderr
    no_chain = restore(pod, "*nat\n-A NO_CHAIN -j RETURN\nCOMMIT\n", tmp_path)
    assert no_chain.returncode == 1 and "line 2: -A NO_CHAIN -j RETURN" in no_chain.stderr


FOREIGN = {
    4: """*filter
:FOREIGN_CHAIN - [0:0]
-A INPUT -i eth+ -p tcp -m tcp --dport 9999 -m comment --comment "x y" -j ACCEPT
-A INPUT -p tcp -m multiport --dports 1,2:4 -m state --state RELATED,ESTABLISHED -j FOREIGN_CHAIN
-A INPUT -f -j DROP
-A INPUT ! -i veth+ ! -p udp -j ACCEPT
-A INPUT -p icmp -m icmp --icmp-type 8 -j REJECT --reject-with icmp-port-unreachable
-A OUTPUT -p udp
-A OUTPUT ! -s 198.19.0.0/16 ! -o lo -p udp -m udp ! --sport 53 -g FOREIGN_CHAIN
-A OUTPUT -m owner --uid-owner 1337 --gid-owner 1337 -j RETURN
-A FOREIGN_CHAIN -m limit --limit 5/sec -j LOG --log-prefix "a b " --log-level 6
COMMIT
*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m udp --dport 9999 -j NOTRACK
-A OUTPUT -p udp -m udp --dport 9998 -j CT --notrack
-A OUTPUT -p udp -m udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1
COMMIT
*mangle
:FOREIGN_CHAIN - [0:0]
-A PREROUTING -p tcp -m tcp --dport 9999 -j MARK --set-xmark 0x7/0xffffffff
-A PREROUTING -p tcp -m mark --mark 0x539/0xfff -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A PREROUTING -m conntrack --ctstate INVALID,UNTRACKED -j DROP
-A PREROUTING ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff
-A OUTPUT -p tcp -m connmark --mark 0x539 -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
COMMIT
*nat
:FOREIGN_CHAIN - [0:0]
-A PREROUTING -d 198.19.9.0/24 -p tcp -j DNAT --to-destination 198.18.0.1:80
-A OUTPUT -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 15001
-A POSTROUTING -o eth0 -j MASQUERADE
COMMIT
""",
    6: """*filter
:FOREIGN_CHAIN - [0:0]
-A INPUT -s 2001:db8::/32 -p ipv6-icmp -m icmp6 --icmpv6-type 128 -j ACCEPT
-A INPUT -i veth+ ! -p tcp -j ACCEPT
-A OUTPUT ! -o lo -p udp -j ACCEPT
-A INPUT -p tcp -m tcp --tcp-flags SYN,RST SYN -m comment --comment "x y" -j FOREIGN_CHAIN
-A FOREIGN_CHAIN ! -d ::1/128 -j REJECT --reject-with icmp6-port-unreachable
COMMIT
*mangle
:FOREIGN_CHAIN - [0:0]
-A PREROUTING ! -d ::1/128 -p tcp -j TPROXY --on-port 15006 --on-ip :: --tproxy-mark 0x539/0xffffffff
-A OUTPUT -s ::6/128 -o lo -j MARK --set-xmark 0x53a/0xffffffff
COMMIT
""",
}


def _rules_only(saved: str) -> str:
    return "".join(line + "\n" for line in saved.splitlines() if line.startswith(("*", ":", "-A", "COMMIT")))


@pytest.mark.parametrize("family", [4, 6])
def test_foreign_rules_round_trip(pod: Pod, tmp_path: Path, family: int) -> None:
    """Rules written by iptables, of every kind a pod may hold: rewritten whole through libiptc they read back
    the same, and each is deleted by its saved spec, in both directions between iptables and libiptc."""
    restore_binary = f"{'ip6tables' if family == 6 else 'iptables'}-legacy-restore"
    pod.run([restore_binary], stdin=FOREIGN[family])
    written = _rules_only(iptables_save(pod, "legacy", family))
    assert written.count("-A ") == FOREIGN[family].count("-A ")

    # The save, through libiptc into emptied tables, is the save again.
    emptied = "".join(line + "\n" for line in written.splitlines() if line.startswith("*") or line == "COMMIT")
    pod.run([restore_binary], stdin=emptied)
    assert restore(pod, written, tmp_path, family).returncode == 0
    assert _rules_only(iptables_save(pod, "legacy", family)) == written

    # Every rule deleted by the spec its save prints: libiptc's entries equal iptables' ones ...
    deletions = "".join(
        "-D " + line[3:] + "\n" if line.startswith("-A ") else line + "\n"
        for line in written.splitlines()
        if not line.startswith(":")
    )
    pod.run([restore_binary], stdin=FOREIGN[family])
    assert restore(pod, deletions, tmp_path, family).returncode == 0
    assert "-A " not in iptables_save(pod, "legacy", family)
    # ... and the other way round.
    pod.run([restore_binary], stdin=emptied)
    assert restore(pod, written, tmp_path, family).returncode == 0
    pod.run([restore_binary, "--noflush"], stdin=deletions)
    assert "-A " not in iptables_save(pod, "legacy", family)


def test_both_families_in_one_process(pod: Pod, tmp_path: Path) -> None:
    """libxtables registers an extension for one family per process; each restore gets a fresh one."""
    four = "*mangle\n:ISTIO_X - [0:0]\n-A ISTIO_X -p tcp -j TPROXY --on-port 1 --tproxy-mark 1/1\nCOMMIT\n"
    six = "*mangle\n:ISTIO_X - [0:0]\n-A ISTIO_X -p tcp -j TPROXY --on-port 2 --tproxy-mark 1/1\nCOMMIT\n"
    script = (
        "import sys\nfrom istio_iptables.backends.libiptc import Libiptc\n"
        "from istio_iptables.capture.config import IptablesVariant\nfrom istio_iptables.capture.model import Family\n"
        f"env = {{'XTABLES_LOCKFILE': {str(tmp_path / 'lock')!r}}}\n"
        "for family, payload in ((4, sys.argv[1]), (6, sys.argv[2]), (4, sys.argv[1])):\n"
        "    Libiptc(Family(family), IptablesVariant.LEGACY, '', env).restore(payload)\n"
    )
    result = pod.run([sys.executable, "-c", script, four, six], check=False)
    assert result.returncode == 0, result.stderr
    assert "--on-port 1 " in iptables_save(pod, "legacy", 4)
    assert "--on-port 2 " in iptables_save(pod, "legacy", 6)


INIT = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "--no-ipv6"]


def test_refuses_a_namespace_whose_rules_are_in_nf_tables(pod: Pod) -> None:
    pod.run(["iptables-nft", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "9999", "-j", "RETURN"])
    result = run_cli(pod, [*INIT, "--backend", "libiptc"])
    assert result.returncode == 1
    assert "rules of this namespace are in nf_tables" in result.stderr
    assert "the libiptc backend writes legacy tables only" in result.stderr
    assert "ISTIO" not in iptables_save(pod, "legacy", 4) + iptables_save(pod, "nft", 4)


def test_without_python_iptables_names_the_extra(pod: Pod, tmp_path: Path) -> None:
    hidden = tmp_path / "iptc"
    hidden.mkdir()
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'iptc'\", name='iptc')\n")
    result = run_cli(pod, [*INIT, "--backend", "libiptc"], env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2
    # Before it: the warning that --no-ipv6 leaves the pod's IPv6 address uncaptured.
    assert result.stderr.splitlines()[-1] == (
        "istio-iptables: --backend libiptc needs the libiptc extra: pip install 'istio-iptables[libiptc]'"
    )
    assert "ISTIO" not in iptables_save(pod, "legacy", 4) + iptables_save(pod, "nft", 4)
