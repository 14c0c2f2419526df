"""The command line's edges: --version, shell completion, istio-clean-iptables as a command of its own,
formats native nftables cannot print, trace without its needed option, metavars, error wording that is ours
and not Python's, and flags given on the wrong side of a subcommand.

Runs are dry runs or stop at a bad value; ``command.run`` is wrapped so that anything else is recorded, never
applied.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istio_iptables.capture import config
from istio_iptables.capture.config import Config
from istio_iptables.cli import app, command
from istio_iptables.cli import fast as cli
from tests.helpers import Result, record_runs, run_cli
from tests.test_cli_parsing import option

F = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
F += ["-d", "15090,15021,15020"]


@pytest.fixture(autouse=True)
def applied(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Configs that reached ``run`` without --dry-run: recorded, never applied."""
    return record_runs(monkeypatch)


def run_clean(args: list[str], env: dict[str, str] | None = None) -> Result:
    return run_cli(args, env, main=cli.clean_main)


def one_line_error(result: Result, prog: str = "istio-iptables") -> str:
    assert result.code == 2, result
    assert result.stdout == "" and "Traceback" not in result.stderr, result
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"{prog}: "), result.stderr
    return result.stderr.rstrip("\n")


# ---- --version ------------------------------------------------------------------------------------------


def test_version() -> None:
    assert run_cli(["--version"]) == Result(0, f"istio-iptables {version('istio-iptables')}\n", "")
    assert run_clean(["--version"]) == Result(0, f"istio-clean-iptables {version('istio-iptables')}\n", "")


