"""The command line: Istio's injector arguments, bad input, help, logging and the dry-run outputs.

Every run is a dry run or stops at a bad value; ``command.run`` is wrapped so that a run that is not a dry run
is recorded and never applied, whatever the package does.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from istio_iptables.capture.config import SETTINGS, Config, Setting
from istio_iptables.host import hostfacts
from istio_iptables.log import Log, LogLevel, LogOptions, configure
from tests.helpers import ROOT, Result, record_runs, run_cli

# ---- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """The CLI reconfigures the root logger; give every test the logger it started with."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def applied(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Configs that reached ``run`` without --dry-run: recorded, never applied."""
    return record_runs(monkeypatch)


def run(args: list[str], env: dict[str, str] | None = None) -> Result:
    """``run_cli``, with an escaping exception turned into the traceback a user would see."""
    try:
        return run_cli(args, env)
    except Exception:
        return Result(-1, "", traceback.format_exc())


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout
    assert result.code == 2, result
    assert result.stdout == ""
    assert result.stderr.endswith("\n"), repr(result.stderr)
    assert len(result.stderr.splitlines()) == 1, repr(result.stderr)
    assert result.stderr.count("\n") == 1, repr(result.stderr)
    line = result.stderr.rstrip("\n")
    assert line.startswith("istio-iptables: "), line
    for needle in needles:
        assert needle in line, (needle, line)


NO_IPV6 = ["--no-ipv6"]


def v6(payload: str) -> str:
    return payload.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128")


# ---- (1) the injector's arguments print Istio's payload --------------------------------------------------

