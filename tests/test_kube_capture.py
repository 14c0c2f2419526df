"""The capture argv the injector writes: Istio's rules for where each value comes from, in which order, and
which values it refuses (its checks and our Config parser's)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_iptables.errors import ConfigError
from istio_iptables.kube.capture import (
    RECORDED_PROXY_UID,
    InjectionError,
    capture_args,
    cni_enabled,
    exclude_inbound_port,
    init_args,
    load_settings,
    parse_capture_args,
)

DEFAULT = load_settings()
ISTIO_DEFAULT_ARGS = [
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
    "-d", "15090,15021,15020", "--log_output_level=default:info",
]  # fmt: skip


def test_defaults_are_the_charts() -> None:
    assert capture_args({}, DEFAULT) == ISTIO_DEFAULT_ARGS
    assert init_args({}, DEFAULT) == ["istio-iptables", *ISTIO_DEFAULT_ARGS]


def test_annotations_win_over_values_and_keep_the_order() -> None:
    settings = load_settings(
        ["values.global.proxy.includeIPRanges=10.0.0.0/8", "values.global.proxy.excludeInboundPorts=9"]
    )
    annotations = {
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "192.168.0.0/16",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "192.168.1.0/24",
        "traffic.sidecar.istio.io/includeInboundPorts": "80,81",
        "traffic.sidecar.istio.io/excludeInboundPorts": "4,5",
        "traffic.sidecar.istio.io/includeOutboundPorts": "443",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "7,8",
        "traffic.sidecar.istio.io/kubevirtInterfaces": "net1",
        "traffic.sidecar.istio.io/excludeInterfaces": "eth9",
        "sidecar.istio.io/interceptionMode": "TPROXY",
        "sidecar.istio.io/agentLogLevel": "default:debug",
    }
    assert capture_args(annotations, settings) == [
        "-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "192.168.0.0/16",
        "-x", "192.168.1.0/24", "-b", "80,81", "-d", "15090,15021,4,5,15020", "-q", "443", "-o", "7,8",
        "-k", "net1", "-c", "eth9", "--log_output_level=default:debug",
    ]  # fmt: skip


def test_values_fill_in_what_annotations_do_not_say() -> None:
    settings = load_settings(
        [
            "values.global.proxy.includeIPRanges=127.0.0.1/24,10.96.0.1/24",
            "values.global.proxy.excludeIPRanges=10.96.0.2/24",
            "values.global.proxy.excludeInboundPorts=4,5,6",
            "values.global.proxy.statusPort=0",
            "values.global.proxy.includeOutboundPorts=443",
            "values.global.logging.level=default:warn",
            "values.global.logAsJson=true",
            "meshConfig.proxyListenPort=15101",
            "meshConfig.proxyInboundListenPort=15106",
        ]
    )
    assert capture_args({}, settings) == [
        "-p", "15101", "-z", "15106", "-u", "1337", "-m", "REDIRECT", "-i", "127.0.0.1/24,10.96.0.1/24",
        "-x", "10.96.0.2/24", "-b", "*", "-d", "15090,15021,4,5,6", "-q", "443",
        "--log_output_level=default:warn", "--log_as_json",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("status", "excluded", "expected"),
    [
        ("15020", "", "15020"),
        ("0", "", ""),
        ("", "4,5", "4,5"),
        ("15020", "15020,4", "15020,4"),  # already there: Istio keeps the list as it is
        ("123", "4, 5,", "4,5,123"),  # blanks and empty items dropped when the port is appended
    ],
)
def test_exclude_inbound_port(status: str, excluded: str, expected: str) -> None:
    assert exclude_inbound_port(status, excluded) == expected


def test_d_is_exactly_the_two_ports_when_nothing_else_is_excluded() -> None:
    settings = load_settings(["values.global.proxy.statusPort=0"])
    assert capture_args({}, settings)[capture_args({}, settings).index("-d") + 1] == "15090,15021"
    status = {"status.sidecar.istio.io/port": "123"}
    assert capture_args(status, DEFAULT)[capture_args(status, DEFAULT).index("-d") + 1] == "15090,15021,123"


def test_reroute_virtual_interfaces_wins_over_kubevirt() -> None:
    annotations = {
        "traffic.sidecar.istio.io/kubevirtInterfaces": "net1",
        "istio.io/reroute-virtual-interfaces": "net2,net3",
    }
    args = capture_args(annotations, DEFAULT)
    assert args.count("-k") == 1
    assert args[args.index("-k") + 1] == "net2,net3"


def test_proxy_uid_from_the_users_istio_proxy_container() -> None:
    assert capture_args({}, DEFAULT, proxy_uid=1234)[5] == "1234"
    assert capture_args({}, DEFAULT, proxy_uid=0)[5] == "1337"  # uid 0 would exempt root: Istio ignores it
    # A mesh-wide TPROXY keeps the user's UID (golden proxy-override-runas.tproxy)...
    tproxy_mesh = load_settings(["meshConfig.defaultConfig.interceptionMode=TPROXY"])
    assert capture_args({}, tproxy_mesh, proxy_uid=1234)[4:8] == ["-u", "1234", "-m", "TPROXY"]
    # ...the pod's own TPROXY annotation makes the template write 1337.
    annotation = {"sidecar.istio.io/interceptionMode": "TPROXY"}
    assert capture_args(annotation, DEFAULT, proxy_uid=1234)[4:8] == ["-u", "1337", "-m", "TPROXY"]


def test_the_recorded_proxy_uid_is_the_argvs_whatever_else_the_pod_says() -> None:
    """The CNI plugin has the annotations only: the UID the injector recorded is taken as it is, over the
    TPROXY quirk (the injector wrote the mode annotation itself) and over a runAsUser read from the API."""
    recorded = {RECORDED_PROXY_UID: "1500", "sidecar.istio.io/interceptionMode": "TPROXY"}
    assert capture_args(recorded, DEFAULT)[4:6] == ["-u", "1500"]
    assert capture_args(recorded, DEFAULT, proxy_uid=1234)[4:6] == ["-u", "1500"]
    with pytest.raises(InjectionError, match=f"invalid value 'x' for annotation '{RECORDED_PROXY_UID}'"):
        capture_args({RECORDED_PROXY_UID: "x"}, DEFAULT)


def test_proxy_config_annotation_sets_the_mode() -> None:
    annotations = {"proxy.istio.io/config": "interceptionMode: TPROXY\n"}
    assert capture_args(annotations, DEFAULT)[6:8] == ["-m", "TPROXY"]
    both = {**annotations, "sidecar.istio.io/interceptionMode": "REDIRECT"}
    assert capture_args(both, DEFAULT)[6:8] == ["-m", "REDIRECT"]


def test_mode_flags_follow_the_capture_flags_in_istios_order() -> None:
    cni = load_settings(["components.cni.enabled=true", "values.global.nativeNftables=true"])
    assert cni_enabled(cni)
    assert init_args({}, cni)[-3:] == ["--run-validation", "--skip-rule-apply", "--native-nftables"]
    assert capture_args({}, cni)[-1] == "--native-nftables"
    assert "--run-validation" not in capture_args({}, cni)
    forced = load_settings(["values.global.proxy_init.forceApplyIptables=true"])
    assert init_args({}, forced)[-1] == "--force-apply"
    # CNI mode has no rules to force.
    both = load_settings(["values.pilot.cni.enabled=true", "values.global.proxy_init.forceApplyIptables=true"])
    assert "--force-apply" not in init_args({}, both)


@pytest.mark.parametrize(
    ("annotation", "value", "reason"),
    [
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "*", "excludeIPRanges invalid"),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0", "includeIPRanges invalid"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "bad", "includeInboundPorts invalid"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "*", "excludeInboundPorts invalid"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "70000", "excludeOutboundPorts invalid"),
        ("sidecar.istio.io/interceptionMode", "redirect", "interceptionMode invalid"),
        ("status.sidecar.istio.io/port", "x", "excludeInboundPorts invalid"),
        ("readiness.status.sidecar.istio.io/periodSeconds", "-1", "invalid syntax"),
        ("prometheus.istio.io/merge-metrics", "maybe", "boolean"),
        ("proxy.istio.io/config", "interceptionMode: SOMETIMES", "interceptionMode invalid"),
        ("proxy.istio.io/config", "[1, 2", "proxy config"),
    ],
)
def test_istios_checks_name_the_annotation_and_value(annotation: str, value: str, reason: str) -> None:
    with pytest.raises(InjectionError) as raised:
        capture_args({annotation: value}, DEFAULT)
    message = str(raised.value)
    assert f"annotation '{annotation}'" in message
    assert f"'{value}'" in message
    assert reason in message
    assert raised.value.exit_code == 2


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("traffic.sidecar.istio.io/includeOutboundPorts", "x"),  # Istio does not check it; our parser does
        ("traffic.sidecar.istio.io/excludeInboundPorts", "0"),  # Istio allows port 0; no rule can use it
        ("traffic.sidecar.istio.io/excludeInterfaces", "-j ACCEPT"),  # istio#58781: passed into rules unchecked
        ("traffic.sidecar.istio.io/kubevirtInterfaces", "a-very-long-interface-name"),
        ("sidecar.istio.io/agentLogLevel", "default:loud"),
    ],
)
def test_our_parser_refuses_what_istio_lets_through(annotation: str, value: str) -> None:
    with pytest.raises(InjectionError, match=f"annotation '{annotation}'"):
        capture_args({annotation: value}, DEFAULT)


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("traffic.sidecar.istio.io/includeInboundPorts", "80\n-A OUTPUT -j ACCEPT"),
        ("sidecar.istio.io/agentLogLevel", "default:info\nx"),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth0\x00"),
        ("traffic.sidecar.istio.io/kubevirtInterfaces", "net1\u202e"),
    ],
)
def test_odd_bytes_make_one_line(annotation: str, value: str) -> None:
    with pytest.raises(InjectionError) as raised:
        capture_args({annotation: value}, DEFAULT)
    assert str(raised.value).isprintable()


def test_every_failure_is_listed_in_one_message() -> None:
    with pytest.raises(InjectionError) as raised:
        capture_args(
            {
                "traffic.sidecar.istio.io/excludeOutboundIPRanges": "*",
                "traffic.sidecar.istio.io/includeInboundPorts": "bad",
            },
            DEFAULT,
        )
    assert "excludeOutboundIPRanges" in str(raised.value)
    assert "includeInboundPorts" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_bad_value_setting_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"setting values\.global\.proxy\.includeIPRanges"):
        load_settings(["values.global.proxy.includeIPRanges=10.0.0.1"])


def test_the_argv_parses_with_the_clis_own_parser() -> None:
    config = parse_capture_args(init_args({"traffic.sidecar.istio.io/includeInboundPorts": "80"}, DEFAULT))
    assert config.inbound_ports == (80,)
    assert config.local_exclude_ports == (15090, 15021, 15020)


_ports = st.lists(st.integers(1, 65535), max_size=5).map(lambda ports: ",".join(map(str, ports)))


@given(include=_ports, exclude=_ports, outbound=_ports, status=st.integers(0, 65535))
def test_any_valid_annotations_give_an_argv_the_cli_accepts(
    include: str, exclude: str, outbound: str, status: int
) -> None:
    annotations = {
        "traffic.sidecar.istio.io/includeInboundPorts": include,
        "traffic.sidecar.istio.io/excludeInboundPorts": exclude,
        "traffic.sidecar.istio.io/excludeOutboundPorts": outbound,
        "status.sidecar.istio.io/port": str(status),
    }
    config = parse_capture_args(capture_args(annotations, DEFAULT))
    expected = [15090, 15021, *(int(p) for p in exclude.split(",") if p)]
    if status and str(status) not in exclude.split(","):
        expected.append(status)
    assert list(config.local_exclude_ports) == expected
