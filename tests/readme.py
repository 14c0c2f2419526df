"""The examples of README and docs/, found and run: what ``tests/test_readme.py`` checks and
``scripts/regen-readme`` rewrites.

An example is a fenced code block holding ``$ istio-iptables ...`` lines, each followed by what the program
prints (up to the next ``$`` line or the end of the block). A block holding a single ``$`` line and nothing
else takes its output from the fenced block right after it (a ``mermaid`` graph GitHub renders, say). An
output block fenced as ``jsonc`` is an annotated excerpt: ``// comments`` and ``, ...`` elisions are allowed,
objects show all their keys and lists show some of their items, in order.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from istio_iptables.capture.config import Config
from istio_iptables.cli import command
from istio_iptables.cli import fast as cli
from tests.helpers import ROOT, Result, run_cli

README = ROOT / "README.md"
DOCUMENTS = (README, *sorted((ROOT / "docs").glob("*.md")))
"""Every document whose examples are run: README and each page of docs/."""
PROGRAMS = ("istio-iptables", "istio-clean-iptables")


@dataclass(frozen=True)
class Block:
    info: str
    """The fence's info string (``sh``, ``mermaid``, ``jsonc``, or empty)."""
    first: int
    """0-based index of the block's first content line in the document's lines."""
    lines: list[str]


@dataclass(frozen=True)
class Example:
    command: str
    """The text after ``$ ``."""
    line: int
    """1-based line of the command in its document, for messages."""
    first: int
    end: int
    """The expected output: the document's lines [first, end) (0-based)."""
    excerpt: bool
    """A ``jsonc`` excerpt, not the whole output."""


def blocks(lines: list[str]) -> list[Block]:
    found, index = [], 0
    while index < len(lines):
        fence = re.fullmatch(r"(```+)(\S*)\s*", lines[index])
        if fence is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == fence[1])
        found.append(Block(fence[2], index + 1, lines[index + 1 : end]))
        index = end + 1
    return found


def examples(lines: list[str]) -> list[Example]:
    found = []
    every = blocks(lines)
    for position, block in enumerate(every):
        starts = [i for i, line in enumerate(block.lines) if line.startswith("$ ")]
        if not starts:
            continue
        if starts == [0] and len(block.lines) == 1:
            following = every[position + 1]
            between = lines[block.first + 2 : following.first - 1]
            assert all(not line.strip() for line in between), f"line {block.first + 1}: no output block after"
            end = following.first + len(following.lines)
            found.append(Example(block.lines[0][2:], block.first + 1, following.first, end, following.info == "jsonc"))
            continue
        for start, stop in zip(starts, [*starts[1:], len(block.lines)], strict=True):
            # Output ends at the next command; a blank line before that separates the examples.
            end = stop - 1 if stop < len(block.lines) and not block.lines[stop - 1].strip() else stop
            command_at = block.first + start
            found.append(Example(block.lines[start][2:], command_at + 1, command_at + 1, block.first + end, False))
    return found


ROOT_PREFIX = "sudo "
"""An example run as root (``$ sudo ...``): it changes a namespace, so the kernel tests run it, in a namespace
of their own (``tests/kernel/test_doc_examples.py``); the in-process runner and the regeneration leave it."""


def needs_root(example: Example) -> bool:
    return example.command.startswith(ROOT_PREFIX)


def shown(lines: list[str], example: Example) -> str:
    return "".join(line + "\n" for line in lines[example.first : example.end])


@contextlib.contextmanager
def only_reading() -> Iterator[None]:
    """``command.run`` refuses anything but a dry run while the documents' examples run: they must change nothing."""
    real_run = command.run

    def dry_only(config: Config) -> None:
        if not config.dry_run:
            raise AssertionError("a documented example would apply rules; examples must be dry runs or read-only")
        real_run(config)

    command.run = dry_only  # type: ignore[assignment]
    try:
        yield
    finally:
        command.run = real_run  # type: ignore[assignment]


def run(command: str) -> Result:
    argv = shlex.split(command)
    assert argv[0] in PROGRAMS, f"a documented example runs {argv[0]!r}, not one of {PROGRAMS}"
    with only_reading():
        return run_cli(argv[1:], main=cli.main if argv[0] == "istio-iptables" else cli.clean_main)


def excerpt_of(shown_text: str) -> Any:
    """A ``jsonc`` excerpt as data: comments and ``, ...`` elisions dropped."""
    without_comments = re.sub(r"\s*//[^\n]*", "", shown_text)
    return json.loads(re.sub(r",\s*\.\.\.", "", without_comments))


def is_excerpt(part: Any, whole: Any, path: str = "$") -> list[str]:
    """Where ``part`` is not an excerpt of ``whole``: objects with exactly the same keys, lists whose items are
    excerpts of items of the whole list in the same order, scalars equal."""
    if isinstance(part, dict):
        if not isinstance(whole, dict) or set(part) != set(whole):
            keys = sorted(whole) if isinstance(whole, dict) else type(whole).__name__
            return [f"{path}: shows keys {sorted(part)}, the program prints {keys}"]
        return [problem for key in part for problem in is_excerpt(part[key], whole[key], f"{path}.{key}")]
    if isinstance(part, list):
        if not isinstance(whole, list):
            return [f"{path}: a list in the document, {type(whole).__name__} in the output"]
        position = 0
        for index, item in enumerate(part):
            start = position
            while position < len(whole) and is_excerpt(item, whole[position]):
                position += 1
            if position == len(whole):
                # Say what differs from the nearest candidate, not only that nothing matched.
                tries = [is_excerpt(item, other, f"{path}[{index}]") for other in whole[start:]]
                nearest = min(tries, key=len, default=[])
                return nearest or [f"{path}[{index}]: {json.dumps(item)} is not in the output (in this order)"]
            position += 1
        return []
    return (
        []
        if part == whole
        else [f"{path}: the document shows {json.dumps(part)}, the program prints {json.dumps(whole)}"]
    )


def regenerate() -> int:
    """Rewrite every exact example's output, in every document, with what the program prints now; returns how
    many changed."""
    changed = 0
    for document in DOCUMENTS:
        lines = document.read_text(encoding="utf-8").splitlines()
        for example in reversed(examples(lines)):
            if example.excerpt or needs_root(example):
                continue
            result = run(example.command)
            if result.code != 0:
                where = f"{document.relative_to(ROOT)} line {example.line}"
                raise SystemExit(f"{where}: `{example.command}` exited {result.code}: {result.stderr}")
            if shown(lines, example) != result.stdout:
                lines[example.first : example.end] = result.stdout.splitlines()
                changed += 1
        document.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return changed
