"""The CNI protocol: what the plugin reads from a runtime and what it answers, as the spec says."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_iptables.cni.protocol import (
    CniError,
    dumps,
    error_json,
    loads,
    parse_args,
    read_request,
    result_json,
    version_json,
)

ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/var/run/netns/p", "CNI_IFNAME": "eth0"}
PREVIOUS = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/p"}],
    "ips": [{"address": "198.18.64.2/24", "gateway": "198.18.64.1", "interface": 0}],
    "dns": {},
}


def config(version: str = "1.0.0", **extra: object) -> bytes:
    return json.dumps({"cniVersion": version, "name": "net", "type": "istio-iptables-cni", **extra}).encode()


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_add_passes_the_previous_result_through_unchanged(version: str) -> None:
    previous = {**PREVIOUS, "cniVersion": version}
    request = read_request(ENV, config(version, prevResult=previous))
    assert json.loads(result_json(request)) == previous


def test_a_first_plugin_answers_an_empty_result_of_its_version() -> None:
    assert json.loads(result_json(read_request(ENV, config("0.4.0")))) == {"cniVersion": "0.4.0", "dns": {}}


def test_version_lists_what_is_supported_whatever_the_request() -> None:
    request = read_request({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.2.0"}')
    assert request.command == "VERSION"
    assert json.loads(version_json()) == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}


def test_the_pod_comes_from_cni_args() -> None:
    env = {**ENV, "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_UID=u"}
    assert read_request(env, config()).pod == ("shop", "cart-1")
    assert read_request(ENV, config()).pod is None


def test_del_needs_no_netns() -> None:
    request = read_request({**ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}, config())
    assert request.netns == ""


@pytest.mark.parametrize(
    ("env", "stdin", "code", "message"),
    [
        ({**ENV, "CNI_COMMAND": "UP"}, config(), 4, "CNI_COMMAND is 'UP'"),
        ({k: v for k, v in ENV.items() if k != "CNI_COMMAND"}, config(), 4, "CNI_COMMAND is not set"),
        ({k: v for k, v in ENV.items() if k != "CNI_NETNS"}, config(), 4, "CNI_NETNS not set"),
        ({**ENV, "CNI_ARGS": "K8S_POD_NAME"}, config(), 4, "'K8S_POD_NAME' is not KEY=VALUE"),
        (ENV, b"{not json", 6, "not JSON"),
        (ENV, b"[]", 6, "not a JSON object"),
        (ENV, config("0.2.0"), 1, "incompatible CNI version '0.2.0'"),
        ({**ENV, "CNI_COMMAND": "CHECK"}, config("0.3.1"), 1, "does not allow CHECK"),
    ],
)
def test_bad_requests_get_the_spec_error(env: dict[str, str], stdin: bytes, code: int, message: str) -> None:
    with pytest.raises(CniError) as error:
        read_request(env, stdin)
    assert error.value.code == code
    assert message in error.value.message


def test_refusing_check_answers_in_the_configuration_s_version() -> None:
    with pytest.raises(CniError) as error:
        read_request({**ENV, "CNI_COMMAND": "CHECK"}, config("0.3.1"))
    assert json.loads(error_json(error.value, ""))["cniVersion"] == "0.3.1"


def test_the_error_object() -> None:
    document = json.loads(error_json(CniError(101, "refused", "line 3"), "0.4.0"))
    assert document == {"cniVersion": "0.4.0", "code": 101, "msg": "refused", "details": "line 3"}
    assert json.loads(error_json(CniError(1, "old"), "0.2.0"))["cniVersion"] == "1.0.0"


def test_cni_args_pairs() -> None:
    assert parse_args("A=1;;B=x=y") == {"A": "1", "B": "x=y"}


@pytest.mark.parametrize(
    ("runtime_config", "servers"),
    [
        ({"dns": {"servers": ["10.96.0.10", "fd00::a"], "searches": ["svc.cluster.local"]}}, ["10.96.0.10", "fd00::a"]),
        ({"dns": {"searches": ["svc.cluster.local"]}}, []),  # the capability, but no server: none to capture
        ({"dns": {"Servers": ["10.96.0.10"], "Searches": ["svc.cluster.local"], "Options": None}}, ["10.96.0.10"]),
        ({"dns": {"Servers": None, "Searches": None, "Options": None}}, []),  # containerd's spelling
        ({"io.kubernetes.cri.pod-annotations": {}}, None),  # no capability: the plugin cannot know them
    ],
)
def test_the_pods_dns_servers_from_the_dns_capability(
    runtime_config: dict[str, object], servers: list[str] | None
) -> None:
    assert read_request(ENV, config(runtimeConfig=runtime_config)).dns_servers == servers


DOCUMENTS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@given(DOCUMENTS)
def test_json_is_the_standard_librarys(document: object) -> None:
    """The C scanner and encoder used directly give exactly what ``json`` gives."""
    text = json.dumps(document)
    assert dumps(document) == text
    assert repr(loads(text.encode())) == repr(json.loads(text))


@given(
    st.binary(max_size=30)
    | st.text(max_size=30).map(str.encode)
    | st.sampled_from([b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16")])
)
def test_any_input_reads_as_json_reads_it(text: bytes) -> None:
    def outcome(read: object) -> str:
        try:
            return repr(read(text))  # type: ignore[operator]
        except (ValueError, UnicodeDecodeError) as error:
            return f"{type(error).__name__}: {error}"

    assert outcome(loads) == outcome(json.loads)


def test_an_unencodable_value_is_refused_as_json_refuses_it() -> None:
    with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
        dumps({"a": {1}})