PAYLOAD_HEAD = """\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
"""
PAYLOAD_TAIL = """\
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""
# Reference section 3.8, verbatim.
PAYLOAD_15090_15021_15020 = (
    PAYLOAD_HEAD
    + "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN\n"
    + "-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN\n"
    + "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN\n"
    + PAYLOAD_TAIL
)
PAYLOAD_15090_15020 = (
    PAYLOAD_HEAD
    + "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN\n"
    + "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN\n"
    + PAYLOAD_TAIL
)
INJECTOR_BASE = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
INJECTOR_ARGS = {
    "15090,15020": (
        [*INJECTOR_BASE, "-d", "15090,15020"],
        PAYLOAD_15090_15020,
    ),
    "15090,15021,15020": (
        [*INJECTOR_BASE, "-d", "15090,15021,15020", "--log_output_level=default:info"],
        PAYLOAD_15090_15021_15020,
    ),
}


@pytest.mark.parametrize("case", INJECTOR_ARGS)
def test_injector_arguments_ipv4(case: str) -> None:
    args, payload = INJECTOR_ARGS[case]
    result = run([*args, "--dry-run", "--no-ipv6"])
    assert result.code == 0, result
    assert result.stdout == "# iptables-restore --noflush\n" + payload
    assert result.stderr == ""


@pytest.mark.parametrize("case", INJECTOR_ARGS)
def test_injector_arguments_ipv6(case: str) -> None:
    args, payload = INJECTOR_ARGS[case]
    result = run([*args, "--dry-run", "--ipv6"])
    assert result.code == 0, result
    assert result.stdout == (
        "# iptables-restore --noflush\n" + payload + "# ip6tables-restore --noflush\n" + v6(payload)
    )
    assert result.stderr == ""


def test_long_flag_spellings_give_the_same_payload() -> None:
    result = run(
        [
            "--envoy-port=15001",
            "--inbound-capture-port",
            "15006",
            "--proxy-uid=1337",
            "--istio-inbound-interception-mode=REDIRECT",
            "--istio-service-cidr=*",
            "--istio-service-exclude-cidr=",
            "--istio-inbound-ports",
            "*",
            "--istio-local-exclude-ports=15090,15021,15020",
            "-n",
            "--no-ipv6",
        ]
    )
    assert result.code == 0, result
    assert result.stdout == "# iptables-restore --noflush\n" + PAYLOAD_15090_15021_15020


def test_dry_run_from_the_environment(applied: list[Config]) -> None:
    args, payload = INJECTOR_ARGS["15090,15021,15020"]
    result = run([*args, "--no-ipv6"], {"DRY_RUN": "true"})
    assert result.code == 0, result
    assert result.stdout == "# iptables-restore --noflush\n" + payload
    assert applied == []


def test_empty_dry_run_variable_is_unset(applied: list[Config]) -> None:
    result = run(NO_IPV6, {"DRY_RUN": ""})
    assert result.code == 0, result
    assert [config.dry_run for config in applied] == [False]


def test_command_line_switch_beats_both_variables() -> None:
    env = {"REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "false"}
    result = run(["-n", "--no-ipv6", "--redirect-dns", "--dns-servers", "10.96.0.10"], env)
    assert result.code == 0, result
    assert "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053\n" in (result.stdout)


@pytest.mark.parametrize(
    ("env", "dns"),
    [
        ({}, False),
        ({"REDIRECT_DNS": "true"}, True),
        ({"ISTIO_META_DNS_CAPTURE": "true"}, True),
        ({"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "false"}, False),
        ({"REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "true"}, True),
        ({"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": ""}, True),
    ],
)
def test_dns_capture_variables(env: dict[str, str], dns: bool) -> None:
    result = run(["-n", "--no-ipv6", "--dns-servers", "10.96.0.10"], env)
    assert result.code == 0, result
    assert ("ISTIO_OUTPUT_DNS" in result.stdout) is dns


def test_envoy_port_variable_is_ignored() -> None:
    args, payload = INJECTOR_ARGS["15090,15021,15020"]
    result = run([*args, "-n", "--no-ipv6"], {"ENVOY_PORT": "16001"})
    assert result.stdout == "# iptables-restore --noflush\n" + payload
    result = run(["-n", "--no-ipv6"], {"ENVOY_PORT": "16001"})
    assert "--to-ports 15001\n" in result.stdout
    assert "16001" not in result.stdout


def test_inbound_capture_port_precedence() -> None:
    from_env = run(["-n", "--no-ipv6"], {"INBOUND_CAPTURE_PORT": "16006"})
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006\n" in from_env.stdout
    from_flag = run(["-n", "--no-ipv6", "-z", "17006"], {"INBOUND_CAPTURE_PORT": "16006"})
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 17006\n" in from_flag.stdout
    assert "16006" not in from_flag.stdout


# ---- (2) bad input: exit 2, one line naming the flag or variable and the value, nothing touched ----------

BAD_INPUTS = [
    # token smuggling
    pytest.param(["-b", "80 -j ACCEPT"], {}, ("-b", "80 -j ACCEPT"), id="inbound-ports-smuggle"),
    pytest.param(["-i", "10.0.0.0/8 -j ACCEPT"], {}, ("-i", "10.0.0.0/8 -j ACCEPT"), id="cidr-smuggle"),
    pytest.param(["-c", "eth0 -j DROP"], {}, ("-c", "eth0 -j DROP"), id="exclude-nic-smuggle"),
    pytest.param(["-k", "a;b"], {}, ("-k", "a;b"), id="kubevirt-semicolon"),
    pytest.param(["-u", "1337 -j"], {}, ("-u", "1337 -j"), id="uid-smuggle"),
    pytest.param(["-g", "1337 -j ACCEPT"], {}, ("-g", "1337 -j ACCEPT"), id="gid-smuggle"),
    pytest.param(["-m", "TPROXY -j ACCEPT"], {}, ("-m", "TPROXY -j ACCEPT"), id="mode-smuggle"),
    pytest.param(["-q", "80 --dport 1"], {}, ("-q", "80 --dport 1"), id="outbound-ports-smuggle"),
    pytest.param(["-x", "10.0.0.0/8 -j DROP"], {}, ("-x", "10.0.0.0/8 -j DROP"), id="exclude-cidr-smuggle"),
    pytest.param(["-t", "1337 -j DROP"], {}, ("-t", "1337 -j DROP"), id="mark-smuggle"),
    # newlines and carriage returns in values
    pytest.param(["-b", "80\n-j ACCEPT"], {}, ("-b", "80", "-j ACCEPT"), id="newline-ports"),
    pytest.param(["-c", "eth0\neth1"], {}, ("-c", "eth0", "eth1"), id="newline-nics"),
    pytest.param(["-i", "10.0.0.0/8\n-A OUTPUT"], {}, ("-i", "10.0.0.0/8", "-A OUTPUT"), id="newline-cidr"),
    pytest.param(["-c", "eth0\rDROP"], {}, ("-c", "eth0", "DROP"), id="carriage-return"),
    # CIDRs
    pytest.param(["-x", "*"], {}, ("-x", "'*'"), id="exclude-cidr-wildcard"),
    pytest.param(["-x", "10.0.0.1"], {}, ("-x", "10.0.0.1"), id="exclude-cidr-no-prefix"),
    pytest.param(["-i", "10.0.0.1"], {}, ("-i", "10.0.0.1"), id="include-cidr-no-prefix"),
    pytest.param(["-i", "*,10.0.0.0/8"], {}, ("-i", "*,10.0.0.0/8"), id="include-cidr-wildcard-mixed"),
    pytest.param(["-i", "10.0.0.0/33"], {}, ("-i", "10.0.0.0/33"), id="cidr-v4-prefix"),
    pytest.param(["-i", "2001:db8::/129"], {}, ("-i", "2001:db8::/129"), id="cidr-v6-prefix"),
    pytest.param(["-i", "fe80::1%eth0/64"], {}, ("-i", "fe80::1%eth0/64"), id="cidr-zone"),
    # ports
    pytest.param(["-p", "0"], {}, ("-p", "'0'"), id="port-zero"),
    pytest.param(["-p", "65536"], {}, ("-p", "65536"), id="port-too-big"),
    pytest.param(["-z", "99999"], {}, ("-z", "99999"), id="inbound-port-too-big"),
    pytest.param(["-p", "0x50"], {}, ("-p", "0x50"), id="port-hex"),
    pytest.param(["-e", "0o17"], {}, ("-e", "0o17"), id="port-octal"),
    pytest.param(["-p", "-1"], {}, ("-p", "-1"), id="port-negative"),
    pytest.param(["-b", "*,80"], {}, ("-b", "*,80"), id="ports-wildcard-mixed"),
    pytest.param(["-d", "15090,abc"], {}, ("-d", "abc"), id="exclude-ports-word"),
    pytest.param(["-o", "80,,70000"], {}, ("-o", "70000"), id="outbound-exclude-too-big"),
    pytest.param(["--iptables-probe-port", "70000"], {}, ("--iptables-probe-port", "70000"), id="probe-port"),
    pytest.param(["--envoy-port="], {}, ("--envoy-port", "''"), id="port-empty"),
    # ids, marks, tables
    pytest.param(["-u", "-5"], {}, ("-u", "-5"), id="uid-negative"),
    pytest.param(["-u", "4294967295"], {}, ("-u", "4294967295"), id="uid-too-big"),
    pytest.param(["-g", "root"], {}, ("-g", "root"), id="gid-name"),
    pytest.param(["-t", "0"], {}, ("-t", "'0'"), id="mark-zero"),
    pytest.param(["-t", "4294967296"], {}, ("-t", "4294967296"), id="mark-too-big"),
    pytest.param(["-t", "0x539"], {}, ("-t", "0x539"), id="mark-hex"),
    pytest.param(["-r", "254"], {}, ("-r", "254"), id="route-table-main"),
    pytest.param(["-r", "0"], {}, ("-r", "'0'"), id="route-table-zero"),
    # interfaces
    pytest.param(["-c", "abcdefghijklmnop"], {}, ("-c", "abcdefghijklmnop"), id="nic-too-long"),
    pytest.param(["-k", "eth/0"], {}, ("-k", "eth/0"), id="nic-slash"),
    # mode
    pytest.param(["-m", "NONE"], {}, ("-m", "NONE"), id="mode-none"),
    pytest.param(["-m", "tproxy2"], {}, ("-m", "tproxy2"), id="mode-garbage"),
    # durations
    pytest.param(["--probe-timeout", "0"], {}, ("--probe-timeout", "'0'"), id="duration-zero"),
    pytest.param(["--probe-timeout", "5"], {}, ("--probe-timeout", "'5'"), id="duration-no-unit"),
    pytest.param(["--probe-timeout", "5x"], {}, ("--probe-timeout", "5x"), id="duration-unit"),
    pytest.param(["--probe-timeout", "-5s"], {}, ("--probe-timeout", "-5s"), id="duration-negative"),
    pytest.param(["--probe-timeout", "soon"], {}, ("--probe-timeout", "soon"), id="duration-word"),
    # choices of this implementation
    pytest.param(
        ["--force-iptables-binary", "iptables"], {}, ("--force-iptables-binary", "iptables"), id="force-binary"
    ),
    pytest.param(["--dry-run-format", "yaml"], {}, ("--dry-run-format", "yaml"), id="dry-run-format"),
    pytest.param(["--backend", "nft"], {}, ("--backend", "nft"), id="backend"),
    pytest.param(["--dns-servers", "10.0.0.1/32"], {}, ("--dns-servers", "10.0.0.1/32"), id="dns-server-cidr"),
    pytest.param(["--log_output_level", "default:verbose"], {}, ("--log_output_level", "verbose"), id="log-level"),
    pytest.param(["--outbound-owner-groups", "*,1337"], {}, ("--outbound-owner-groups", "*,1337"), id="groups-mixed"),
    pytest.param(
        ["--host-ipv4-loopback-cidr", "10.0.0.1/8"],
        {},
        ("--host-ipv4-loopback-cidr", "10.0.0.1/8"),
        id="loopback-flag",
    ),
    pytest.param(["--network-namespace", ".."], {}, ("--network-namespace", ".."), id="netns-dotdot"),
    # command-line syntax
    pytest.param(["--bogus"], {}, ("--bogus",), id="unknown-flag"),
    pytest.param(["-f"], {}, ("-f",), id="removed-restore-format"),
    pytest.param(["--restore-format"], {}, ("--restore-format",), id="removed-restore-format-long"),
    pytest.param(["--iptables-trace-logging"], {}, ("--iptables-trace-logging",), id="removed-trace-logging"),
    pytest.param(["-p"], {}, ("-p",), id="missing-value-short"),
    pytest.param(["--istio-inbound-ports"], {}, ("--istio-inbound-ports",), id="missing-value-long"),
    pytest.param(["--log_as_json=yes"], {}, ("--log_as_json",), id="switch-with-value"),
    # environment
    pytest.param([], {"INBOUND_CAPTURE_PORT": "abc"}, ("INBOUND_CAPTURE_PORT", "abc"), id="env-port"),
    pytest.param([], {"REDIRECT_DNS": "maybe"}, ("REDIRECT_DNS", "maybe"), id="env-bool"),
    pytest.param([], {"ISTIO_META_DNS_CAPTURE": "yes"}, ("ISTIO_META_DNS_CAPTURE", "yes"), id="env-extra-bool"),
    pytest.param([], {"INVALID_DROP": "2"}, ("INVALID_DROP", "'2'"), id="env-invalid-drop"),
    pytest.param([], {"ISTIO_DUAL_STACK": "on"}, ("ISTIO_DUAL_STACK", "on"), id="env-dual-stack"),
    pytest.param(
        [],
        {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "10.0.0.1/8"},
        ("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/8"),
        id="env-loopback-not-loopback",
    ),
    pytest.param(
        [],
        {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/7"},
        ("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/7"),
        id="env-loopback-prefix",
    ),
    pytest.param(
        [],
        {"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(str(n) for n in range(65))},
        ("ISTIO_OUTBOUND_OWNER_GROUPS", "0,1,2,3"),
        id="env-65-groups",
    ),
    pytest.param(
        [],
        {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "*"},
        ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "'*'"),
        id="env-groups-exclude-wildcard",
    ),
    pytest.param([], {"PROXY_UID": "1337 -j ACCEPT"}, ("PROXY_UID", "1337 -j ACCEPT"), id="env-uid-smuggle"),
    pytest.param(
        [],
        {"ISTIO_SERVICE_CIDR": "10.0.0.0/8\n-j ACCEPT"},
        ("ISTIO_SERVICE_CIDR", "10.0.0.0/8", "-j ACCEPT"),
        id="env-newline",
    ),
    pytest.param([], {"PROBE_TIMEOUT": "5"}, ("PROBE_TIMEOUT", "'5'"), id="env-duration"),
    pytest.param(
        [],
        {"ISTIO_INBOUND_INTERCEPTION_MODE": "NONE"},
        ("ISTIO_INBOUND_INTERCEPTION_MODE", "NONE"),
        id="env-mode",
    ),
    pytest.param(
        [],
        {"ISTIO_INBOUND_TPROXY_ROUTE_TABLE": "255"},
        ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "255"),
        id="env-route-table",
    ),
    pytest.param([], {"FORCE_IPTABLES_BINARY": "auto"}, ("FORCE_IPTABLES_BINARY", "auto"), id="env-binary"),
    pytest.param([], {"KUBE_VIRT_INTERFACES": "eth0 eth1"}, ("KUBE_VIRT_INTERFACES", "eth0 eth1"), id="env-nics"),
    pytest.param([], {"ENVOY_USER": ""}, ("ENVOY_USER", "''"), id="env-empty-user"),
]


def test_there_are_dozens_of_bad_inputs() -> None:
    assert len(BAD_INPUTS) >= 40


@pytest.mark.parametrize(("args", "env", "needles"), BAD_INPUTS)
def test_bad_input_dry_run(
    args: list[str], env: dict[str, str], needles: tuple[str, ...], applied: list[Config]
) -> None:
    result = run(["--dry-run", "--no-ipv6", *args], env)
    assert_one_line_error(result, *needles)
    assert applied == []


@pytest.mark.parametrize(("args", "env", "needles"), BAD_INPUTS)
def test_bad_input_without_dry_run_stops_before_anything(
    args: list[str], env: dict[str, str], needles: tuple[str, ...], applied: list[Config]
) -> None:
    result = run(["--no-ipv6", *args], env)
    assert_one_line_error(result, *needles)
    assert applied == []


def test_bad_dry_run_variable(applied: list[Config]) -> None:
    assert_one_line_error(run(NO_IPV6, {"DRY_RUN": "maybe"}), "DRY_RUN", "maybe")
    assert applied == []


def test_bad_input_through_python_m() -> None:
    for args in (["-b", "80 -j ACCEPT"], ["-k", "a;b"]):
        completed = subprocess.run(
            [sys.executable, "-m", "istio_iptables", "-n", "--no-ipv6", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert_one_line_error(Result(completed.returncode, completed.stdout, completed.stderr), args[0], args[1])


def test_unwritable_dry_run_file_is_a_one_line_error(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "dry-run.log"
    result = run(["-n", "--no-ipv6"], {"DRY_RUN_FILE_PATH": str(target)})
    assert_one_line_error(result, "DRY_RUN_FILE_PATH", str(target))


def test_unwritable_log_target_is_a_one_line_error(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "log"
    result = run(["-n", "--no-ipv6", f"--log_target={target}"])
    assert_one_line_error(result, "--log_target", str(target))


# ---- (3) help -------------------------------------------------------------------------------------------


@functools.cache
def help_text() -> str:
    result = run(["--help"])
    assert result.code == 0, result
    assert result.stderr == ""
    # Undo the help formatter's line wrapping, including breaks after a hyphen ("--no-\n  reconcile").
    return " ".join(re.sub(r"(?<=\w-)\n\s+", "", result.stdout).split())


def test_help_exits_zero_and_short_h_works() -> None:
    assert run(["--help"]).code == 0
    short = run(["-h"])
    assert short.code == 0
    assert short.stdout == run(["--help"]).stdout


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.flags], ids=lambda s: s.key)
def test_help_mentions_each_flag(setting: Setting) -> None:
    text = help_text()
    for flag in (*setting.flags, *((setting.negation,) if setting.negation else ())):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), flag
    if len(setting.flags) == 2:
        assert f"{setting.flags[1]}, {setting.flags[0]}" in text


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.envvars], ids=lambda s: s.key)
def test_help_mentions_each_variable(setting: Setting) -> None:
    text = help_text()
    for name in setting.envvars:
        assert re.search(rf"(?<!\w){name}(?!\w)", text), name
    if setting.flags:
        assert f"[env: {', '.join(setting.envvars)}]" in text


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.key)
def test_help_mentions_each_default(setting: Setting) -> None:
    text = help_text()
    shown = setting.default or "(empty)"
    if setting.flags:
        assert f"[default: {shown}]" in text
    else:
        assert f"{setting.envvars[0]} (" in text
        assert f"default: {shown})" in text


def test_python_m_help() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "istio_iptables", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("Usage: ")
    assert "--envoy-port" in completed.stdout
    assert "ISTIO_META_DNS_CAPTURE" in completed.stdout
    assert "Traceback" not in completed.stderr


# ---- (4) logging ----------------------------------------------------------------------------------------


@pytest.fixture
def resolv_with_bad_entry(tmp_path: Path) -> Path:
    # A nameserver that is not an address is skipped with a debug line: the one log line a dry run makes.
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver bogus\nnameserver 10.96.0.10\n")
    return path


def dns_args(resolv: Path) -> list[str]:
    return ["-n", "--no-ipv6", "--redirect-dns", "--resolv-conf", str(resolv)]


def assert_payload_only(stdout: str) -> None:
    assert stdout.startswith("# iptables-restore --noflush\n* nat\n")
    for line in stdout.splitlines():
        assert line == "COMMIT" or line[:2] in ("# ", "* ", "-N", "-A", "-I"), line


def test_debug_log_goes_to_stderr_in_text(resolv_with_bad_entry: Path) -> None:
    result = run([*dns_args(resolv_with_bad_entry), "--log_output_level=default:debug"])
    assert result.code == 0, result
    assert_payload_only(result.stdout)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    stamp, level, message = lines[0].split("\t")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert level == "debug"
    assert message == f"nameserver bogus in {resolv_with_bad_entry} is not an IP address; skipped"


def test_log_as_json(resolv_with_bad_entry: Path) -> None:
    result = run([*dns_args(resolv_with_bad_entry), "--log_output_level=default:debug", "--log_as_json"])
    assert result.code == 0, result
    assert_payload_only(result.stdout)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    entry = json.loads(lines[0])
    assert isinstance(entry, dict)
    assert entry["level"] == "debug"
    assert entry["msg"] == f"nameserver bogus in {resolv_with_bad_entry} is not an IP address; skipped"
    assert entry["scope"] == "default"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", entry["time"])


def test_default_level_hides_debug(resolv_with_bad_entry: Path) -> None:
    result = run(dns_args(resolv_with_bad_entry))
    assert result.code == 0, result
    assert result.stderr == ""


def test_log_level_none_silences(resolv_with_bad_entry: Path) -> None:
    result = run([*dns_args(resolv_with_bad_entry), "--log_output_level=default:none"])
    assert result.code == 0, result
    assert result.stderr == ""
    assert_payload_only(result.stdout)


def test_log_target_file(resolv_with_bad_entry: Path, tmp_path: Path) -> None:
    target = tmp_path / "istio-iptables.log"
    result = run(
        [
            *dns_args(resolv_with_bad_entry),
            "--log_output_level=default:debug",
            "--log_as_json",
            f"--log_target={target}",
        ]
    )
    assert result.code == 0, result
    assert result.stderr == ""
    assert_payload_only(result.stdout)
    for handler in logging.getLogger().handlers:
        handler.flush()
    lines = target.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["level"] == "debug"


def test_logs_never_go_to_stdout(resolv_with_bad_entry: Path) -> None:
    result = run([*dns_args(resolv_with_bad_entry), "--log_output_level=default:debug"])
    assert "nameserver bogus" not in result.stdout
    assert "nameserver bogus" in result.stderr


def capture_log(options: LogOptions, emit: Callable[[logging.Logger], None]) -> str:
    stream = io.StringIO()
    with contextlib.redirect_stderr(stream):
        configure(options)
        emit(logging.getLogger())
    return stream.getvalue()


def test_formatter_json_levels() -> None:
    def emit(logger: logging.Logger) -> None:
        logger.debug("d")
        logger.info("hello %s", "world")
        logger.warning("w")
        logger.error("e")
        logger.critical("c")

    text = capture_log(LogOptions(level=LogLevel.DEBUG, as_json=True), emit)
    entries = [json.loads(line) for line in text.splitlines()]
    assert [(entry["level"], entry["msg"]) for entry in entries] == [
        ("debug", "d"),
        ("info", "hello world"),
        ("warn", "w"),
        ("error", "e"),
        ("fatal", "c"),
    ]
    assert all(isinstance(entry, dict) for entry in entries)


def test_formatter_respects_the_level() -> None:
    def emit(logger: logging.Logger) -> None:
        logger.info("i")
        logger.warning("w")

    assert capture_log(LogOptions(level=LogLevel.NONE), emit) == ""
    warn_only = capture_log(LogOptions(level=LogLevel.WARN), emit)
    assert [line.split("\t")[1:] for line in warn_only.splitlines()] == [["warn", "w"]]


def test_formatter_json_escapes_newlines() -> None:
    text = capture_log(LogOptions(as_json=True), lambda logger: logger.info("two\nlines"))
    assert len(text.splitlines()) == 1
    assert json.loads(text)["msg"] == "two\nlines"


def test_formatter_caller() -> None:
    def emit(logger: logging.Logger) -> None:
        logger.info("here")

    text = capture_log(LogOptions(as_json=True, caller=True), emit)
    assert "emit" in json.loads(text)["caller"]


def test_stack_traces_above_the_level_name_the_caller_not_logging() -> None:
    def emit(logger: logging.Logger) -> None:
        Log("istio_iptables.test").info("below")
        Log("istio_iptables.test").error("above")

    text = capture_log(LogOptions(stacktrace_level=LogLevel.ERROR), emit)
    below, above = text.split("\n", 1)
    assert below.endswith("\tinfo\tbelow")
    assert "\terror\tabove\n" in above and "in emit" in above
    assert "logging/__init__.py" not in above and "logsetup.py" not in above


def test_a_console_run_imports_logging_with_its_first_message(resolv_with_bad_entry: Path, tmp_path: Path) -> None:
    """In a process of its own, where logging is not loaded yet: handlers installed by the first message
    that passes the level, the target file created by configure even when nothing is logged."""
    probe = (
        "import sys; from istio_iptables.cli import fast as cli\n"
        "try: cli.main(sys.argv[1:])\n"
        "except SystemExit as exit_: assert exit_.code == 0, exit_.code\n"
        "print('logging' in sys.modules, file=sys.stderr)\n"
    )

    def console(*arguments: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", probe, *dns_args(resolv_with_bad_entry), *arguments]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    quiet_target = tmp_path / "quiet.log"
    quiet = console(f"--log_target={quiet_target}")
    assert quiet.stderr == "False\n" and quiet_target.read_text() == ""
    debug = console("--log_output_level=default:debug", "--log_caller=default")
    line, loaded = debug.stderr.splitlines()
    assert "\tdebug\thostfacts.nameserver_addresses:" in line  # --log_caller names our caller, not the logger
    assert "nameserver bogus" in line and loaded == "True"


def test_a_console_run_writes_plain_log_lines_without_logging(resolv_with_bad_entry: Path, tmp_path: Path) -> None:
    """Without --log_caller or stack traces, a console run writes its lines itself (importing logging would
    cost a sixth of an apply), in the same layout as the logging formatter, to every target."""
    probe = (
        "import sys; from istio_iptables.cli import fast as cli\n"
        "try: cli.main(sys.argv[1:])\n"
        "except SystemExit as exit_: assert exit_.code == 0, exit_.code\n"
        "print('logging' in sys.modules, file=sys.stderr)\n"
    )
    target = tmp_path / "log.jsonl"
    for extra, decode in (([], lambda line: line.split("\t")[1:]), (["--log_as_json"], _json_level_and_message)):
        command = [sys.executable, "-c", probe, *dns_args(resolv_with_bad_entry), "--log_output_level=default:debug"]
        done = subprocess.run([*command, *extra], capture_output=True, text=True, check=False)
        line, loaded = done.stderr.splitlines()
        assert loaded == "False", done.stderr
        message = f"nameserver bogus in {resolv_with_bad_entry} is not an IP address; skipped"
        assert decode(line) == ["debug", message]
        in_process = run([*dns_args(resolv_with_bad_entry), "--log_output_level=default:debug", *extra])
        assert decode(in_process.stderr.rstrip("\n")) == ["debug", message]  # the logging module's line
    command = [sys.executable, "-c", probe, *dns_args(resolv_with_bad_entry), "--log_output_level=default:debug"]
    both = [*command, "--log_as_json", f"--log_target=stderr,{target}"]
    done = subprocess.run(both, capture_output=True, text=True, check=False)
    assert done.stderr.splitlines()[0] == target.read_text().rstrip("\n")


def _json_level_and_message(line: str) -> list[str]:
    entry = json.loads(line)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", entry["time"]) and entry["scope"] == "default"
    return [entry["level"], entry["msg"]]


# ---- (5) DRY_RUN_FILE_PATH -------------------------------------------------------------------------------


def test_dry_run_file_ipv4(tmp_path: Path) -> None:
    target = tmp_path / "dry-run.log"
    args, payload = INJECTOR_ARGS["15090,15021,15020"]
    result = run([*args, "-n", "--no-ipv6"], {"DRY_RUN_FILE_PATH": str(target)})
    assert result.code == 0, result
    assert result.stdout == "# iptables-restore --noflush\n" + payload
    assert target.read_text() == "iptables-save\nip6tables-save\n" + payload + "iptables-save\n"


def test_dry_run_file_ipv6(tmp_path: Path) -> None:
    target = tmp_path / "dry-run.log"
    args, payload = INJECTOR_ARGS["15090,15021,15020"]
    result = run([*args, "-n", "--ipv6"], {"DRY_RUN_FILE_PATH": str(target)})
    assert result.code == 0, result
    assert target.read_text() == (
        "iptables-save\nip6tables-save\n" + payload + v6(payload) + "iptables-save\nip6tables-save\n"
    )


# ---- (6) other dry-run formats ------------------------------------------------------------------------

TPROXY_ARGS = ["-n", "--ipv6", "-m", "TPROXY", "-b", "*", "-i", "*", "-d", "15090,15021,15020"]


def test_commands_format_lines() -> None:
    result = run([*TPROXY_ARGS, "--dry-run-format", "commands"])
    assert result.code == 0, result
    lines = result.stdout.splitlines()
    assert lines
    assert result.stdout.endswith("\n")
    for line in lines:
        assert line.startswith(("iptables -t ", "ip6tables -t ", "ip ")), line
    assert "iptables -t mangle -N ISTIO_DIVERT" in lines
    assert "iptables -t nat -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in lines
    assert "ip6tables -t nat -A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN" in lines
    assert lines[-5:] == [
        "ip -6 addr add ::6/128 dev lo",
        "ip rule add fwmark 1337 lookup 133",
        "ip route add local default dev lo table 133",
        "ip -6 rule add fwmark 1337 lookup 133",
        "ip -6 route add local default dev lo table 133",
    ]


def test_commands_format_matches_the_restore_payload() -> None:
    args, payload = INJECTOR_ARGS["15090,15021,15020"]
    result = run([*args, "-n", "--no-ipv6", "--dry-run-format", "commands"])
    assert result.code == 0, result
    expected = [f"iptables -t nat {line}" for line in payload.splitlines()[1:-1]]
    assert result.stdout.splitlines() == expected


def restore_sections(stdout: str) -> dict[tuple[str, str], list[str]]:
    """``{(family, table): lines}`` from a restore-format dry run."""
    sections: dict[tuple[str, str], list[str]] = {}
    family = table = ""
    for line in stdout.splitlines():
        if line.startswith("# "):
            family = "ipv6" if "ip6tables" in line else "ipv4"
        elif line.startswith("* "):
            table = line[2:]
            sections[(family, table)] = []
        elif line != "COMMIT":
            sections[(family, table)].append(line)
    return sections


def test_json_format() -> None:
    result = run([*TPROXY_ARGS, "--dry-run-format", "json"])
    assert result.code == 0, result
    document = json.loads(result.stdout)
    assert {"version", "families", "routes"} <= set(document)
    assert document["version"] == 1
    assert [family["family"] for family in document["families"]] == ["ipv4", "ipv6"]
    restore = restore_sections(run(TPROXY_ARGS).stdout)
    seen = {}
    for family in document["families"]:
        for table in family["tables"]:
            assert {"table", "chains", "rules"} <= set(table)
            for rule in table["rules"]:
                assert {"chain", "clauses", "target"} <= set(rule)
            seen[(family["family"], table["table"])] = [f"-N {chain}" for chain in table["chains"]] + [
                rule["text"] for rule in table["rules"]
            ]
    assert seen == restore
    assert document["routes"] == [
        {"family": "ipv4", "mark": 1337, "table": 133},
        {"family": "ipv6", "mark": 1337, "table": 133},
    ]


def test_json_without_routes() -> None:
    result = run(["-n", "--no-ipv6", "--dry-run-format", "json"])
    document = json.loads(result.stdout)
    assert document["routes"] == []
    assert [family["family"] for family in document["families"]] == ["ipv4"]


# ---- host facts through the command line -----------------------------------------------------------------


def test_forced_ipv6_reads_no_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> list[object]:
        raise AssertionError("addresses read although --ipv6/--no-ipv6 was given")

    monkeypatch.setattr(hostfacts, "local_addresses", fail)
    assert run(["-n", "--ipv6"]).code == 0
    assert run(["-n", "--no-ipv6"]).code == 0


def test_detected_ipv6_only_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "local_addresses", lambda: [ip_address("::1"), ip_address("2001:db8::5")])
    result = run(["-n"])
    assert result.code == 0, result
    assert "# ip6tables-restore --noflush\n" in result.stdout


def test_no_usable_address_is_a_one_line_host_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostfacts, "local_addresses", lambda: [ip_address("127.0.0.1"), ip_address("::1")])
    result = run(["-n"])
    assert result.code == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "no valid local IP address found" in result.stderr


def test_missing_resolv_conf_is_a_one_line_host_error(tmp_path: Path) -> None:
    missing = tmp_path / "resolv.conf"
    result = run(["-n", "--no-ipv6", "--redirect-dns", "--resolv-conf", str(missing)])
    assert result.code == 1
    assert result.stdout == ""
    assert result.stderr == (f"istio-iptables: cannot read DNS servers from {missing}: No such file or directory\n")