# ---- shell completion -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_show_completion_prints_each_shells_script(shell: str) -> None:
    # Without detection, Typer takes the shell as the option's value.
    result = run_cli(["--show-completion", shell], {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert result.code == 0, result
    assert "_ISTIO_IPTABLES_COMPLETE" in result.stdout
    assert {"bash": "complete_bash", "zsh": "#compdef istio-iptables", "fish": "complete --command"}[shell] in (
        result.stdout
    )


@pytest.mark.parametrize(
    ("shell", "env", "expected"),
    [
        ("bash", {"COMP_WORDS": "istio-iptables --dry", "COMP_CWORD": "1"}, {"--dry-run", "--dry-run-format"}),
        ("bash", {"COMP_WORDS": "istio-iptables tr", "COMP_CWORD": "1"}, {"trace"}),
        ("zsh", {"_TYPER_COMPLETE_ARGS": "istio-iptables --dry-run-f"}, {"--dry-run-format"}),
        (
            "fish",
            {"_TYPER_COMPLETE_ARGS": "istio-iptables trace ", "_TYPER_COMPLETE_FISH_ACTION": "get-args"},
            {"outbound", "inbound"},
        ),
    ],
)
def test_a_completion_request_is_answered_and_never_runs(
    shell: str, env: dict[str, str], expected: set[str], applied: list[Config]
) -> None:
    """The shell runs the command with no arguments and the completion variable set: a plain run (an
    apply) must not happen, Typer answers. The fast path once took the empty command line as an apply."""
    result = run_cli([], {"_ISTIO_IPTABLES_COMPLETE": f"complete_{shell}", **env})
    assert applied == []
    assert result.code == 0, result
    assert all(word in result.stdout for word in expected), result.stdout


def test_clean_completion_is_answered_and_never_runs(applied: list[Config]) -> None:
    env = {"_ISTIO_CLEAN_IPTABLES_COMPLETE": "complete_bash", "COMP_WORDS": "istio-clean-iptables --dr"}
    result = run_clean([], {**env, "COMP_CWORD": "1"})
    assert applied == [] and result.code == 0, result
    assert "--dry-run" in result.stdout and "--cleanup-only" not in result.stdout


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_bash_completes_through_the_installed_script(tmp_path: Path) -> None:
    """The script --show-completion prints, sourced in a real bash, completes through the console command.
    In a network namespace of its own (unshare -n), so even a run that went wrong could change nothing."""
    binary = Path(sys.executable).parent / "istio-iptables"
    script = subprocess.run(
        [binary, "--show-completion", "bash"],
        env={**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "completion.bash").write_text(script)
    probe = (
        f"source {tmp_path / 'completion.bash'}; COMP_WORDS=(istio-iptables --native-nf); COMP_CWORD=1; "
        "_istio_iptables_completion istio-iptables; printf '%s\\n' \"${COMPREPLY[@]}\"; "
        "iptables-save | grep -c ISTIO || true"
    )
    done = subprocess.run(
        ["unshare", "-n", "bash", "-c", probe],
        env={**os.environ, "PATH": f"{binary.parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["--native-nftables", "0"], done


# ---- istio-clean-iptables -------------------------------------------------------------------------------


def test_clean_help_describes_the_clean_up() -> None:
    result = run_clean(["--help"])
    assert result.code == 0, result
    assert result.stdout.startswith("Usage: istio-clean-iptables [OPTIONS]\n"), result.stdout
    assert "Remove every chain" in result.stdout and "COMMAND" not in result.stdout
    options = result.stdout.partition("\nOptions:\n")[2]
    assert "--cleanup-only" not in options and "Make every TCP connection" not in result.stdout


@pytest.mark.parametrize("args", [["status"], ["trace", "outbound"], ["graph"]])
def test_clean_takes_no_subcommands(args: list[str], applied: list[Config]) -> None:
    assert "unexpected extra argument" in one_line_error(run_clean(args), "istio-clean-iptables")
    assert applied == []


@pytest.mark.parametrize("flag", ["--no-cleanup-only", "--cleanup-only", "--cleanup-only=false"])
def test_clean_takes_no_cleanup_only_flag(flag: str, applied: list[Config]) -> None:
    line = one_line_error(run_clean([flag]), "istio-clean-iptables")
    assert line == "istio-clean-iptables: istio-clean-iptables only cleans up; to apply, run istio-iptables"
    assert applied == []


def test_clean_cleans_up_whatever_the_environment_says(applied: list[Config]) -> None:
    assert run_clean([*F], {"CLEANUP_ONLY": "false"}).code == 0
    assert [config.cleanup_only for config in applied] == [True]
    # The fast path and Typer's path agree (bundled short flags go to Typer).
    assert run_clean(["-nu", "1337", "--no-ipv6"]) == run_cli(["-n", "-u", "1337", "--no-ipv6", "--cleanup-only"])
    assert run_clean(["-n", "--no-ipv6"]) == run_cli(["-n", "--no-ipv6", "--cleanup-only"])


# ---- what native nftables can print -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "commands"])
def test_native_nftables_dry_run_names_the_format_it_supports(fmt: str) -> None:
    line = one_line_error(run_cli(["-n", "--native-nftables", "--dry-run-format", fmt, *F]))
    assert f"invalid value for --dry-run-format: '{fmt}'" in line and "the only format it supports" in line


def test_native_nftables_dry_run_prints_the_nft_transaction() -> None:
    result = run_cli(["-n", "--native-nftables", "--no-ipv6", *F])
    assert result.code == 0 and "add table inet istio-proxy-nat" in result.stdout, result


# ---- trace ------------------------------------------------------------------------------------------------


def test_trace_inbound_needs_port() -> None:
    line = one_line_error(run_cli([*F, "--no-ipv6", "trace", "inbound"]))
    assert line == "istio-iptables: trace inbound needs --port PORT"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--proto", "sctp"], "invalid value for --proto: 'sctp': must be one of: tcp, udp"),
        (["--state", "new-ish"], "invalid value for --state: 'new-ish': must be one of: "),
        (["--dst", "10.0.0.256:80"], "invalid value for --dst: '10.0.0.256:80': not an IPv4 or IPv6 address"),
        (["--dst", "10.0.0.5:0"], "invalid value for --dst: '10.0.0.5:0': port out of range (1-65535)"),
        (["--src", "10.0.0.x"], "invalid value for --src: '10.0.0.x': not an IPv4 or IPv6 address"),
    ],
)
def test_trace_errors_are_worded_by_us(args: list[str], message: str) -> None:
    command = [*F, "--no-ipv6", "trace", "outbound", "--dst", "10.0.0.5:443"]
    assert message in one_line_error(run_cli([*command, *args]))


# ---- help: every value has a name ----------------------------------------------------------------------------


def commands() -> list[tuple[str, object]]:
    main = typer.main.get_command(app.app)
    found = [("istio-iptables", main), ("istio-clean-iptables", typer.main.get_command(app.clean_app))]
    return found + [(f"istio-iptables {name}", sub) for name, sub in main.commands.items()]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "command"), commands(), ids=[name for name, _ in commands()])
def test_every_value_taking_option_names_its_value(name: str, command: object) -> None:
    for param in command.params:  # type: ignore[attr-defined]
        takes_value = param.param_type_name == "option" and not param.is_flag
        if takes_value and param.name != "show_completion":
            metavar = param.metavar or ""
            assert metavar and metavar not in ("TEXT", "<str>", "VALUE"), (name, param.opts, metavar)


@pytest.mark.parametrize("args", [["--help"], ["trace", "--help"], ["status", "--help"], ["graph", "--help"]])
def test_help_shows_no_type_placeholders(args: list[str]) -> None:
    result = run_cli(args)
    assert result.code == 0
    for placeholder in ("<str>", " TEXT", " INTEGER", "VALUE"):
        assert placeholder not in result.stdout, (args, placeholder)


# ---- flags on the wrong side of a subcommand ------------------------------------------------------------------


def test_a_subcommand_option_before_the_subcommand_says_where_it_belongs() -> None:
    line = one_line_error(run_cli(["--dst", "10.0.0.5:443", "trace", "outbound"]))
    assert "--dst is an option of 'trace': give it after the subcommand" in line
    line = one_line_error(run_cli(["--format", "json", "status"]))
    assert "--format is an option of 'preflight', 'status', 'trace' and 'graph'" in line


def test_a_main_flag_after_the_subcommand_says_where_it_belongs() -> None:
    line = one_line_error(run_cli(["trace", "outbound", "--dst", "10.0.0.5:443", "-p", "15001"]))
    assert "-p is a flag of istio-iptables itself: give it before 'trace'" in line


def test_an_unknown_flag_is_still_unknown() -> None:
    assert "No such option: --bogus" in one_line_error(run_cli(["--bogus", "1"]))


# ---- messages in our words --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "10.0.0.0/33"], "'10.0.0.0/33': prefix length 33 is over 32"),
        (["-x", "2001:db8::/129"], "'2001:db8::/129': prefix length 129 is over 128"),
        (["-x", "10.0.0.256/8"], "'10.0.0.256/8': not an IPv4 or IPv6 address"),
        (["-i", "10.0.0.0/8,10.0.0.0/40"], "'10.0.0.0/40': prefix length 40 is over 32"),
        (["--dns-servers", "10.0.0.300"], "'10.0.0.300': not an IPv4 or IPv6 address"),
        (["--host-ipv4-loopback-cidr", "127.0.0.1/99"], "prefix length 99 is over 32"),
    ],
)
def test_address_errors_are_worded_by_us(args: list[str], message: str) -> None:
    assert message in one_line_error(run_cli(["-n", "--no-ipv6", *args]))


