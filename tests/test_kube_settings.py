"""Settings as Istio names them: --set, a values tree, a mesh config, over the chart's defaults."""

from __future__ import annotations

import pytest

from istio_iptables.errors import ConfigError
from istio_iptables.kube.capture import load_settings
from istio_iptables.kube.settings import go_text, parse_set_value


def test_defaults_are_istios_chart() -> None:
    settings = load_settings()
    assert settings.text("global.proxy.includeIPRanges") == "*"
    assert settings.text("global.proxy.statusPort") == "15020"
    assert settings.mesh_value("defaultConfig.interceptionMode") == "REDIRECT"
    assert not settings.cni


def test_sets_win_over_the_values_tree_which_wins_over_defaults() -> None:
    settings = load_settings(
        ["values.global.proxy.excludeIPRanges=10.0.0.0/8"],
        values={"global": {"proxy": {"excludeIPRanges": "192.168.0.0/16", "includeInboundPorts": "80"}}},
    )
    assert settings.text("global.proxy.excludeIPRanges") == "10.0.0.0/8"
    assert settings.text("global.proxy.includeInboundPorts") == "80"
    assert settings.text("global.proxy.includeIPRanges") == "*"  # untouched default kept by the merge


@pytest.mark.parametrize(
    "switch", ["components.cni.enabled=true", "values.pilot.cni.enabled=true", "values.istio_cni.enabled=true"]
)
def test_every_name_of_cni_mode(switch: str) -> None:
    assert load_settings([switch]).cni


def test_mesh_config_sets_and_file_merge() -> None:
    settings = load_settings(
        ["meshConfig.defaultConfig.proxyMetadata.B=2"],
        mesh_config={"defaultConfig": {"proxyMetadata": {"A": "1"}}, "proxyListenPort": 15101},
    )
    assert settings.mesh_value("defaultConfig.proxyMetadata") == {"A": "1", "B": 2}
    assert settings.mesh_value("proxyListenPort") == 15101
    assert settings.mesh_value("defaultConfig.interceptionMode") == "REDIRECT"


def test_settings_not_about_the_capture_are_accepted() -> None:
    load_settings(
        [
            "values.global.proxy.readinessInitialDelaySeconds=100",
            "values.global.proxy.holdApplicationUntilProxyStarts=true",
            "values.sidecarInjectorWebhook.rewriteAppHTTPProbe=false",
            "profile=demo",
            "hub=example.com/istio",
            "components.ingressGateways[0].enabled=false",
            "meshConfig.accessLogFile=/dev/stdout",
        ]
    )


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("values.global.proxy.includeIPRanges", "must be PATH=VALUE"),
        ("=1", "must be PATH=VALUE"),
        ("values..x=1", "must be PATH=VALUE"),
        ("bogus.thing=1", "unknown setting 'bogus'"),
        ("values.global.logAsJson=yes", "setting values.global.logAsJson"),
        ("values.global.imagePullPolicy=Sometimes", "setting values.global.imagePullPolicy"),
        ("values.global.proxy.statusPort=70000", "setting values.global.proxy.statusPort"),
        ("values.global.proxy.statusPort=abc", "setting values.global.proxy.statusPort"),
        ("meshConfig.defaultConfig.interceptionMode=SOMETIMES", "setting meshConfig.defaultConfig.interceptionMode"),
        ("meshConfig.proxyListenPort=-1", "setting meshConfig.proxyListenPort"),
        ("values.global.proxy.includeIPRanges=10.0.0.1", "setting values.global.proxy.includeIPRanges"),
        ("values.global.proxy.excludeInboundPorts=*", "setting values.global.proxy.excludeInboundPorts"),
        ("values.global.logging.level=default:loud", "setting values.global.logging.level"),
        ("values.global.proxy=1", "setting values.global.proxy"),
    ],
)
def test_a_bad_setting_is_refused_naming_it(assignment: str, named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings([assignment])
    assert named in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_set_through_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"values\.pilot\.env is not a map"):
        load_settings(["values.pilot.env=x", "values.pilot.env.A=1"])


def test_a_values_tree_must_be_a_map() -> None:
    with pytest.raises(ConfigError, match="--values"):
        load_settings(values=["global"])  # type: ignore[arg-type]


def test_a_mesh_wide_none_is_accepted() -> None:
    load_settings(["meshConfig.defaultConfig.interceptionMode=NONE"])


@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False), ("15020", 15020), ("4,5,6", "4,5,6")])
def test_set_values_are_typed_as_istioctl_types_them(text: str, value: object) -> None:
    assert parse_set_value(text) == value
    assert go_text(parse_set_value(text)) == text
