"""The injector's configuration and the sidecar template: parsing and every refusal, the shipped
configurations against the schema, the capture derived from the proxy (property tests over generated
templates and pods), no capture without a proxy, idempotence, and the webhook's patch equal to inject's."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from istio_iptables.capture.config import Config
from istio_iptables.errors import ConfigError
from istio_iptables.kube.capture import RECORDED_PROXY_PORTS, InjectionError, load_settings, parse_capture_args
from istio_iptables.kube.inject import Injector, check_config, injected_pod
from istio_iptables.kube.manifests import read_injector_config
from istio_iptables.kube.template import SHIPPED, load_schema, parse_config, shipped_text
from istio_iptables.records import replace
from tests.helpers import run_cli

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "app", "namespace": "shop"},
    "spec": {"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]},
}


def config(**template: Any) -> dict[str, Any]:
    """A configuration with one template, ``sidecar``: a minimal valid one, with ``template``'s fields."""
    body: dict[str, Any] = {
        "listeners": {"outbound": 15001, "inbound": 15006},
        "proxy": {"name": "istio-proxy", "image": "proxy:1", "securityContext": {"runAsUser": 1337}},
    }
    body.update(template)
    return {"templates": {"sidecar": body}}


def injector(tree: dict[str, Any], **options: Any) -> Injector:
    return Injector(load_settings(), config=parse_config(tree, "test"), **options)


def inject(pod: dict[str, Any], chosen: Injector) -> dict[str, Any]:
    return injected_pod(pod, chosen, workload="Pod shop/app", namespace="shop").pod


def init_flags(pod: dict[str, Any]) -> dict[str, str]:
    (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init"]
    args = init["args"][1:]
    return {args[i]: args[i + 1] for i in range(0, len(args) - 1) if args[i] in ("-p", "-z", "-u", "-d")}


# ---- the shipped configurations ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_shipped_configurations_pass_the_schema_and_the_checks(name: str) -> None:
    configmap = yaml.safe_load(shipped_text(name))
    tree = yaml.safe_load(configmap["data"]["config"])
    jsonschema.Draft202012Validator.check_schema(load_schema())
    jsonschema.validate(tree, load_schema())
    parsed, values = read_injector_config(name)
    check_config(parsed, load_settings(values=values))


def test_the_schema_refuses_what_the_parser_refuses() -> None:
    """The parser reports the schema's errors: the schema is the format's one definition."""
    bad = config(proxy={"name": "istio-proxy", "image": "p"}, nativeSidecar="yes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, load_schema())
    with pytest.raises(ConfigError):
        parse_config(bad, "test")


# ---- refusals, one line each naming the field ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("tree", "lines"),
    [
        (config(nativeSidecar="yes"), ["test: templates.sidecar.nativeSidecar: 'yes' is not of type 'boolean'"]),
        (
            config(proxy={"name": "istio-proxy", "image": "p", "securityContext": {}}, listeners={"outbound": 0}),
            [
                "test: templates.sidecar.listeners: 'inbound' is a required property",
                "test: templates.sidecar.listeners.outbound: 0 is less than the minimum of 1",
                "test: templates.sidecar.proxy.securityContext: 'runAsUser' is a required property",
            ],
        ),
        ({"policy": "sometimes"}, ["test: policy: 'sometimes' is not one of ['enabled', 'disabled']"]),
        ({"templats": {}}, ["test: (top level): Additional properties are not allowed ('templats' was unexpected)"]),
        (
            config(proxy={"name": "p", "image": "{{ .Hub }}", "securityContext": {"runAsUser": 1}}),
            ["test: templates.sidecar.proxy.image: unknown placeholder '{{ .Hub }}'"],
        ),
        (
            config(listeners={"outbound": 15001, "inbound": 15001}),
            ["test: templates.sidecar.listeners: outbound and inbound are both 15001"],
        ),
        (config(proxyPorts=[15006]), ["test: templates.sidecar.proxyPorts: 15006 is a redirect listener"]),
        ({**config(), "defaultTemplates": ["other"]}, ["test: defaultTemplates: 'other' is not one of the templates"]),
    ],
)
def test_a_bad_configuration_is_refused_one_line_per_error(tree: dict[str, Any], lines: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(tree, "test")
    got = str(raised.value).splitlines()
    assert len(got) == len(lines), got
    for line, start in zip(got, lines, strict=True):
        assert line.startswith(start), got


def test_listeners_other_than_the_mesh_configs_are_refused() -> None:
    parsed = parse_config(config(listeners={"outbound": 16001, "inbound": 15006}), "test")
    with pytest.raises(ConfigError, match=r"templates.sidecar.listeners.outbound: 16001 disagrees with setting"):
        check_config(parsed, load_settings())
    check_config(parsed, load_settings(["meshConfig.proxyListenPort=16001"]))


def test_a_root_proxy_needs_a_group_of_its_own() -> None:
    root = config(proxy={"name": "istio-proxy", "image": "p", "securityContext": {"runAsUser": 0}})
    with pytest.raises(ConfigError, match=r"templates.sidecar.proxy: .*runAsGroup.*needs a group of its own"):
        check_config(parse_config(root, "test"), load_settings())


def test_the_cli_refuses_a_bad_file_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config(nativeSidecar="yes", listeners={"outbound": 1})))
    source = tmp_path / "app.yaml"
    source.write_text(yaml.safe_dump(POD))
    result = run_cli(["inject", "-f", str(source), "--injector-config", str(path)])
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert all(f"--injector-config {path}: templates.sidecar." in line for line in lines), lines


