"""README and docs/ are true: their examples print what they show (dry runs, traces, graphs, the JSON schema's
excerpt); every flag, environment variable, file and module they name exists; their links lead somewhere; no
paragraph or table is written twice; README stays a front door. How examples are found: ``tests/readme.py``.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import typer

from istio_iptables.capture.model import ISTIO_CHAINS as OWN_CHAINS
from istio_iptables.cli import app
from tests.helpers import ROOT, run_cli
from tests.readme import DOCUMENTS, README, Example, blocks, examples, excerpt_of, is_excerpt, needs_root, run, shown

MEASURED = "<!-- Everything below this line is written by scripts/bench. -->"
"""docs/performance.md's tables below this marker are a record of one bench run, named as the tree was then."""


def claims(path: Path) -> str:
    """What a document says about the tree now: all of it, but for the bench's record of a past run."""
    return path.read_text(encoding="utf-8").partition(MEASURED)[0]


TEXTS = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8") for path in DOCUMENTS}
TEXT = TEXTS["README.md"]
LINES = TEXT.splitlines()
EXAMPLES = [(name, example) for name, text in TEXTS.items() for example in examples(text.splitlines())]
REGENERATE = "run scripts/regen-readme and review the diff (or fix the program, if the document is right)"


def where(name: str, example: Example) -> str:
    return f"{name} line {example.line}"


def test_the_documents_have_examples_of_each_kind() -> None:
    commands = [example.command for _, example in EXAMPLES]
    assert any("--dry-run" in command and "json" not in command for command in commands)
    assert any(" trace outbound " in command for command in commands)
    assert any(" trace inbound " in command for command in commands)
    assert sum(" graph" in command for command in commands) >= 2
    assert any(example.excerpt for _, example in EXAMPLES)
    assert {name for name, _ in EXAMPLES} >= {"README.md", "docs/cli.md", "docs/capture.md"}


@pytest.mark.parametrize(
    ("name", "example"), [e for e in EXAMPLES if not e[1].excerpt and not needs_root(e[1])], ids=str
)
def test_example_prints_what_the_document_shows(name: str, example: Example) -> None:
    result = run(example.command)
    assert result.code == 0, f"{where(name, example)}: `{example.command}` exited {result.code}: {result.stderr}"
    expected = shown(TEXTS[name].splitlines(), example)
    if result.stdout != expected:
        diff = "\n".join(
            difflib.unified_diff(expected.splitlines(), result.stdout.splitlines(), name, "program", lineterm="")
        )
        pytest.fail(f"{where(name, example)}: `{example.command}` prints something else; {REGENERATE}\n{diff}")


@pytest.mark.parametrize(("name", "example"), [e for e in EXAMPLES if e[1].excerpt], ids=str)
def test_json_excerpt_is_the_programs_output(name: str, example: Example) -> None:
    """The annotated JSON schema is an excerpt of a real output: every object with all its keys, lists with
    some of their items, values as printed. It cannot be regenerated; fix it by hand."""
    result = run(example.command)
    assert result.code == 0, result.stderr
    problems = is_excerpt(excerpt_of(shown(TEXTS[name].splitlines(), example)), json.loads(result.stdout))
    assert not problems, f"{where(name, example)}: the JSON excerpt is wrong (fix it by hand):\n" + "\n".join(problems)


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


def command_lines(text: str) -> list[tuple[int, str]]:
    """A document's command lines for our programs: in code blocks, and inline code starting with a flag."""
    lines = text.splitlines()
    found = []
    for block in blocks(lines):
        for offset, line in enumerate(block.lines):
            words = line.removeprefix("$ ").removeprefix("sudo ").split()
            if words and words[0].split("/")[-1] in ("istio-iptables", "istio-clean-iptables"):
                found.append((block.first + offset + 1, line.split(" #")[0]))
    for number, line in enumerate(lines, 1):
        found += [(number, span) for span in re.findall(r"`(--[^`]+)`", line)]
    return found


