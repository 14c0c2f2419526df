"""README is true: its examples print what it shows (dry runs, traces, graphs, the JSON schema's excerpt),
every flag and environment variable it names exists in --help, it points nowhere outside the repository,
and its copy of the performance tables is docs/performance.md's. How examples are found: ``tests/readme.py``.
"""

from __future__ import annotations

import difflib
import json
import re

import pytest
import typer

from istio_iptables.capture.model import ISTIO_CHAINS as OWN_CHAINS
from istio_iptables.cli import app
from tests.helpers import ROOT, run_cli
from tests.readme import README, Example, blocks, examples, excerpt_of, is_excerpt, run, shown

TEXT = README.read_text(encoding="utf-8")
LINES = TEXT.splitlines()
EXAMPLES = examples(LINES)
REGENERATE = "run scripts/regen-readme and review the diff (or fix the program, if README is right)"


def test_readme_has_examples_of_each_kind() -> None:
    commands = [example.command for example in EXAMPLES]
    assert any("--dry-run" in command and "json" not in command for command in commands)
    assert any(" trace outbound " in command for command in commands)
    assert any(" trace inbound " in command for command in commands)
    assert sum(" graph" in command for command in commands) >= 2
    assert any(example.excerpt for example in EXAMPLES)


@pytest.mark.parametrize("example", [e for e in EXAMPLES if not e.excerpt], ids=lambda e: f"line{e.line}")
def test_example_prints_what_readme_shows(example: Example) -> None:
    result = run(example.command)
    assert result.code == 0, f"README line {example.line}: `{example.command}` exited {result.code}: {result.stderr}"
    expected = shown(LINES, example)
    if result.stdout != expected:
        diff = "\n".join(
            difflib.unified_diff(expected.splitlines(), result.stdout.splitlines(), "README", "program", lineterm="")
        )
        pytest.fail(f"README line {example.line}: `{example.command}` prints something else; {REGENERATE}\n{diff}")


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.excerpt], ids=lambda e: f"line{e.line}")
def test_json_excerpt_is_the_programs_output(example: Example) -> None:
    """The annotated JSON schema is an excerpt of a real output: every object with all its keys, lists with
    some of their items, values as printed. It cannot be regenerated; fix it by hand."""
    result = run(example.command)
    assert result.code == 0, result.stderr
    problems = is_excerpt(excerpt_of(shown(LINES, example)), json.loads(result.stdout))
    assert not problems, f"README line {example.line}: the JSON excerpt is wrong (fix it by hand):\n" + "\n".join(
        problems
    )


def test_the_excerpt_check_can_fail() -> None:
    whole = {"a": [1, 2, 3], "b": {"c": None}}
    assert is_excerpt({"a": [1, 3], "b": {"c": None}}, whole) == []
    assert is_excerpt({"a": [3, 1], "b": {"c": None}}, whole)
    assert is_excerpt({"a": [1]}, whole)
    assert is_excerpt({"a": [1], "b": {"c": 0}}, whole)
    assert excerpt_of('{"a": [1, ...], // note\n "b": 2}') == {"a": [1], "b": 2}


# ---- flags and environment variables ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def help_text() -> str:
    def paths(command: object, path: list[str]) -> list[list[str]]:
        """Every command's words, groups' subcommands (``cni install``) included."""
        children = getattr(command, "commands", {})
        return [path] + [found for name, child in children.items() for found in paths(child, [*path, name])]

    pages = [run_cli([*path, "--help"]) for path in paths(typer.main.get_command(app.app), [])]
    assert all(page.code == 0 for page in pages)
    return "\n".join(page.stdout for page in pages)


NOT_OURS = {
    "--wait": "iptables-legacy's, which the apply passes",
    "--flag": "Istio's --flag=true|false form, in general",
    "--no-": "the --no-… form of switches, in general",
    "--restore-mark": "iptables' CONNMARK option, in a rule's shape",
}


def command_lines() -> list[tuple[int, str]]:
    """README's command lines for our programs: in code blocks, and inline code starting with a flag."""
    found = []
    for block in blocks(LINES):
        for offset, line in enumerate(block.lines):
            words = line.removeprefix("$ ").removeprefix("sudo ").split()
            if words and words[0].split("/")[-1] in ("istio-iptables", "istio-clean-iptables"):
                found.append((block.first + offset + 1, line.split(" #")[0]))
    for number, line in enumerate(LINES, 1):
        found += [(number, span) for span in re.findall(r"`(--[^`]+)`", line)]
    return found


