"""The log of an apply says what changed, on the real kernel: one line per table and family changed (rules
added and removed, chains created and deleted, with counts that match the live tables), the total time, what
a clean-up removed, and that an unchanged re-run changed nothing; as text and as JSON lines. Both iptables
variants and native nftables, each in namespaces of its own."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from tests.kernel.namespaces import Pod, iptables_save, needs_root, run_cli

pytestmark = [pytest.mark.kernel, needs_root]

F = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "--ipv6"]
INFO = ["--log_output_level=default:info"]
BACKENDS = ["legacy", "nft", "native"]
CHAINS = "ISTIO_INBOUND, ISTIO_REDIRECT, ISTIO_IN_REDIRECT, ISTIO_OUTPUT"
NFT_CHAINS = "prerouting, output, istio-inbound, istio-redirect, istio-in-redirect, istio-output"


@pytest.fixture
def pod() -> Iterator[Pod]:
    with Pod.create() as created:
        yield created


def backend_flags(backend: str) -> list[str]:
    return ["--native-nftables"] if backend == "native" else ["--force-iptables-binary", backend]


def messages(pod: Pod, backend: str, *arguments: str, as_json: bool = False) -> list[str]:
    """The log messages of one run (text: the third tab-separated field), without the detection notes."""
    done = run_cli(pod, [*backend_flags(backend), *INFO, *(["--log_as_json"] if as_json else []), *arguments])
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    if as_json:
        found = [json.loads(line) for line in done.stderr.splitlines()]
        assert all(entry["level"] == "info" and entry["scope"] == "default" for entry in found), found
        texts = [entry["msg"] for entry in found]
    else:
        fields = [line.split("\t") for line in done.stderr.splitlines()]
        assert all(len(parts) == 3 and parts[1] == "info" for parts in fields), done.stderr
        texts = [parts[2] for parts in fields]
    # Besides the summary: which iptables variant detection chose, and the size of an nft transaction.
    details = r"ipv[46]: using iptables-\w+: .*|nftables: committed one transaction of \d+ commands"
    if any(text.startswith("nftables inet ") for text in texts):
        assert any(re.fullmatch(r"nftables: committed one transaction of \d+ commands", text) for text in texts)
    return [text for text in texts if not re.fullmatch(details, text)]


def routing(lines: list[str]) -> tuple[list[str], list[str]]:
    """The routing steps (logged as they are taken), and the other lines."""
    return [line for line in lines if line.startswith("routing: ")], [
        line for line in lines if not line.startswith("routing: ")
    ]


def rules_live(pod: Pod, backend: str, family: int) -> int:
    """Our rules in the live nat table, counted from the save (or nft's listing)."""
    if backend == "native":
        listing = json.loads(pod.run(["nft", "-j", "list", "table", "inet", "istio-proxy-nat"]).stdout)
        return sum("rule" in item for item in listing["nftables"])
    return sum(line.startswith("-A ") for line in iptables_save(pod, backend, family).splitlines())


def where(backend: str, family: int) -> str:
    return "nftables inet istio-proxy-nat" if backend == "native" else f"ipv{family} nat (iptables-{backend})"


def families(backend: str) -> list[int]:
    # Native nftables writes one inet table for both families.
    return [4] if backend == "native" else [4, 6]


def left_empty(families: tuple[int, ...]) -> list[str]:
    """The log lines of iptables-nft's nat tables deleted once our rules left them empty."""
    return [
        f"ipv{family}: deleted what our rules left empty: delete chain {ip} nat PREROUTING; "
        f"delete chain {ip} nat OUTPUT; delete table {ip} nat"
        for family in families
        for ip in ["ip" if family == 4 else "ip6"]
    ]


def timed(message: str, words: str) -> bool:
    return re.fullmatch(re.escape(words).replace("N", r"\d+"), message) is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_rerun_change_and_clean_up_say_what_changed(pod: Pod, backend: str) -> None:
    chains = NFT_CHAINS if backend == "native" else CHAINS
    routes, applied = routing(messages(pod, backend, *F, "-d", "15090,15021,15020"))
    assert routes == ["routing: add ::6/128 to lo"]
    counts = {family: rules_live(pod, backend, family) for family in families(backend)}
    assert all(counts.values()), counts
    expected = [f"{where(backend, f)}: {counts[f]} rules added, 0 removed; chains created: {chains}" for f in counts]
    assert applied[:-1] == expected, applied
    assert timed(applied[-1], "applied in N ms"), applied

    rerun = messages(pod, backend, *F, "-d", "15090,15021,15020")
    assert len(rerun) == 1 and timed(rerun[0], "rules already as planned; nothing to change (took N ms)"), rerun

    changed = messages(pod, backend, *F, "-d", "15090")
    assert changed[:-1] == [f"{where(backend, f)}: 0 rules added, 2 removed" for f in counts], changed
    assert timed(changed[-1], "applied in N ms"), changed

    left = {family: rules_live(pod, backend, family) for family in counts}
    routes, cleaned = routing(messages(pod, backend, "--cleanup-only"))
    assert routes == ["routing: delete ::6/128 from lo"]
    # iptables-nft's tables go too once empty (legacy cannot unload one; native deletes its own whole).
    emptied = [line for line in cleaned if "deleted what our rules left empty" in line]
    assert emptied == (left_empty((4, 6)) if backend == "nft" else []), cleaned
    cleaned = [line for line in cleaned if line not in emptied]
    # A clean-up names the chains it deleted (in the order they were listed: iptables-save sorts them).
    removed = [re.sub(r"; chains deleted: .*", "", line) for line in cleaned[:-1]]
    assert removed == [f"{where(backend, f)}: 0 rules added, {left[f]} removed" for f in counts], cleaned
    deleted = [set(line.partition("; chains deleted: ")[2].split(", ")) for line in cleaned[:-1]]
    assert deleted == [set(chains.split(", "))] * len(counts), cleaned
    assert timed(cleaned[-1], "cleaned up in N ms"), cleaned

    again = messages(pod, backend, "--cleanup-only")
    assert len(again) == 1 and timed(again[0], "nothing of ours here; nothing to change (took N ms)"), again


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_logs_say_the_same(pod: Pod, backend: str) -> None:
    _, applied = routing(messages(pod, backend, *F, as_json=True))
    counts = {family: rules_live(pod, backend, family) for family in families(backend)}
    chains = NFT_CHAINS if backend == "native" else CHAINS
    expected = [f"{where(backend, f)}: {counts[f]} rules added, 0 removed; chains created: {chains}" for f in counts]
    assert applied[:-1] == expected, applied
    assert timed(applied[-1], "applied in N ms"), applied
    rerun = messages(pod, backend, *F, as_json=True)
    assert len(rerun) == 1 and timed(rerun[0], "rules already as planned; nothing to change (took N ms)"), rerun


def test_switching_backends_logs_both_sides(pod: Pod) -> None:
    """Native nftables in, the iptables copy out: a line for each, in that order."""
    messages(pod, "nft", *F)
    copy = {family: rules_live(pod, "nft", family) for family in (4, 6)}
    switched = messages(pod, "native", *F)
    native = rules_live(pod, "native", 4)
    # The deleted chains in the order the save listed them (sorted).
    deleted = ", ".join(sorted(CHAINS.split(", ")))
    assert switched[:-1] == [
        f"nftables inet istio-proxy-nat: {native} rules added, 0 removed; chains created: {NFT_CHAINS}",
        *(f"{where('nft', f)}: 0 rules added, {copy[f]} removed; chains deleted: {deleted}" for f in (4, 6)),
        *left_empty((4, 6)),
    ], switched