def test_every_flag_the_documents_name_is_in_help(help_text: str) -> None:
    unknown = []
    for name, text in TEXTS.items():
        for number, line in command_lines(text):
            for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line):
                if flag in NOT_OURS or re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
                    continue
                unknown.append(f"{name} line {number}: {flag}")
    assert not unknown, "flags the documents name that no --help lists:\n" + "\n".join(unknown)


EXTERNAL_NAMES = {
    "ISTIO_PROMETHEUS_ANNOTATIONS": "the variable Istio's agent reads the app's scrape settings from",
    "ISTIO_META_INTERCEPTION_MODE": "the variable of the istio template's proxy that pilot-agent reads its mode from",
    "KUBERNETES_SERVICE_HOST": "Kubernetes sets it in every container",
    "XTABLES_LOCKFILE": "iptables' own variable",
    "NET_ADMIN": "a capability",
    "NET_RAW": "a capability",
    "CAP_SYS_ADMIN": "a capability",
    "CAP_SYS_PTRACE": "a capability",
    "CAP_NET_ADMIN": "a capability",
    "CAP_NET_RAW": "a capability",
    "CNI_NETNS": "the CNI specification's variable",
    "CNI_COMMAND": "the CNI specification's variable",
    "O_NOFOLLOW": "an open(2) flag",
    "SO_MARK": "a socket option",
    "SO_ORIGINAL_DST": "a socket option",
    "IPV6_V6ONLY": "a socket option",
    "IP_TRANSPARENT": "a socket option",
    "ISTIO_IPTABLES_LAB_CACHE": "the kubelet lab's image cache (tests/lab/images.py)",
    "ISTIO_KUBE_APP_PROBERS": "the environment variable of Istio's proxy that its probe rewriting sets",
    "GLIBC_2": "glibc's symbol versions (GLIBC_2.35)",
    "CA_BUNDLE_BASE64": "the placeholder deploy/webhook.yaml holds for the webhook's caBundle",
    "APT_LOCK_SECONDS": "the bound of scripts/apt-get-waiting, which reads it",
}


def package_constants() -> set[str]:
    """The module-level constants of the package (a document may name a limit by its constant)."""
    return {
        match.group(1)
        for path in (ROOT / "istio_iptables").rglob("*.py")
        for match in re.finditer(r"^([A-Z][A-Z0-9_]+)\s*(?::[^=\n]+)?=", path.read_text(), re.MULTILINE)
    }