PYTHON_WORDING = (
    "does not appear",
    "not permitted",
    "Octet",
    "octets",
    "Leading zeros",
    "Expected",
    "At most",
    "Exactly one",
    "invalid literal",
    "is not a valid",
    "has invalid prefix",
    "netmask",
    "Only hex digits",
    "Only decimal digits",
    "base 10",
)
PARSERS: list[Callable[[str], object]] = [
    config.parse_cidr,
    config.parse_cidrs,
    config.parse_cidr_selection,
    config.parse_address,
    config.parse_addresses,
    config.parse_loopback_cidr,
    config.parse_port,
    config.parse_ports,
    config.parse_port_selection,
    config.parse_id,
    config.parse_ids,
    config.parse_mark,
    config.parse_route_table,
    config.parse_interfaces,
    config.parse_groups_include,
    config.parse_mode,
    config.parse_duration,
    config.parse_netns,
    config.parse_force_binary,
]
ADDRESS_LIKE = st.text(alphabet="0123456789abcdefABx:./%,*-+ ", max_size=48)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PARSERS), st.one_of(ADDRESS_LIKE, st.text(max_size=20)))
def test_no_parser_speaks_pythons_words(parse: Callable[[str], object], text: str) -> None:
    try:
        parse(text)
    except ValueError as error:
        message = str(error)
        assert not any(words in message for words in PYTHON_WORDING), (text, message)


# ---- JSON ---------------------------------------------------------------------------------------------------


def test_json_set_lookups_say_what_they_look_up() -> None:
    result = run_cli(["-n", "--no-ipv6", "--match-sets", "--dry-run-format", "json", *F, "-x", "10.0.0.0/8"])
    document = json.loads(result.stdout)
    lookups = [
        clause
        for family in document["families"]
        for table in family["tables"]
        for rule in table["rules"]
        for clause in rule["clauses"]
        if clause["match"] == "in_set"
    ]
    assert lookups and all(clause["direction"] == "destination" for clause in lookups)
    assert {clause["name"] for clause in lookups} == {"ISTIO_EXCLUDE_CIDR4", "ISTIO_INBOUND_EXCLUDE_PORTS"}


CLEAN_COMMAND = typer.main.get_command(app.clean_app)
CLEAN_OPTIONS = option().filter(lambda words: words[0].partition("=")[0] not in ("--cleanup-only", "--no-cleanup-only"))


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CLEAN_OPTIONS, max_size=8))
def test_clean_command_lines_parse_as_typer_parses_them(options: list[list[str]]) -> None:
    """istio-clean-iptables' fast path reads what its Typer command would, as the main command's does."""
    arguments = [argument for each in options for argument in each]
    context = CLEAN_COMMAND.make_context(command.CLEAN_PROG, list(arguments))
    assert config.plain_run(arguments, config.CLEAN_OPTIONS) == dict(context.params)
