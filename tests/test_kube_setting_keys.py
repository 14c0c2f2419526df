"""Every setting path Istio has is accepted, and every other one refused: the vendored list of Istio's settings
(istio_iptables/kube/istio_keys.json) against --set, --values and --mesh-config."""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_iptables.errors import ConfigError
from istio_iptables.kube.capture import load_settings
from istio_iptables.kube.settings import ANY_KEY, known_keys, unknown_setting


def _paths(node: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Each path of the vendored tree with the node it leads to."""
    for key, child in node.items():
        path = (*prefix, key)
        yield path, child
        if isinstance(child, Mapping):
            yield from _paths(child, path)


PATHS = list(_paths(known_keys()))
FREE_FORM = [path for path, node in PATHS if node == ANY_KEY]
LISTED = [path for path, node in PATHS if isinstance(node, Mapping) and node]


def _known(path: tuple[str, ...]) -> bool:
    node: Any = known_keys()
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


@pytest.mark.parametrize(
    ("assignment", "named", "nearest"),
    [
        ("values.globl.proxy.x=1", "values.globl", "global"),
        ("meshConfig.defaultConfg.x=1", "meshConfig.defaultConfg", "defaultConfig"),
        ("components.cni.enabld=true", "components.cni.enabld", "enabled"),
        ("values.sidecarInjectorWebhook.rewriteAppHTTPProbes=true", "", "rewriteAppHTTPProbe"),
        ("values.pilot.cni.enable=true", "", "enabled"),
        ("meshConfig.defaultConfig.interceptionMod=TPROXY", "", "interceptionMode"),
        ("values.global.hub.x=1", "", ""),  # below a value
        ("bogus.thing=1", "bogus", ""),
    ],
)
def test_a_misspelt_set_path_is_refused_naming_it_and_the_nearest(assignment: str, named: str, nearest: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings([assignment])
    message = str(raised.value)
    named = named or assignment.partition("=")[0]
    assert message.startswith(f"invalid value for --set: '{assignment}': unknown setting '{named}'"), message
    assert (f"; did you mean '{nearest}'?" in message) == bool(nearest), message
    assert "\n" not in message


def test_a_misspelt_values_or_mesh_config_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^invalid value for --values: unknown setting 'values\.pilot\.cni\.enabld'"):
        load_settings(values={"pilot": {"cni": {"enabld": True}}})
    with pytest.raises(
        ConfigError, match=r"^invalid value for --mesh-config: unknown setting 'meshConfig\.defaultConfg'"
    ):
        load_settings(mesh_config={"defaultConfg": {"interceptionMode": "TPROXY"}})


def test_a_mesh_config_in_the_proto_spelling_is_refused_not_ignored() -> None:
    """Istio reads default_config as defaultConfig; the capture reads only the JSON spelling, so the other is
    refused, with the spelling to use, rather than silently left out."""
    with pytest.raises(ConfigError, match=r"'meshConfig\.default_config'; did you mean 'defaultConfig'\?$"):
        load_settings(mesh_config={"default_config": {"interceptionMode": "TPROXY"}})


def test_istios_own_settings_load() -> None:
    """A values tree as istiod's injector ConfigMap holds it, with Istio's chart keys the capture ignores."""
    load_settings(
        [
            "values.global.istioNamespace=istio-system",
            "values.cni.provider=multus",
            "values.global.proxy_init.resources.limits.cpu=1",
            "meshConfig.extensionProviders=x",
            "components.ingressGateways[0].enabled=true",
            "unvalidatedValues.anything.below=1",
        ],
        values={
            "revision": "",
            "global": {"proxy": {"lifecycle": {"preStop": {}}}, "meshID": "m", "multiCluster": {"clusterName": "c"}},
            "pilot": {"cni": {"enabled": False, "provider": "default"}, "env": {"PILOT_X": "1"}},
            "sidecarInjectorWebhook": {"templates": {"custom": "..."}, "injectedAnnotations": {"a/b": "c"}},
            "gateways": {"securityContext": {}, "seccompProfile": {}},
        },
        mesh_config={"accessLogFile": "/dev/stdout", "defaultConfig": {"tracing": {"zipkin": {"address": "z:9411"}}}},
    )


def test_every_vendored_path_is_accepted() -> None:
    assert len(PATHS) > 500 and FREE_FORM and LISTED
    for path, _ in PATHS:
        assert unknown_setting(path) == "", path


@given(st.sampled_from(FREE_FORM), st.lists(st.text(string.ascii_letters + "_-/.", min_size=1), max_size=3))
def test_free_form_maps_accept_any_key(path: tuple[str, ...], below: list[str]) -> None:
    assert unknown_setting((*path, *below)) == ""


@given(st.sampled_from(LISTED), st.data())
def test_a_one_character_mutation_of_a_listed_key_is_refused(path: tuple[str, ...], data: st.DataObject) -> None:
    node: Any = known_keys()
    for key in path:
        node = node[key]
    key = data.draw(st.sampled_from(sorted(node)))
    position = data.draw(st.integers(0, len(key)))
    character = data.draw(st.sampled_from(string.ascii_letters + string.digits + "_"))
    mutated = data.draw(
        st.sampled_from(
            [
                key[:position] + character + key[position:],  # inserted
                key[:position] + key[position + 1 :],  # deleted
                key[:position] + character + key[position + 1 :],  # replaced
            ]
        )
    )
    candidate = (*path, mutated)
    if not mutated or "[" in mutated or _known(candidate):
        return  # itself a known key (or no key at all)
    assert unknown_setting(candidate).startswith(f"unknown setting '{'.'.join(candidate)}'")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings([f"{'.'.join(candidate)}=1"])