def test_every_environment_variable_the_documents_name_is_in_help(help_text: str) -> None:
    text = "\n".join(claims(path) for path in DOCUMENTS)
    names = set(re.findall(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9]\b", text))
    chains_and_sets = {
        name for name in names if name in OWN_CHAINS or re.fullmatch(r"ISTIO_\w+_(CIDR[46]|PORTS)", name)
    }
    missing = sorted(
        name for name in names - chains_and_sets - set(EXTERNAL_NAMES) - package_constants() if name not in help_text
    )
    assert not missing, f"the documents name variables that neither --help nor the package's constants do: {missing}"
    assert "42.2_" not in text


# ---- structure ------------------------------------------------------------------------------------------------


def section(title: str) -> list[str]:
    start = LINES.index(title) + 1
    end = next(i for i in range(start, len(LINES)) if LINES[i].startswith("## "))
    return LINES[start:end]


def test_the_two_commands_are_two() -> None:
    part = section("## The two commands")
    commands = [line for block in blocks(part) for line in block.lines if line.strip()]
    assert commands == ["sudo scripts/demo", "scripts/test"], commands


def test_readme_is_a_front_door() -> None:
    """At most about 300 lines, and a map naming every page of docs/."""
    assert len(LINES) <= 300, f"README has {len(LINES)} lines: move the topic to its page in docs/"
    pages = {path.relative_to(ROOT).as_posix() for path in DOCUMENTS if path != README}
    assert pages <= set(re.findall(r"\]\((docs/[\w.-]+\.md)\)", TEXT)), "README's map misses a page of docs/"


def test_the_two_commands_are_what_ci_runs() -> None:
    assert "exec scripts/test" in (ROOT / ".ci" / "run").read_text()


# ---- names and links: each must exist -------------------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    return {slug(title) for title in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def broken_links(document: Path, text: str) -> list[str]:
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"https?://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        if not path.exists():
            problems.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{target}: no heading #{anchor} in {path.name}")
    return problems


def module_exists(name: str, root: Path) -> bool:
    """``istio_iptables.a.b`` is a module or package in the tree, or a name one of them defines."""
    parts = name.split(".")
    path = root.joinpath(*parts)
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
        return True
    parent = path.parent.with_suffix(".py")
    if len(parts) > 2 and parent.is_file():
        return re.search(rf"^(?:def|class) {parts[-1]}\b|^{parts[-1]}\b\s*[:=]", parent.read_text(), re.M) is not None
    return False


def missing_names(text: str, root: Path) -> list[str]:
    """Files and modules a text names that are not in the tree at ``root``."""
    problems = []
    for module in sorted(set(re.findall(r"\bistio_iptables(?:\.[a-z_]\w*)+", text))):
        if not module_exists(module, root):
            problems.append(f"module {module}")
    for path in sorted(
        set(re.findall(r"(?<![\w./-])((?:scripts|docs|deploy|tests|istio_iptables|\.ci)/[\w./*-]*\w/?)", text))
    ):
        if not list(root.glob(path.rstrip("/"))):
            problems.append(f"file {path}")
    for module in sorted(set(re.findall(r"`(\w+\.py)`", text))):
        if not list(root.glob(f"**/{module}")):
            problems.append(f"file {module}")
    for folder, row in re.findall(r"^\| `(istio_iptables/[\w/]+/)` \|(.*)$", text, flags=re.MULTILINE):
        # A row of a folder's table names that folder's modules.
        problems += [
            f"file {folder}{name}" for name in re.findall(r"`(\w+\.py)`", row) if not (root / folder / name).is_file()
        ]
    for file in sorted(set(re.findall(r"`((?:Dockerfile|pyproject)[\w.]*)`", text))):
        if not (root / file).exists():
            problems.append(f"file {file}")
    return problems


def test_the_documents_point_nowhere_outside_the_repository() -> None:
    problems = []
    for path in DOCUMENTS:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text and "/work/" not in text, path
        problems += [f"{path.relative_to(ROOT)}: {problem}" for problem in broken_links(path, text)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_file_and_module_the_documents_name_exists() -> None:
    problems = [
        f"{path.relative_to(ROOT)}: {problem}" for path in DOCUMENTS for problem in missing_names(claims(path), ROOT)
    ]
    assert not problems, "the documents name what is not in the tree:\n" + "\n".join(problems)


def test_the_name_and_link_checks_can_fail(tmp_path: Path) -> None:
    (tmp_path / "istio_iptables" / "capture").mkdir(parents=True)
    (tmp_path / "istio_iptables" / "__init__.py").write_text("")
    (tmp_path / "istio_iptables" / "capture" / "__init__.py").write_text("")
    (tmp_path / "istio_iptables" / "capture" / "plan.py").write_text("def build_plan():\n    pass\n")
    named = "`istio_iptables.capture.plan`, istio_iptables.capture.plan.build_plan, `istio_iptables/capture/plan.py`"
    assert missing_names(named, tmp_path) == []
    assert missing_names("istio_iptables.plan and istio_iptables.capture.plan.run", tmp_path) == [
        "module istio_iptables.capture.plan.run",
        "module istio_iptables.plan",
    ]
    assert missing_names("see `istio_iptables/plan.py` and scripts/nothing", tmp_path) == [
        "file istio_iptables/plan.py",
        "file scripts/nothing",
    ]
    assert missing_names("| `istio_iptables/capture/` | `plan.py`, `config.py` |", tmp_path) == [
        "file config.py",
        "file istio_iptables/capture/config.py",
    ]
    page = tmp_path / "a.md"
    page.write_text("# A page: `x`\n\n[here](#a-page-x) [there](b.md) [gone](#nowhere)\n")
    assert broken_links(page, page.read_text()) == ["b.md: no such file", "#nowhere: no heading #nowhere in a.md"]


# ---- each paragraph and table once ----------------------------------------------------------------------------


def prose(text: str) -> list[list[str]]:
    """A document's paragraphs, list items and tables outside code blocks, as runs of non-blank lines."""
    runs: list[list[str]] = [[]]
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            runs.append([])
        elif fenced or not line.strip():
            runs.append([])
        else:
            runs[-1].append(line.strip())
    return [lines for lines in runs if lines]


def repeated(texts: dict[str, str]) -> list[str]:
    """Text written twice: a paragraph of over 60 characters, or any three consecutive lines of a paragraph or
    table (a table's header and separator with one of its rows, say)."""
    seen: Counter[str] = Counter()
    for text in texts.values():
        for lines in prose(text):
            if len(lines) == 1 and len(lines[0]) > 60:
                seen[lines[0]] += 1
            for start in range(len(lines) - 2):
                seen["\n".join(lines[start : start + 3])] += 1
    return sorted(part for part, count in seen.items() if count > 1)


def test_no_paragraph_or_table_is_written_twice() -> None:
    twice = repeated(TEXTS)
    assert not twice, "written twice (keep each in one place, link to it elsewhere):\n\n" + "\n\n".join(twice)


def test_the_repetition_check_can_fail() -> None:
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    assert repeated({"x": table, "y": "text\n\n" + table})
    assert repeated(
        {"x": "A paragraph that says the same thing in two places, word for word.\n", "y": ""}
        | {"z": "A paragraph that says the same thing in two places, word for word.\n"}
    )
    assert not repeated({"x": table, "y": "| a | b |\n|---|---|\n| 3 | 4 |\n", "z": "```\n" + table + "```\n"})


# ---- facts checked against what they describe -----------------------------------------------------------------


def test_the_glibc_floor_the_docs_give_is_the_builds() -> None:
    """The newest GLIBC_ symbol version the self-contained plugin's files name is the floor docs/cni.md gives
    and README next to their install examples (scripts/test builds the plugin before the tests)."""
    build = ROOT / "dist" / "istio-iptables-cni"
    if not build.is_dir() or not shutil.which("objdump"):
        pytest.skip("no dist/istio-iptables-cni (scripts/build-cni-plugin makes it) or no objdump (binutils)")
    versions = set()
    for file in build.rglob("*"):
        if file.is_file() and file.read_bytes()[:4] == b"\x7fELF":
            dump = subprocess.run(["objdump", "-T", str(file)], capture_output=True, text=True, check=False).stdout
            versions |= {tuple(int(part) for part in v.split(".")) for v in re.findall(r"GLIBC_(\d+\.\d+)", dump)}
    newest = ".".join(map(str, max(versions)))
    for document in (README, ROOT / "docs" / "cni.md"):
        stated = re.findall(r"glibc (\d+\.\d+) or newer", document.read_text())
        assert stated == [newest], f"{document.name} gives glibc {stated}; the build needs {newest}"
    stated_by_build = json.loads((build / "istio-iptables-cni.d" / "node-requirements.json").read_text())
    assert stated_by_build == {"glibc": newest}


def test_the_error_lines_the_documents_show_are_the_programs() -> None:
    """Each ``istio-iptables: invalid value for FLAG: 'VALUE': ...`` line, run with that value (a dry run)."""
    every = [line for text in TEXTS.values() for line in text.splitlines()]
    errors = [line for line in every if line.startswith("istio-iptables: invalid value for ")]
    assert errors
    for line in errors:
        found = re.fullmatch(r"istio-iptables: invalid value for (\S+?)(?: \(environment of \S+\))?: '(.*?)': .*", line)
        assert found, line
        name, value = found[1], found[2]
        if name.isupper():
            result = run_cli(["--dry-run", "--no-ipv6"], {name: value})
        else:
            result = run_cli(["--dry-run", "--no-ipv6", name.split("/")[-1], value])
        assert (result.code, result.stderr) == (2, line + "\n"), f"a document shows {line!r}; the program says {result}"
