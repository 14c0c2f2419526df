"""The two parsers of the main command agree: ``argv.plain_run`` (no Typer import, the init container's path)
returns exactly the options Typer's own parse of the same command line gives, or declines and leaves it to
Typer. Nothing here runs a command."""

from __future__ import annotations

import subprocess
import sys

import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istio_iptables.capture import config as argv
from istio_iptables.capture.config import SETTINGS
from istio_iptables.cli import app
from istio_iptables.errors import PROG

OPTIONS = [setting for setting in SETTINGS if setting.flags]
VALUES = st.sampled_from(["", "15001", "*", "-", "10.0.0.0/8,::1/128", "a=b", "=", " ", "é", "1,2,3"]) | st.text()
COMMAND = typer.main.get_command(app.app)


def typer_options(arguments: list[str]) -> dict[str, object]:
    """What Typer passes to the main command for these arguments; it must find no subcommand."""
    context = COMMAND.make_context(PROG, list(arguments))
    # Typer's vendored Click keeps a subcommand's name and arguments in ``_protected_args``.
    assert not context._protected_args and not context.args, arguments
    return dict(context.params)


@st.composite
def option(draw: st.DrawFn) -> list[str]:
    """One option in a form the fast path takes: a switch (or its --no- form), or a flag with its value."""
    setting = draw(st.sampled_from(OPTIONS))
    if setting.switch:
        return [draw(st.sampled_from([*setting.flags, setting.off]))]
    name = draw(st.sampled_from(setting.flags))
    value = draw(VALUES.filter(lambda text: text == "-" or not text.startswith("-")))
    glued = name.startswith("--") and draw(st.booleans())
    return [f"{name}={value}"] if glued else [name, value]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(option(), max_size=8))
def test_plain_command_lines_parse_as_typer_parses_them(options: list[list[str]]) -> None:
    arguments = [argument for each in options for argument in each]
    assert argv.plain_run(arguments) == typer_options(arguments)


TOKENS = (
    st.sampled_from(
        [name for setting in OPTIONS for name in (*setting.flags, setting.off if setting.switch else setting.flags[0])]
        + ["--", "-h", "--help", "status", "-nx", "-p15001", "-p=1", "--nope", "--dry-run=1", "-x", "--envoy-port="]
    )
    | VALUES
)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOKENS, max_size=8))
def test_any_command_line_the_fast_path_takes_typer_reads_the_same(arguments: list[str]) -> None:
    options = argv.plain_run(arguments)
    if options is not None:
        assert options == typer_options(arguments)


def test_the_fast_path_declines_what_only_typer_does() -> None:
    for arguments in (
        ["--help"],
        ["-h"],
        ["status"],
        ["-p", "15001", "trace", "outbound", "--dst", "198.18.0.1:80"],
        ["--"],
        ["-nx"],  # bundled short flags
        ["-p15001"],  # a short flag's value attached
        ["-x", "-p"],  # a value that looks like a flag
        ["-p"],  # a missing value
        ["--no-envoy-port"],
        ["--dry-run=yes"],  # a switch with a value that go_switches did not translate
        ["--envoy"],  # Click has no abbreviations either; Typer words the error
    ):
        assert argv.plain_run(arguments) is None, arguments


def test_a_plain_run_imports_nothing_it_does_not_use() -> None:
    # --no-ipv6: on a dual-stack host, detection says at info level that it captures IPv6, which loads logging.
    probe = (
        "import sys; from istio_iptables.cli import fast as cli\n"
        "try: cli.main(['-p', '15001', '-u', '1337', '-i', '*', '-b', '*', '--dry-run', '--no-ipv6'])\n"
        "except SystemExit as exit_: assert exit_.code == 0, exit_.code\n"
        "heavy = {'typer', 'dataclasses', 'typing', 'inspect', 'logging', 'shutil', 'tempfile', 'pyroute2'}\n"
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "-A ISTIO_OUTPUT" in done.stdout


def test_the_console_commands_keep_exit_codes_and_only_they_turn_collection_off() -> None:
    def run(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, check=False)

    bad = run("-m", "istio_iptables", "-p", "99999", "--dry-run")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "-p/--envoy-port" in bad.stderr
    good = run("-m", "istio_iptables", "-p", "15001", "-i", "*", "--dry-run")
    assert good.returncode == 0 and "-A ISTIO_OUTPUT" in good.stdout
    probe = "import gc, sys; import istio_iptables.{} as m; sys.exit(0 if gc.isenabled() else 3)"
    assert run("-c", probe.format("cli.fast")).returncode == 0
    assert run("-c", probe.format("cli.console")).returncode == 3
