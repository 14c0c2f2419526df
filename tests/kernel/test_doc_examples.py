"""The documents' root examples (``$ sudo ...``), run as root in the order written, each document's in one
session, and compared with what they show. The namespaces they create are renamed to ones this test owns,
and removed at the end, also on failure. Only ``ip`` on those namespaces and our programs may run: an example
that would touch anything else fails the test instead of running."""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.kernel.namespaces import needs_root
from tests.readme import DOCUMENTS, ROOT_PREFIX, Example, examples, shown
from tests.readme import needs_root as is_root_example

pytestmark = [pytest.mark.kernel, needs_root]

BIN = Path(sys.executable).parent
PROGRAMS = ("istio-iptables", "istio-clean-iptables")
_counter = itertools.count()

SESSIONS = {
    path.relative_to(ROOT).as_posix(): [e for e in examples(path.read_text().splitlines()) if is_root_example(e)]
    for path in DOCUMENTS
}


def owned_namespaces(session: list[Example]) -> dict[str, str]:
    """Each namespace an example creates (``ip netns add NAME``), and the name this test gives it instead."""
    named = [shlex.split(e.command)[4] for e in session if shlex.split(e.command)[1:4] == ["ip", "netns", "add"]]
    return {name: f"iidoc-{os.getpid()}-{next(_counter)}" for name in named}


def argv(command: str, renamed: dict[str, str]) -> list[str]:
    words = [renamed.get(word, word) for word in shlex.split(command.removeprefix(ROOT_PREFIX))]
    if Path(words[0]).name in PROGRAMS:  # `.venv/bin/istio-iptables`, as `sudo` resets PATH: this venv's
        return [str(BIN / Path(words[0]).name), *words[1:]]
    ours = set(renamed.values())
    on_ours = words[:2] in (["ip", "-n"], ["ip", "-netns"]) and words[2] in ours
    netns = words[:3] in (["ip", "netns", "add"], ["ip", "netns", "del"]) and words[3:] and words[3] in ours
    assert on_ours or netns, f"a root example may run only our programs or ip on its own namespace: {command}"
    return words


@pytest.mark.parametrize("name", [name for name, session in SESSIONS.items() if session])
def test_the_root_examples_print_what_the_document_shows(name: str) -> None:
    session = SESSIONS[name]
    renamed = owned_namespaces(session)
    lines = (ROOT / name).read_text().splitlines()
    try:
        for example in session:
            done = subprocess.run(
                argv(example.command, renamed), capture_output=True, text=True, timeout=120, check=False
            )
            where = f"{name} line {example.line}: `{example.command}`"
            assert done.returncode == 0, f"{where} exited {done.returncode}: {done.stderr}"
            assert done.stdout == shown(lines, example), f"{where} printed:\n{done.stdout}"
    finally:
        for namespace in renamed.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)


def test_root_examples_are_held_to_their_namespaces() -> None:
    renamed = {"mypod": "iidoc-test"}
    assert argv("sudo ip -n mypod link set eth0 up", renamed)[:3] == ["ip", "-n", "iidoc-test"]
    for command in ("sudo ip link set eth0 up", "sudo ip -n other link del eth0", "sudo rm -rf /x"):
        with pytest.raises(AssertionError):
            argv(command, renamed)
    assert argv("sudo .venv/bin/istio-iptables --cleanup-only", renamed)[0] == str(BIN / "istio-iptables")