def test_every_flag_readme_names_is_in_help(help_text: str) -> None:
    unknown = []
    for number, line in command_lines():
        for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line):
            if flag in NOT_OURS or re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
                continue
            unknown.append(f"README line {number}: {flag}")
    assert not unknown, "flags README names that no --help lists:\n" + "\n".join(unknown)


EXTERNAL_NAMES = {
    "KUBERNETES_SERVICE_HOST": "Kubernetes sets it in every container",
    "XTABLES_LOCKFILE": "iptables' own variable",
    "NET_ADMIN": "a capability",
    "NET_RAW": "a capability",
    "CAP_SYS_ADMIN": "a capability",
    "CNI_NETNS": "the CNI specification's variable",
    "SO_MARK": "a socket option",
    "SO_ORIGINAL_DST": "a socket option",
    "CA_BUNDLE_BASE64": "the placeholder deploy/webhook.yaml holds for the webhook's caBundle",
}


def test_every_environment_variable_readme_names_is_in_help(help_text: str) -> None:
    names = set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9]\b", TEXT))
    chains_and_sets = {
        name for name in names if name in OWN_CHAINS or re.fullmatch(r"ISTIO_\w+_(CIDR[46]|PORTS)", name)
    }
    missing = sorted(name for name in names - chains_and_sets - set(EXTERNAL_NAMES) if name not in help_text)
    assert not missing, f"README names variables that --help does not: {missing}"
    assert "42.2_" not in TEXT


# ---- structure ------------------------------------------------------------------------------------------------


def section(title: str) -> list[str]:
    start = LINES.index(title) + 1
    end = next(i for i in range(start, len(LINES)) if LINES[i].startswith("## "))
    return LINES[start:end]


def test_the_two_commands_are_two() -> None:
    part = section("## The two commands")
    commands = [line for block in blocks(part) for line in block.lines if line.strip()]
    assert commands == ["sudo scripts/demo", "scripts/test"], commands


def test_readme_points_nowhere_outside_the_repository() -> None:
    assert "../shared" not in TEXT and "/work/" not in TEXT
    for target in re.findall(r"\]\(([^)#]+)\)", TEXT):
        if not re.match(r"https?://", target):
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"
    for path in re.findall(r"`((?:scripts|docs|deploy|tests|istio_iptables|\.ci)/[\w./*-]+)`", TEXT):
        assert list(ROOT.glob(path)), f"README names {path}, which is not in the repository"
    for module in re.findall(r"`(\w+\.py)`", TEXT):
        assert list(ROOT.glob(f"**/{module}")), f"README names {module}, which is not in the repository"


def test_the_performance_tables_are_docs_performance_md() -> None:
    embedded = TEXT[TEXT.index("\nMachine: ") + 1 : TEXT.index("\n## Differences from Istio")].strip()
    document = re.sub(r"^### ", "#### ", (ROOT / "docs" / "performance.md").read_text(), flags=re.MULTILINE)
    assert embedded == document.strip(), "copy docs/performance.md (headings one level down) into README"
    assert not re.search(r"\| 0\.000 \|", document), "a figure of 0.000 ms: a row in the wrong unit"


def test_the_error_lines_readme_shows_are_the_programs() -> None:
    """Each ``istio-iptables: invalid value for FLAG: 'VALUE': ...`` line, run with that value (a dry run)."""
    errors = [line for line in LINES if line.startswith("istio-iptables: invalid value for ")]
    assert errors
    for line in errors:
        found = re.fullmatch(r"istio-iptables: invalid value for (\S+?)(?: \(environment of \S+\))?: '(.*?)': .*", line)
        assert found, line
        name, value = found[1], found[2]
        if name.isupper():
            result = run_cli(["--dry-run", "--no-ipv6"], {name: value})
        else:
            result = run_cli(["--dry-run", "--no-ipv6", name.split("/")[-1], value])
        assert (result.code, result.stderr) == (2, line + "\n"), f"README shows {line!r}; the program says {result}"