# ---- the capture follows the proxy ---------------------------------------------------------------------------


ports = st.integers(min_value=1, max_value=65535)


@st.composite
def templates_and_pods(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    outbound, inbound = draw(st.lists(ports, min_size=2, max_size=2, unique=True))
    own = draw(st.lists(ports.filter(lambda port: port not in (outbound, inbound)), max_size=3, unique=True))
    declared = draw(st.lists(ports.filter(lambda port: port not in (outbound, inbound)), max_size=2, unique=True))
    uid = draw(st.integers(min_value=0, max_value=70000))
    gid = draw(st.integers(min_value=1, max_value=70000)) if uid == 0 else draw(st.none() | st.integers(1, 70000))
    context = {"runAsUser": uid, **({"runAsGroup": gid} if gid is not None else {})}
    proxy = {
        "name": "istio-proxy",
        "image": "p",
        "securityContext": context,
        "ports": [{"containerPort": port} for port in declared],
    }
    template = config(listeners={"outbound": outbound, "inbound": inbound}, proxyPorts=own, proxy=proxy)
    apps = [
        {"name": f"app{index}", "image": "a", "securityContext": {"runAsUser": user}}
        for index, user in enumerate(draw(st.lists(st.integers(0, 70000), min_size=1, max_size=3)))
    ]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app"}, "spec": {"containers": apps}}
    return template, pod


@settings(max_examples=60, deadline=None)
@given(templates_and_pods())
def test_the_capture_is_derived_from_the_proxy(case: tuple[dict[str, Any], dict[str, Any]]) -> None:
    tree, pod = case
    body = tree["templates"]["sidecar"]
    context = body["proxy"]["securityContext"]
    uid, gid = context["runAsUser"], context.get("runAsGroup", context["runAsUser"])
    exempt = uid or gid
    listeners = body["listeners"]
    mesh = [f"meshConfig.proxyListenPort={listeners['outbound']}"]
    mesh.append(f"meshConfig.proxyInboundListenPort={listeners['inbound']}")
    chosen = Injector(load_settings(mesh), config=parse_config(tree, "test"))
    users = [c["securityContext"]["runAsUser"] for c in pod["spec"]["containers"]]
    if exempt in users:
        with pytest.raises(InjectionError, match=r"runs as runAsUser .*, the proxy's"):
            inject(pod, chosen)
        return
    result = inject(pod, chosen)
    flags = init_flags(result)
    assert flags["-u"] == str(exempt)
    assert (flags["-p"], flags["-z"]) == (str(listeners["outbound"]), str(listeners["inbound"]))
    own = [*body["proxyPorts"], *(p["containerPort"] for p in body["proxy"]["ports"] if p not in body["proxyPorts"])]
    excluded = [int(port) for port in flags["-d"].split(",") if port]
    assert excluded[: len(set(own))] == list(dict.fromkeys(own))
    assert not {listeners["outbound"], listeners["inbound"]} & set(excluded[: len(set(own))])
    # The argv is one the init container accepts, and the proxy is the template's, placed as asked.
    (init,) = [c for c in result["spec"]["initContainers"] if c["name"] == "istio-init"]
    parse_capture_args(init["args"])
    assert [c["name"] for c in result["spec"]["containers"]][-1] == "istio-proxy"


@pytest.mark.parametrize("field", ["runAsUser", "runAsGroup"])
@pytest.mark.parametrize("where", ["container", "pod"])
def test_an_app_running_as_the_proxy_is_refused(field: str, where: str) -> None:
    pod = copy.deepcopy(POD)
    if where == "pod":
        pod["spec"]["securityContext"] = {field: 1337}
    else:
        pod["spec"]["containers"][0]["securityContext"] = {field: 1337}
    chosen = injector(config(proxy={"name": "istio-proxy", "image": "p", "securityContext": {"runAsUser": 1337}}))
    with pytest.raises(InjectionError, match=rf"Pod shop/app: container app runs as {field} 1337, the proxy's"):
        inject(pod, chosen)


# ---- a proxy with the capture, or the capture alone when asked --------------------------------------------------


def test_no_capture_without_a_proxy_unless_asked() -> None:
    bare = Injector(load_settings())
    with pytest.raises(InjectionError, match=r"^Pod shop/app: the pod gets no proxy .*--capture-only"):
        inject(POD, bare)
    alone = inject(POD, Injector(load_settings(), capture_only=True))
    status = json.loads(alone["metadata"]["annotations"]["sidecar.istio.io/status"])
    assert status["captureOnly"] is True
    assert [c["name"] for c in alone["spec"]["containers"]] == ["app"]
    own = copy.deepcopy(POD)
    own["spec"]["containers"].append({"name": "istio-proxy", "image": "p", "securityContext": {"runAsUser": 1337}})
    assert "captureOnly" not in inject(own, bare)["metadata"]["annotations"]["sidecar.istio.io/status"]


def test_the_cli_refuses_a_pod_without_a_proxy(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(yaml.safe_dump(POD))
    result = run_cli(["inject", "-f", str(source)])
    assert result.code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "the pod gets no proxy" in result.stderr
    assert run_cli(["inject", "-f", str(source), "--capture-only"]).code == 0


@pytest.mark.parametrize("name", sorted(SHIPPED))
@pytest.mark.parametrize("native", ["true", "false"])
def test_injecting_twice_changes_nothing(name: str, native: str) -> None:
    parsed, values = read_injector_config(name)
    chosen = Injector(load_settings(values=values), config=parsed)
    pod = copy.deepcopy(POD)
    pod["metadata"]["annotations"] = {"sidecar.istio.io/nativeSidecar": native}
    once = inject(pod, chosen)
    assert inject(once, chosen) == once
    place = "initContainers" if native == "true" else "containers"
    assert "istio-proxy" in [c["name"] for c in once["spec"][place]]
    proxy = next(c for c in once["spec"][place] if c["name"] == "istio-proxy")
    assert (proxy.get("restartPolicy") == "Always") == (native == "true")
    assert once["spec"]["initContainers"][0]["name"] == "istio-init"


def test_the_relay_templates_placeholders_are_rendered() -> None:
    parsed, values = read_injector_config("relay")
    pod = copy.deepcopy(POD)
    pod["metadata"]["annotations"] = {"sidecar.istio.io/interceptionMode": "TPROXY"}
    result = inject(pod, Injector(load_settings(values=values), config=parsed))
    _, proxy = result["spec"]["initContainers"]
    assert proxy["args"] == ["--outbound-port=15001", "--inbound-port=15006", "--health-port=15021", "--mode=TPROXY"]
    # TPROXY: the relay runs as root in group 1337 with NET_ADMIN; the capture exempts it by that group.
    assert proxy["securityContext"]["runAsUser"] == 0
    assert proxy["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert init_flags(result)["-u"] == "1337"
    assert result["metadata"]["labels"] == {"istio-iptables.io/proxy": "relay"}


@pytest.mark.parametrize("sets", [[], ["components.cni.enabled=true"]])
def test_the_webhooks_patch_is_injects_output_with_the_relay(sets: list[str]) -> None:
    from istio_iptables.kube.webhook import answer  # noqa: PLC0415 (the webhook extra)

    parsed, values = read_injector_config("relay")
    chosen = Injector(load_settings(sets, values=values), config=parsed)
    pod = {key: value for key, value in POD.items() if key != "metadata"} | {"metadata": {"name": "app"}}
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "shop",
            "object": pod,
        },
    }
    response = answer(review, lambda p, w, n: injected_pod(p, chosen, workload=w, namespace=n))["response"]
    import jsonpatch  # noqa: PLC0415

    patched = jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))
    assert patched == inject(pod, chosen)
    # In CNI mode the relay's ports (not Istio's) are recorded for the plugin, by the webhook as by inject.
    assert (RECORDED_PROXY_PORTS in patched["metadata"]["annotations"]) == bool(sets)
    assert response["warnings"][0].startswith("istio-iptables: injected the capture and the proxy of template sidecar")


