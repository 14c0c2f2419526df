"""The configuration layer: every value parser, the flag/env table, and Istio's precedence rules."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

import pytest

from istio_iptables.capture import config
from istio_iptables.capture.config import (
    ALL,
    MAX_OWNER_GROUPS,
    SETTINGS,
    SETTINGS_BY_KEY,
    Backend,
    Config,
    DryRunFormat,
    IptablesVariant,
    Mode,
    load,
)
from istio_iptables.errors import ConfigError
from istio_iptables.log import LogLevel, LogOptions

# ---- helpers ------------------------------------------------------------------------------------------


def rejects(parse, text: str) -> None:
    with pytest.raises(ValueError):
        parse(text)


def load_error(given: dict[str, str | bool | None], environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load(given, environ)
    return str(caught.value)


# ---- the table ------------------------------------------------------------------------------------------


def test_defaults_give_the_default_config() -> None:
    assert load({}, {}) == Config()


def test_every_setting_default_parses_without_environment() -> None:
    # The default of each setting, given explicitly, must parse too (the help shows it as the default).
    for setting in SETTINGS:
        if setting.flags and not setting.switch and setting.key != "ipv6":
            load({setting.key: setting.default}, {})


def test_setting_keys_flags_and_envvars_are_unique() -> None:
    keys = [setting.key for setting in SETTINGS]
    flags = [flag for setting in SETTINGS for flag in setting.flags]
    envvars = [name for setting in SETTINGS for name in setting.envvars]
    assert len(keys) == len(set(keys))
    assert len(flags) == len(set(flags))
    assert len(envvars) == len(set(envvars))


def test_setting_labels_name_short_then_long_flag() -> None:
    assert SETTINGS_BY_KEY["inbound_capture_port"].label == "-z/--inbound-capture-port"
    assert SETTINGS_BY_KEY["probe_timeout"].label == "--probe-timeout"
    assert SETTINGS_BY_KEY["envoy_user"].label == "ENVOY_USER"


@pytest.mark.parametrize(
    ("key", "envvars"),
    [
        ("envoy_port", ()),
        ("inbound_capture_port", ("INBOUND_CAPTURE_PORT",)),
        ("inbound_tunnel_port", ("INBOUND_TUNNEL_PORT",)),
        ("proxy_uid", ("PROXY_UID",)),
        ("proxy_gid", ("PROXY_GID",)),
        ("inbound_interception_mode", ("ISTIO_INBOUND_INTERCEPTION_MODE",)),
        ("inbound_ports", ("ISTIO_INBOUND_PORTS",)),
        ("local_exclude_ports", ("ISTIO_LOCAL_EXCLUDE_PORTS",)),
        ("exclude_interfaces", ("ISTIO_EXCLUDE_INTERFACES",)),
        ("service_cidr", ("ISTIO_SERVICE_CIDR",)),
        ("service_exclude_cidr", ("ISTIO_SERVICE_EXCLUDE_CIDR",)),
        ("outbound_ports", ("ISTIO_OUTBOUND_PORTS",)),
        ("local_outbound_ports_exclude", ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",)),
        ("kube_virt_interfaces", ("KUBE_VIRT_INTERFACES",)),
        ("inbound_tproxy_mark", ("ISTIO_INBOUND_TPROXY_MARK",)),
        ("inbound_tproxy_route_table", ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE",)),
        ("dry_run", ("DRY_RUN",)),
        ("iptables_probe_port", ("IPTABLES_PROBE_PORT",)),
        ("probe_timeout", ("PROBE_TIMEOUT",)),
        ("skip_rule_apply", ("SKIP_RULE_APPLY",)),
        ("run_validation", ("RUN_VALIDATION",)),
        ("redirect_dns", ("REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE")),
        ("drop_invalid", ("DROP_INVALID", "INVALID_DROP")),
        ("dual_stack", ("DUAL_STACK", "ISTIO_DUAL_STACK")),
        ("capture_all_dns", ("CAPTURE_ALL_DNS",)),
        ("network_namespace", ("NETWORK_NAMESPACE",)),
        ("cni_mode", ("CNI_MODE",)),
        ("cleanup_only", ("CLEANUP_ONLY",)),
        ("force_apply", ("FORCE_APPLY",)),
        ("native_nftables", ("NATIVE_NFTABLES",)),
        ("force_iptables_binary", ("FORCE_IPTABLES_BINARY",)),
        ("outbound_owner_groups", ("ISTIO_OUTBOUND_OWNER_GROUPS",)),
        ("outbound_owner_groups_exclude", ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",)),
        ("host_ipv4_loopback_cidr", ("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",)),
        ("envoy_user", ("ENVOY_USER",)),
        ("dry_run_file_path", ("DRY_RUN_FILE_PATH",)),
    ],
)
def test_istio_environment_variables(key: str, envvars: tuple[str, ...]) -> None:
    assert SETTINGS_BY_KEY[key].envvars == envvars


@pytest.mark.parametrize(
    ("key", "default"),
    [
        ("envoy_port", "15001"),
        ("inbound_capture_port", "15006"),
        ("inbound_tunnel_port", "15008"),
        ("inbound_tproxy_mark", "1337"),
        ("inbound_tproxy_route_table", "133"),
        ("iptables_probe_port", "15002"),
        ("probe_timeout", "5s"),
        ("outbound_owner_groups", "*"),
        ("host_ipv4_loopback_cidr", "127.0.0.1/32"),
        ("envoy_user", "istio-proxy"),
    ],
)
def test_istio_defaults(key: str, default: str) -> None:
    assert SETTINGS_BY_KEY[key].default == default


# ---- lists ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("", []),
        (",", []),
        ("6000,7000,", ["6000", "7000"]),
        (",6000,,7000,,", ["6000", "7000"]),
        ("a", ["a"]),
        (" a, b", [" a", " b"]),  # not trimmed: the element parsers reject the spaces
    ],
)
def test_split_list(text: str, items: list[str]) -> None:
    assert config.split_list(text) == items


# ---- ports --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "port"), [("1", 1), ("80", 80), ("15001", 15001), ("65535", 65535)])
def test_port_accepts(text: str, port: int) -> None:
    assert config.parse_port(text) == port


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",
        "65536",
        "99999",
        "-1",
        "+80",
        "0x50",
        "0X50",
        "0o17",
        "0b1",
        "1e3",
        "80.0",
        " 80",
        "80 ",
        "80\n",
        "8 0",
        "http",
        "*",
        "\u0668\u0660",  # Arabic-Indic "80": str.isdigit() says yes
        "\uff18\uff10",  # full-width "80"
        "\u00b2",  # superscript two: isdigit() but not a decimal
        "80 -j ACCEPT",
    ],
)
def test_port_rejects(text: str) -> None:
    rejects(config.parse_port, text)


def test_port_lists_drop_empty_elements() -> None:
    assert config.parse_ports("6000,7000,") == (6000, 7000)
    assert config.parse_ports(",15090,,15021,15020,") == (15090, 15021, 15020)
    assert config.parse_ports("") == ()
    assert config.parse_ports(",") == ()


@pytest.mark.parametrize("text", ["80,abc", "80,0", "80,65536", "*", "80,*", "80, 81", "80;81"])
def test_port_lists_reject(text: str) -> None:
    rejects(config.parse_ports, text)


def test_port_list_error_names_the_bad_element() -> None:
    with pytest.raises(ValueError, match=r"^'abc': "):
        config.parse_ports("80,abc")


def test_port_selection_wildcard() -> None:
    assert config.parse_port_selection("*") is ALL
    assert config.parse_port_selection("") == ()
    assert config.parse_port_selection("80,443,") == (80, 443)


@pytest.mark.parametrize("text", ["*,80", "80,*", "*,*", ",*", "*,", "**", " *", "* "])
def test_port_selection_rejects_wildcard_mixed_with_values(text: str) -> None:
    rejects(config.parse_port_selection, text)


def test_wildcard_mixed_error_says_so() -> None:
    with pytest.raises(ValueError, match="'\\*' must stand alone"):
        config.parse_port_selection("*,80")


# ---- CIDRs and addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "written"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.0.0.1/8", "10.0.0.1/8"),  # host bits kept as written, as Go's netip.ParsePrefix does
        ("192.168.1.7/24", "192.168.1.7/24"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("1.2.3.4/32", "1.2.3.4/32"),
        ("2001:DB8::1/64", "2001:db8::1/64"),  # IPv6 printed canonically
        ("2001:0db8:0000:0000:0000:0000:0000:0001/128", "2001:db8::1/128"),
        ("2001:db8:0:0:1:0:0:1/48", "2001:db8::1:0:0:1/48"),
        ("::/0", "::/0"),
        ("::1/128", "::1/128"),
    ],
)
def test_cidr_accepts(text: str, written: str) -> None:
    assert str(config.parse_cidr(text)) == written


def test_cidr_family_is_the_written_family() -> None:
    assert isinstance(config.parse_cidr("10.0.0.0/8"), IPv4Interface)
    assert isinstance(config.parse_cidr("2001:db8::/32"), IPv6Interface)
    assert config.parse_cidrs("10.0.0.0/8,2001:db8::/32,") == (
        IPv4Interface("10.0.0.0/8"),
        IPv6Interface("2001:db8::/32"),
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10.0.0.1",  # an address is not a CIDR
        "2001:db8::1",
        "*",
        "10.0.0.0/33",
        "2001:db8::/129",
        "10.0.0.0/-1",
        "10.0.0.0/",
        "/8",
        "10.0.0/8",
        "10.0.0.256/8",
        "010.0.0.0/8",
        "10.0.0.0/8/8",
        " 10.0.0.0/8",
        "10.0.0.0/8 ",
        "10.0.0.0/8\n",
        "10.0.0.0/8 -j ACCEPT",
        "fe80::1%eth0/64",  # zone ids are not allowed
        "fe80::1/64%eth0",
        "example.com/32",
        "10.0.0.0/\u0668",
    ],
)
def test_cidr_rejects(text: str) -> None:
    rejects(config.parse_cidr, text)


@pytest.mark.parametrize("text", ["10.0.0.0/255.0.0.0", "10.0.0.0/0.255.255.255"])
def test_cidr_rejects_netmask_notation(text: str) -> None:
    # Go's netip.ParsePrefix (Istio's SeparateV4V6) only takes address/prefix-length; Python's ipaddress
    # silently turns a netmask or hostmask into /8, which is not "kept as written".
    rejects(config.parse_cidr, text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10.0.0.0/33", "prefix length 33 is over 32"),
        ("2001:db8::/129", "prefix length 129 is over 128"),
        ("10.0.0.256/8", "not an IPv4 or IPv6 address"),
        ("010.0.0.1/8", "not an IPv4 or IPv6 address"),
        ("example.com/32", "not an IPv4 or IPv6 address"),
        ("fe80::1%eth0/64", "not an IP address (zone ids are not allowed)"),
        ("10.0.0.0/8/8", "not a CIDR (the prefix length must be a number)"),
        ("10.0.0.0", "not a CIDR (address/prefix-length)"),
    ],
)
def test_cidr_errors_say_why_in_our_words(text: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        config.parse_cidr(text)
    assert str(caught.value) == reason
    assert load_error({"service_cidr": text}, {}) == f"invalid value for -i/--istio-service-cidr: '{text}': {reason}"


def test_cidr_selection_wildcard() -> None:
    assert config.parse_cidr_selection("*") is ALL
    assert config.parse_cidr_selection("") == ()
    assert config.parse_cidr_selection("10.0.0.0/8,") == (IPv4Interface("10.0.0.0/8"),)


@pytest.mark.parametrize("text", ["*,10.0.0.0/8", "10.0.0.0/8,*", "*,"])
def test_cidr_selection_rejects_wildcard_mixed(text: str) -> None:
    rejects(config.parse_cidr_selection, text)


def test_exclude_cidrs_reject_wildcard() -> None:
    # Istio: "invalid value for OUTBOUND_IP_RANGES_EXCLUDE" on '*'.
    rejects(config.parse_cidrs, "*")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("10.96.0.10", IPv4Address("10.96.0.10")),
        ("2001:DB8::53", IPv6Address("2001:db8::53")),
        ("::1", IPv6Address("::1")),
    ],
)
def test_address_accepts(text: str, address: IPv4Address | IPv6Address) -> None:
    assert config.parse_address(text) == address


@pytest.mark.parametrize("text", ["", "10.96.0.10/32", "fe80::1%eth0", "dns.local", "10.96.0.10 ", "1.2.3"])
def test_address_rejects(text: str) -> None:
    rejects(config.parse_address, text)


def test_addresses_list() -> None:
    assert config.parse_addresses("") is None
    assert config.parse_addresses(",") is None
    assert config.parse_addresses("10.96.0.10,2001:db8::53,") == (
        IPv4Address("10.96.0.10"),
        IPv6Address("2001:db8::53"),
    )


# ---- the IPv4 loopback CIDR -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["127.0.0.1/32", "127.0.0.1/8", "127.1.2.3/16", "127.255.255.254/31"])
def test_loopback_cidr_accepts(text: str) -> None:
    assert str(config.parse_loopback_cidr(text)) == text


@pytest.mark.parametrize(
    "text",
    ["10.0.0.1/8", "127.0.0.1/7", "127.0.0.1/0", "127.0.0.1", "::1/128", "127.0.0.1/33", "128.0.0.1/8", ""],
)
def test_loopback_cidr_rejects(text: str) -> None:
    rejects(config.parse_loopback_cidr, text)


# ---- ids, marks, route tables -------------------------------------------------------------------------


def test_ids() -> None:
    assert config.parse_ids("1337") == (1337,)
    assert config.parse_ids("0,1337,4294967294,") == (0, 1337, 4294967294)
    assert config.parse_ids("") is None
    assert config.parse_ids(",") is None


@pytest.mark.parametrize(
    "text", ["-1", "4294967295", "4294967296", "0x539", "1e3", "1337 ", "1337 -j", "root", "*", "1337;1"]
)
def test_ids_reject(text: str) -> None:
    rejects(config.parse_ids, text)


@pytest.mark.parametrize(("text", "mark"), [("1", 1), ("1337", 1337), ("4294967295", 2**32 - 1)])
def test_mark_accepts(text: str, mark: int) -> None:
    assert config.parse_mark(text) == mark


@pytest.mark.parametrize("text", ["0", "4294967296", "-1", "0x539", "", "1337/0xffffffff", "1337 "])
def test_mark_rejects(text: str) -> None:
    rejects(config.parse_mark, text)


@pytest.mark.parametrize(("text", "table"), [("1", 1), ("133", 133), ("252", 252), ("256", 256)])
def test_route_table_accepts(text: str, table: int) -> None:
    assert config.parse_route_table(text) == table


@pytest.mark.parametrize("text", ["253", "254", "255", "0", "4294967296", "main", "-1", "0x85", ""])
def test_route_table_rejects(text: str) -> None:
    rejects(config.parse_route_table, text)


# ---- interfaces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["eth0", "eth0.100", "veth_1", "br-lan", "a", "abcdefghijklmno", "not-istio-nic", "cali1234ab"]
)
def test_interface_accepts(text: str) -> None:
    assert config.parse_interface(text) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abcdefghijklmnop",  # 16 characters: IFNAMSIZ is 16 with the NUL
        "eth 0",
        "eth0/1",
        "eth:0",
        ".",
        "..",
        "a;b",
        "eth0\n",
        "eth0 -j DROP",
        "-j",
        "eth\u00e9",
        "eth0\t",
    ],
)
def test_interface_rejects(text: str) -> None:
    rejects(config.parse_interface, text)


def test_interface_lists() -> None:
    assert config.parse_interfaces("eth0,,eth1,") == ("eth0", "eth1")
    assert config.parse_interfaces("") == ()
    rejects(config.parse_interfaces, "eth0,a;b")
    rejects(config.parse_interfaces, "*")


# ---- owner groups --------------------------------------------------------------------------------------


def test_groups_names_and_numbers() -> None:
    assert config.parse_groups_include("java,202") == ("java", 202)
    assert config.parse_groups_include("istio-proxy,1337,") == ("istio-proxy", 1337)
    assert config.parse_groups("888,ftp") == (888, "ftp")
    assert config.parse_groups("") == ()


def test_groups_include_wildcard_and_empty() -> None:
    assert config.parse_groups_include("*") is ALL
    assert config.parse_groups_include("") == ()


def test_groups_include_at_most_64() -> None:
    assert len(config.parse_groups_include(",".join(str(n) for n in range(MAX_OWNER_GROUPS)))) == 64
    assert MAX_OWNER_GROUPS == 64
    with pytest.raises(ValueError, match="64"):
        config.parse_groups_include(",".join(str(n) for n in range(65)))
    with pytest.raises(ValueError):
        config.parse_groups_include(",".join(f"group{n}" for n in range(65)))


@pytest.mark.parametrize("text", ["*,java", "java,*", "1337 -j", "a b", "-1", "4294967295", "a;b", "g\n"])
def test_groups_include_rejects(text: str) -> None:
    rejects(config.parse_groups_include, text)


@pytest.mark.parametrize("text", ["*", "ftp,*", "a b", "-x"])
def test_groups_exclude_rejects(text: str) -> None:
    rejects(config.parse_groups, text)


# ---- mode ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("", Mode.REDIRECT),
        ("REDIRECT", Mode.REDIRECT),
        ("redirect", Mode.REDIRECT),
        ("Redirect", Mode.REDIRECT),
        ("TPROXY", Mode.TPROXY),
        ("tproxy", Mode.TPROXY),
        ("TProxy", Mode.TPROXY),
    ],
)
def test_mode_accepts(text: str, mode: Mode) -> None:
    assert config.parse_mode(text) is mode


@pytest.mark.parametrize(
    "text",
    [
        "NONE",
        "none",
        "garbage",
        " TPROXY",
        "TPROXY ",
        "TPROXY\n",
        "TPROXY -j ACCEPT",
        "red\u0131rect",  # dotless i: str.upper() turns it into an ASCII I
        "\uff34PROXY",  # full-width T
    ],
)
def test_mode_rejects(text: str) -> None:
    rejects(config.parse_mode, text)


# ---- durations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("2h45m", 9900.0),
        ("1h1h", 7200.0),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("300us", 0.0003),
        ("300\u00b5s", 0.0003),  # micro sign
        ("300\u03bcs", 0.0003),  # Greek mu
        ("1000000ns", 0.001),
        ("+5s", 5.0),  # Go's ParseDuration takes a leading sign
    ],
)
def test_duration_accepts(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "0s",
        "0h0m",
        "",
        "5",
        "s",
        ".s",
        "5S",
        "5 s",
        " 5s",
        "5sec",
        "5d",
        "abc",
        "-5s",
        "1.5.5h",
        "5s\n",
        "\uff15s",  # full-width 5: Go only takes ASCII digits
        "\u0665s",  # Arabic-Indic 5
    ],
)
def test_duration_rejects(text: str) -> None:
    rejects(config.parse_duration, text)


# ---- Go booleans ---------------------------------------------------------------------------------------

GO_TRUE = ["1", "t", "T", "TRUE", "true", "True"]
GO_FALSE = ["0", "f", "F", "FALSE", "false", "False"]


@pytest.mark.parametrize("text", GO_TRUE)
def test_go_bool_true(text: str) -> None:
    assert config.parse_go_bool(text) is True


@pytest.mark.parametrize("text", GO_FALSE)
def test_go_bool_false(text: str) -> None:
    assert config.parse_go_bool(text) is False


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yes",
        "no",
        "y",
        "n",
        "on",
        "off",
        "tRUE",
        "TRue",
        "fALSE",
        "2",
        "00",
        "01",
        " true",
        "true ",
        "-1",
    ],
)
def test_go_bool_rejects(text: str) -> None:
    rejects(config.parse_go_bool, text)


# ---- log levels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("", LogLevel.INFO),
        ("default:debug", LogLevel.DEBUG),
        ("default:info", LogLevel.INFO),
        ("default:warn", LogLevel.WARN),
        ("default:error", LogLevel.ERROR),
        ("default:fatal", LogLevel.FATAL),
        ("default:none", LogLevel.NONE),
        ("debug", LogLevel.DEBUG),
        ("none", LogLevel.NONE),
        ("foo:debug", LogLevel.INFO),  # another scope does not change the default one
        ("foo:error,default:debug", LogLevel.DEBUG),
        ("default:debug,default:error", LogLevel.ERROR),
    ],
)
def test_log_level_accepts(text: str, level: LogLevel) -> None:
    assert config.parse_log_level(text, LogLevel.INFO) is level


@pytest.mark.parametrize("text", ["default:verbose", "default:", "loud", "default:info,foo:bar"])
def test_log_level_rejects(text: str) -> None:
    rejects(lambda value: config.parse_log_level(value, LogLevel.INFO), text)


def test_log_options_from_flags() -> None:
    options = load(
        {
            "log_output_level": "default:debug",
            "log_as_json": True,
            "log_target": "stderr,/tmp/x.log",
            "log_caller": "default",
            "log_stacktrace_level": "default:error",
        },
        {},
    ).log
    assert options == LogOptions(
        level=LogLevel.DEBUG,
        as_json=True,
        targets=("stderr", "/tmp/x.log"),
        caller=True,
        stacktrace_level=LogLevel.ERROR,
    )


# ---- other settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "pod-ns", "cni-1234", "/var/run/netns/pod", "/proc/1/ns/net"])
def test_netns_accepts(text: str) -> None:
    assert config.parse_netns(text) == text


@pytest.mark.parametrize("text", [".", "..", "a b", "ns;rm", "-x"])
def test_netns_rejects(text: str) -> None:
    rejects(config.parse_netns, text)


def test_force_binary() -> None:
    assert config.parse_force_binary("") is None
    assert config.parse_force_binary("legacy") is IptablesVariant.LEGACY
    assert config.parse_force_binary("nft") is IptablesVariant.NFT
    for bad in ("Legacy", "NFT", "iptables", "nft-legacy", "auto", " nft"):
        rejects(config.parse_force_binary, bad)


def test_dry_run_format_and_backend() -> None:
    assert load({"dry_run_format": "commands"}, {}).dry_run_format is DryRunFormat.COMMANDS
    assert load({"dry_run_format": "json"}, {}).dry_run_format is DryRunFormat.JSON
    assert load({"backend": "libiptc"}, {}).backend is Backend.LIBIPTC
    assert "--dry-run-format" in load_error({"dry_run_format": "yaml"}, {})
    assert "--backend" in load_error({"backend": "nft"}, {})


def test_full_command_line_as_the_injector_passes_it() -> None:
    loaded = load(
        {
            "envoy_port": "15001",
            "inbound_capture_port": "15006",
            "proxy_uid": "1337",
            "inbound_interception_mode": "REDIRECT",
            "service_cidr": "*",
            "service_exclude_cidr": "",
            "inbound_ports": "*",
            "local_exclude_ports": "15090,15021,15020",
            "log_output_level": "default:info",
        },
        {},
    )
    assert loaded.proxy_port == 15001
    assert loaded.inbound_capture_port == 15006
    assert loaded.proxy_uids == (1337,)
    assert loaded.proxy_gids is None
    assert loaded.mode is Mode.REDIRECT
    assert loaded.service_cidrs is ALL
    assert loaded.service_exclude_cidrs == ()
    assert loaded.inbound_ports is ALL
    assert loaded.local_exclude_ports == (15090, 15021, 15020)
    assert loaded.log.level is LogLevel.INFO


# ---- precedence: command line > extra env var > primary env var > default ------------------------------

SWITCHES_WITH_EXTRA = [
    ("redirect_dns", "REDIRECT_DNS", "ISTIO_META_DNS_CAPTURE"),
    ("drop_invalid", "DROP_INVALID", "INVALID_DROP"),
    ("dual_stack", "DUAL_STACK", "ISTIO_DUAL_STACK"),
]


@pytest.mark.parametrize(("key", "primary", "extra"), SWITCHES_WITH_EXTRA)
def test_switch_precedence(key: str, primary: str, extra: str) -> None:
    def value(given: dict[str, str | bool | None], environ: dict[str, str]) -> bool:
        result = getattr(load(given, environ), key)
        assert isinstance(result, bool)
        return result

    assert value({}, {}) is False
    assert value({}, {primary: "true"}) is True
    assert value({}, {extra: "true"}) is True
    assert value({}, {primary: "true", extra: "false"}) is False  # extra overrides primary
    assert value({}, {primary: "false", extra: "1"}) is True
    assert value({key: True}, {primary: "false", extra: "false"}) is True  # command line wins
    assert value({key: False}, {primary: "true", extra: "true"}) is False
    assert value({key: None}, {primary: "T"}) is True  # None means "not on the command line"


@pytest.mark.parametrize(("key", "primary", "extra"), SWITCHES_WITH_EXTRA)
def test_empty_switch_variable_counts_as_unset(key: str, primary: str, extra: str) -> None:
    assert getattr(load({}, {primary: "", extra: ""}), key) is False
    assert getattr(load({}, {primary: "true", extra: ""}), key) is True
    assert getattr(load({}, {primary: "", extra: "true"}), key) is True


@pytest.mark.parametrize(
    ("key", "envvar"),
    [
        ("dry_run", "DRY_RUN"),
        ("skip_rule_apply", "SKIP_RULE_APPLY"),
        ("run_validation", "RUN_VALIDATION"),
        ("capture_all_dns", "CAPTURE_ALL_DNS"),
        ("cni_mode", "CNI_MODE"),
        ("cleanup_only", "CLEANUP_ONLY"),
        ("force_apply", "FORCE_APPLY"),
        ("native_nftables", "NATIVE_NFTABLES"),
    ],
)
def test_single_variable_switches(key: str, envvar: str) -> None:
    assert getattr(load({}, {}), key) is False
    assert getattr(load({}, {envvar: ""}), key) is False
    for text in GO_TRUE:
        assert getattr(load({}, {envvar: text}), key) is True
    for text in GO_FALSE:
        assert getattr(load({}, {envvar: text}), key) is False
    assert getattr(load({key: True}, {envvar: "false"}), key) is True
    assert envvar in load_error({}, {envvar: "yes"})


def test_reconcile_defaults_on_and_can_be_turned_off() -> None:
    assert load({}, {}).reconcile is True
    assert load({}, {"RECONCILE": "false"}).reconcile is False
    assert load({}, {"RECONCILE": ""}).reconcile is True
    assert load({"reconcile": False}, {"RECONCILE": "true"}).reconcile is False
    assert load({"reconcile": True}, {"RECONCILE": "false"}).reconcile is True


def test_inbound_capture_port_precedence() -> None:
    assert load({}, {}).inbound_capture_port == 15006
    assert load({}, {"INBOUND_CAPTURE_PORT": "15010"}).inbound_capture_port == 15010
    both = load({"inbound_capture_port": "15007"}, {"INBOUND_CAPTURE_PORT": "15010"})
    assert both.inbound_capture_port == 15007
    assert load({"inbound_capture_port": "15007"}, {}).inbound_capture_port == 15007


def test_value_settings_from_the_environment() -> None:
    loaded = load(
        {},
        {
            "INBOUND_TUNNEL_PORT": "15009",
            "PROXY_UID": "1000,1001",
            "PROXY_GID": "2000",
            "ISTIO_INBOUND_INTERCEPTION_MODE": "tproxy",
            "ISTIO_INBOUND_PORTS": "80,443,",
            "ISTIO_LOCAL_EXCLUDE_PORTS": "15090",
            "ISTIO_EXCLUDE_INTERFACES": "eth1",
            "ISTIO_SERVICE_CIDR": "10.0.0.0/8,2001:db8::/32",
            "ISTIO_SERVICE_EXCLUDE_CIDR": "10.1.0.0/16",
            "ISTIO_OUTBOUND_PORTS": "32000",
            "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE": "9000",
            "KUBE_VIRT_INTERFACES": "net1",
            "ISTIO_INBOUND_TPROXY_MARK": "1400",
            "ISTIO_INBOUND_TPROXY_ROUTE_TABLE": "140",
            "IPTABLES_PROBE_PORT": "15003",
            "PROBE_TIMEOUT": "1m30s",
            "NETWORK_NAMESPACE": "/var/run/netns/pod",
            "FORCE_IPTABLES_BINARY": "nft",
            "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "888,ftp",
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/8",
            "ENVOY_USER": "envoy",
            "DRY_RUN_FILE_PATH": "/tmp/dry-run.log",
        },
    )
    assert loaded.inbound_tunnel_port == 15009
    assert loaded.proxy_uids == (1000, 1001)
    assert loaded.proxy_gids == (2000,)
    assert loaded.mode is Mode.TPROXY
    assert loaded.inbound_ports == (80, 443)
    assert loaded.local_exclude_ports == (15090,)
    assert loaded.exclude_interfaces == ("eth1",)
    assert loaded.service_cidrs == (IPv4Interface("10.0.0.0/8"), IPv6Interface("2001:db8::/32"))
    assert loaded.service_exclude_cidrs == (IPv4Interface("10.1.0.0/16"),)
    assert loaded.outbound_ports == (32000,)
    assert loaded.local_outbound_ports_exclude == (9000,)
    assert loaded.kube_virt_interfaces == ("net1",)
    assert loaded.tproxy_mark == 1400
    assert loaded.tproxy_route_table == 140
    assert loaded.probe_port == 15003
    assert loaded.probe_timeout == 90.0
    assert loaded.network_namespace == "/var/run/netns/pod"
    assert loaded.force_iptables_binary is IptablesVariant.NFT
    assert loaded.owner_groups_exclude == (888, "ftp")
    assert loaded.ipv4_loopback_cidr == ipaddress.IPv4Interface("127.0.0.1/8")
    assert loaded.envoy_user == "envoy"
    assert loaded.dry_run_file_path == "/tmp/dry-run.log"


def test_envoy_port_has_no_environment_variable() -> None:
    # Istio binds -p with flag.Bind, which reads no variable; ENVOY_PORT is only logged.
    assert load({}, {"ENVOY_PORT": "1234"}).proxy_port == 15001
    assert load({}, {"ENVOY_PORT": "not-a-port"}).proxy_port == 15001
    assert load({"envoy_port": "15005"}, {"ENVOY_PORT": "1234"}).proxy_port == 15005


def test_owner_groups_unset_set_empty_and_set() -> None:
    assert load({}, {}).owner_groups_include is ALL
    # Istio's edge case: set but empty is an empty include list, not '*'.
    assert load({}, {"ISTIO_OUTBOUND_OWNER_GROUPS": ""}).owner_groups_include == ()
    assert load({}, {"ISTIO_OUTBOUND_OWNER_GROUPS": "*"}).owner_groups_include is ALL
    assert load({}, {"ISTIO_OUTBOUND_OWNER_GROUPS": "java,202"}).owner_groups_include == ("java", 202)
    flag = load({"outbound_owner_groups": "1337"}, {"ISTIO_OUTBOUND_OWNER_GROUPS": ""})
    assert flag.owner_groups_include == (1337,)


def test_owner_groups_more_than_64_from_environment() -> None:
    message = load_error({}, {"ISTIO_OUTBOUND_OWNER_GROUPS": ",".join(str(n) for n in range(65))})
    assert "ISTIO_OUTBOUND_OWNER_GROUPS" in message
    assert "64" in message


def test_proxy_ids_empty_means_default() -> None:
    assert load({"proxy_uid": ""}, {}).proxy_uids is None
    assert load({}, {"PROXY_UID": ""}).proxy_uids is None
    assert load({}, {"PROXY_GID": ","}).proxy_gids is None


def test_ipv6_and_dns_servers_and_resolv_conf_flags() -> None:
    assert load({}, {}).ipv6 is None
    assert load({"ipv6": True}, {}).ipv6 is True
    assert load({"ipv6": False}, {}).ipv6 is False
    assert load({"dns_servers": "10.96.0.10"}, {}).dns_servers == (IPv4Address("10.96.0.10"),)
    assert load({}, {}).dns_servers is None
    assert load({"resolv_conf": "/tmp/resolv.conf"}, {}).resolv_conf == "/tmp/resolv.conf"
    assert "--resolv-conf" in load_error({"resolv_conf": ""}, {})


# ---- errors: one line, naming the flag or the variable, and the value -----------------------------------


def test_error_message_for_a_flag_is_exact() -> None:
    assert (
        load_error({"inbound_capture_port": "0"}, {})
        == "invalid value for -z/--inbound-capture-port: '0': port out of range (1-65535)"
    )


def test_error_message_for_a_variable_is_exact() -> None:
    assert load_error({}, {"INBOUND_CAPTURE_PORT": "abc"}) == (
        "invalid value for INBOUND_CAPTURE_PORT (environment of -z/--inbound-capture-port): 'abc': "
        "not a port (a decimal number 1-65535)"
    )


@pytest.mark.parametrize(
    ("environ", "name", "value"),
    [
        ({"INBOUND_CAPTURE_PORT": "abc"}, "INBOUND_CAPTURE_PORT", "abc"),
        ({"INBOUND_TUNNEL_PORT": "0"}, "INBOUND_TUNNEL_PORT", "0"),
        ({"PROXY_UID": "1337 -j ACCEPT"}, "PROXY_UID", "1337 -j ACCEPT"),
        ({"PROXY_GID": "root"}, "PROXY_GID", "root"),
        ({"ISTIO_INBOUND_INTERCEPTION_MODE": "NONE"}, "ISTIO_INBOUND_INTERCEPTION_MODE", "NONE"),
        ({"ISTIO_INBOUND_PORTS": "*,80"}, "ISTIO_INBOUND_PORTS", "*,80"),
        ({"ISTIO_SERVICE_CIDR": "10.0.0.1"}, "ISTIO_SERVICE_CIDR", "10.0.0.1"),
        ({"ISTIO_SERVICE_EXCLUDE_CIDR": "*"}, "ISTIO_SERVICE_EXCLUDE_CIDR", "*"),
        ({"KUBE_VIRT_INTERFACES": "a;b"}, "KUBE_VIRT_INTERFACES", "a;b"),
        ({"ISTIO_INBOUND_TPROXY_MARK": "0"}, "ISTIO_INBOUND_TPROXY_MARK", "0"),
        ({"ISTIO_INBOUND_TPROXY_ROUTE_TABLE": "254"}, "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", "254"),
        ({"PROBE_TIMEOUT": "5"}, "PROBE_TIMEOUT", "5"),
        ({"REDIRECT_DNS": "maybe"}, "REDIRECT_DNS", "maybe"),
        ({"ISTIO_META_DNS_CAPTURE": "yes"}, "ISTIO_META_DNS_CAPTURE", "yes"),
        ({"REDIRECT_DNS": "true", "ISTIO_META_DNS_CAPTURE": "on"}, "ISTIO_META_DNS_CAPTURE", "on"),
        ({"INVALID_DROP": "2"}, "INVALID_DROP", "2"),
        ({"ISTIO_DUAL_STACK": "dual"}, "ISTIO_DUAL_STACK", "dual"),
        ({"FORCE_IPTABLES_BINARY": "auto"}, "FORCE_IPTABLES_BINARY", "auto"),
        (
            {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "10.0.0.1/8"},
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            "10.0.0.1/8",
        ),
        (
            {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "127.0.0.1/7"},
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
            "127.0.0.1/7",
        ),
        ({"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "*"}, "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "*"),
        ({"ENVOY_USER": ""}, "ENVOY_USER", "''"),
    ],
)
def test_errors_from_the_environment_name_the_variable(environ: dict[str, str], name: str, value: str) -> None:
    message = load_error({}, environ)
    assert message.startswith(f"invalid value for {name} ")
    assert value in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("given", "label", "value"),
    [
        ({"envoy_port": "0x50"}, "-p/--envoy-port", "0x50"),
        ({"inbound_ports": "80 -j ACCEPT"}, "-b/--istio-inbound-ports", "80 -j ACCEPT"),
        ({"service_cidr": "10.0.0.0/8 -j ACCEPT"}, "-i/--istio-service-cidr", "10.0.0.0/8 -j ACCEPT"),
        ({"exclude_interfaces": "eth0 -j DROP"}, "-c/--istio-exclude-interfaces", "eth0 -j DROP"),
        ({"kube_virt_interfaces": "a;b"}, "-k/--kube-virt-interfaces", "a;b"),
        ({"proxy_uid": "1337 -j"}, "-u/--proxy-uid", "1337 -j"),
        ({"probe_timeout": "soon"}, "--probe-timeout", "soon"),
        ({"outbound_owner_groups": "*,1"}, "--outbound-owner-groups", "*,1"),
    ],
)
def test_errors_from_flags_name_the_flag(given: dict[str, str], label: str, value: str) -> None:
    message = load_error(given, {})
    assert message.startswith(f"invalid value for {label}: '{value}': ")


def test_command_line_error_is_not_blamed_on_the_environment() -> None:
    message = load_error({"inbound_capture_port": "abc"}, {"INBOUND_CAPTURE_PORT": "15010"})
    assert message.startswith("invalid value for -z/--inbound-capture-port: 'abc'")


def test_long_values_are_shortened_in_errors() -> None:
    message = load_error({"inbound_ports": "8" * 1000}, {})
    assert len(message) < 400
    assert "8" * 200 + "..." in message


@pytest.mark.parametrize(
    "given",
    [
        {"inbound_ports": "80\n-j ACCEPT"},
        {"exclude_interfaces": "eth0\r-j DROP"},
        {"service_cidr": "10.0.0.0/8\n-A OUTPUT -j ACCEPT"},
    ],
)
def test_error_message_is_one_line_even_with_newlines_in_the_value(given: dict[str, str]) -> None:
    message = load_error(given, {})
    assert len(message.splitlines()) == 1, repr(message)