def test_explain_says_why_for_each_workload(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    never = {**POD, "metadata": {"name": "db", "labels": {"sidecar.istio.io/inject": "false"}}}
    source.write_text(yaml.safe_dump_all([POD, never]))
    result = run_cli(["inject", "-f", str(source), "--injector-config", "relay", "--explain"])
    assert result.code == 0, result.stderr
    assert result.stderr.splitlines() == [
        "Pod shop/app: injected the capture and the proxy of template sidecar: policy enabled and the pod does "
        "not opt out",
        "Pod default/db: not injected: label sidecar.istio.io/inject=false (only y, yes, true, on ask for injection)",
    ]
    labelled = run_cli(
        ["inject", "-f", str(source), "--injector-config", "relay", "--explain", "--namespace-labels", "team=a"]
    )
    assert "not injected: namespace not labelled istio-injection=enabled" in labelled.stderr.splitlines()[0]


def test_interception_mode_none_gets_the_proxy_without_the_capture() -> None:
    pod = copy.deepcopy(POD)
    pod["metadata"]["annotations"] = {"sidecar.istio.io/interceptionMode": "NONE"}
    outcome = injected_pod(pod, injector(config()), workload="Pod shop/app", namespace="shop")
    assert [c["name"] for c in outcome.pod["spec"]["containers"]] == ["app", "istio-proxy"]
    assert "initContainers" not in outcome.pod["spec"] or outcome.pod["spec"]["initContainers"] == []
    assert "interception mode NONE: no capture" in outcome.reason
    without = injected_pod(pod, Injector(load_settings()), workload="Pod shop/app", namespace="shop")
    assert without.pod == pod
    assert without.reason == "not injected: interception mode NONE asks for no capture"


# ---- CNI mode: the plugin, given the pod's annotations only, applies the init container's rules --------------


def plugin_config_of(pod: dict[str, Any], settings: Any) -> Any:
    """The Config the CNI plugin makes of an injected pod from its annotations alone, as a runtime hands them
    (its plugin settings: ``settings``), without what only concerns the plugin's way of applying it."""
    from istio_iptables.cni.plugin import PluginConfig, PodInfo, capture_config  # noqa: PLC0415

    found = capture_config(PodInfo(pod["metadata"]["annotations"]), settings, "/run/netns/pod", PluginConfig())
    return replace(found, network_namespace=Config.network_namespace, cni_mode=False, force_iptables_binary=None)


def init_config_of(pod: dict[str, Any]) -> Any:
    """The Config of the pod's istio-init container: its args and environment."""
    (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "istio-init"]
    return parse_capture_args(init["args"], {item["name"]: item["value"] for item in init.get("env") or []})


@settings(max_examples=60, deadline=None)
@given(templates_and_pods(), st.sampled_from([[], ["meshConfig.defaultConfig.interceptionMode=TPROXY"]]))
def test_the_plugin_applies_the_init_containers_rules_for_any_template(
    case: tuple[dict[str, Any], dict[str, Any]], sets: list[str]
) -> None:
    """Whatever ports and UID the template's proxy has: the injector's settings name its listeners (as they
    must), the plugin runs with the chart's defaults, and still captures as the init container would."""
    tree, pod = case
    body = tree["templates"]["sidecar"]
    listeners = body["listeners"]
    mesh = [*sets, f"meshConfig.proxyListenPort={listeners['outbound']}"]
    mesh.append(f"meshConfig.proxyInboundListenPort={listeners['inbound']}")
    config_ = parse_config(tree, "test")
    for container in pod["spec"]["containers"]:
        container["securityContext"] = {"runAsUser": 5}  # no app runs as the proxy (refused, tested above)
    if 5 in (body["proxy"]["securityContext"]["runAsUser"], body["proxy"]["securityContext"].get("runAsGroup")):
        return
    init_mode = inject(pod, Injector(load_settings(mesh), config=config_))
    cni_mode = inject(pod, Injector(load_settings([*mesh, "components.cni.enabled=true"]), config=config_))
    assert plugin_config_of(cni_mode, load_settings(sets)) == init_config_of(init_mode)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_plugin_applies_the_init_containers_rules_for_the_shipped_templates(name: str) -> None:
    parsed, values = read_injector_config(name)
    for sets in ([], ["meshConfig.defaultConfig.interceptionMode=TPROXY"]):
        init_mode = inject(POD, Injector(load_settings(sets, values=values), config=parsed))
        cni_settings = load_settings([*sets, "components.cni.enabled=true"], values=values)
        cni_mode = inject(POD, Injector(cni_settings, config=parsed))
        assert plugin_config_of(cni_mode, load_settings(sets)) == init_config_of(init_mode)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "15001",
        "{}",
        '{"outbound":15001,"inbound":15006}',
        '{"outbound":0,"inbound":15006,"own":[]}',
        '{"outbound":15001,"inbound":15006,"own":[true]}',
        '{"outbound":15001,"inbound":15006,"own":[],"x":1}',
    ],
)
def test_a_bad_recorded_ports_annotation_is_named_in_one_line(value: str) -> None:
    annotations = {
        "sidecar.istio.io/status": '{"initContainers":["istio-validation"]}',
        RECORDED_PROXY_PORTS: value,
    }
    with pytest.raises(InjectionError) as refused:
        plugin_config_of({"metadata": {"annotations": annotations}}, load_settings())
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"invalid value '{value}' for annotation '{RECORDED_PROXY_PORTS}': must be")
