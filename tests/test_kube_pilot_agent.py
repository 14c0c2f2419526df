"""The shipped istio template's rules beyond the corpus: the app's probes answered by Istio's agent (the probes
rewritten, ISTIO_KUBE_APP_PROBERS), Prometheus merging, holding the app, the status port's probes, the
overlays and placeholders that carry Istio's conditionals; and that init mode, CNI mode and the webhook
agree on all of it."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import pytest

from istio_iptables.errors import ConfigError
from istio_iptables.kube.capture import load_settings
from istio_iptables.kube.inject import Injector, injected_pod
from istio_iptables.kube.manifests import read_injector_config
from istio_iptables.kube.template import parse_config, substitute
from istio_iptables.kube.webhook import answer

APP = {
    "name": "app",
    "image": "app:1",
    "ports": [{"name": "http", "containerPort": 8080}],
    "readinessProbe": {"httpGet": {"port": "http", "path": "/ready", "scheme": "HTTPS"}, "periodSeconds": 7},
    "livenessProbe": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 5},
    "startupProbe": {"grpc": {"port": 9090}},
    "lifecycle": {"postStart": {"tcpSocket": {"port": 93}}, "preStop": {"httpGet": {"port": 91}}},
}
SIDECAR = {"name": "log", "image": "log:1", "restartPolicy": "Always", "readinessProbe": {"httpGet": {"port": 3333}}}
POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "app", "namespace": "shop"},
    "spec": {"initContainers": [SIDECAR], "containers": [APP]},
}
PROBERS = (
    '{"/app-health/app/livez":{"tcpSocket":{"port":8080},"timeoutSeconds":5},'
    '"/app-health/app/readyz":{"httpGet":{"path":"/ready","port":8080,"scheme":"HTTPS"}},'
    '"/app-health/app/startupz":{"grpc":{"port":9090,"service":null}},'
    '"/app-health/log/readyz":{"httpGet":{"port":3333}},'
    '"/app-lifecycle/app/poststartz":{"tcpSocket":{"port":93}},'
    '"/app-lifecycle/app/prestopz":{"httpGet":{"port":91}}}'
)


def istio(sets: list[str] | None = None, pod: dict[str, Any] | None = None, **annotations: str) -> dict[str, Any]:
    parsed, values = read_injector_config("istio")
    chosen = Injector(load_settings(sets or [], values=values), config=parsed)
    document = copy.deepcopy(pod or POD)
    document["metadata"]["annotations"] = annotations
    return injected_pod(document, chosen, workload="Pod shop/app", namespace="shop").pod


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    return next(c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name)


def env(proxy: dict[str, Any], name: str) -> str | None:
    return next((item.get("value") for item in proxy.get("env") or [] if item["name"] == name), None)


def test_the_apps_probes_and_hooks_go_to_the_agent() -> None:
    pod = istio()
    assert env(container(pod, "istio-proxy"), "ISTIO_KUBE_APP_PROBERS") == PROBERS
    app = container(pod, "app")
    assert app["readinessProbe"] == {
        "httpGet": {"port": 15020, "path": "/app-health/app/readyz", "scheme": "HTTP"},
        "periodSeconds": 7,
    }
    assert app["livenessProbe"] == {"httpGet": {"path": "/app-health/app/livez", "port": 15020}, "timeoutSeconds": 5}
    assert app["startupProbe"] == {"httpGet": {"path": "/app-health/app/startupz", "port": 15020}}
    assert app["lifecycle"] == {
        "postStart": {"httpGet": {"path": "/app-lifecycle/app/poststartz", "port": 15020}},
        "preStop": {"httpGet": {"port": 15020, "path": "/app-lifecycle/app/prestopz"}},
    }
    assert container(pod, "log")["readinessProbe"] == {"httpGet": {"port": 15020, "path": "/app-health/log/readyz"}}


def test_the_status_port_annotation_moves_the_probes() -> None:
    pod = istio(**{"status.sidecar.istio.io/port": "15555"})
    assert container(pod, "app")["readinessProbe"]["httpGet"]["port"] == 15555
    assert "--debug-port=15555" in container(pod, "istio-proxy")["lifecycle"]["preStop"]["exec"]["command"]


@pytest.mark.parametrize(
    ("sets", "annotation", "rewritten"),
    [
        ([], None, True),
        ([], "false", False),
        ([], "f", False),
        (["values.sidecarInjectorWebhook.rewriteAppHTTPProbe=false"], None, False),
        (["values.sidecarInjectorWebhook.rewriteAppHTTPProbe=false"], "true", True),
        (["values.sidecarInjectorWebhook.rewriteAppHTTPProbe=false"], "maybe", False),  # not Go's bool: the values'
    ],
)
def test_probe_rewriting_is_the_pods_choice_else_the_values(
    sets: list[str], annotation: str | None, rewritten: bool
) -> None:
    annotations = {} if annotation is None else {"sidecar.istio.io/rewriteAppHTTPProbers": annotation}
    pod = istio(sets, **annotations)
    assert (env(container(pod, "istio-proxy"), "ISTIO_KUBE_APP_PROBERS") is not None) == rewritten
    assert (container(pod, "app") == APP) != rewritten


def test_a_probe_on_an_unknown_named_port_or_the_agents_port_is_not_passed_on() -> None:
    app = {
        "name": "app",
        "image": "a",
        "readinessProbe": {"httpGet": {"port": "nope"}},
        "livenessProbe": {"httpGet": {"port": 15020, "path": "/app-health/app/livez"}},
        "startupProbe": {"exec": {"command": ["true"]}},
    }
    pod = istio(pod={**POD, "spec": {"containers": [app]}})
    assert env(container(pod, "istio-proxy"), "ISTIO_KUBE_APP_PROBERS") is None
    assert container(pod, "app")["startupProbe"] == app["startupProbe"]
    # Istio still points the unresolved probe at the agent (which then answers it with an error).
    assert container(pod, "app")["readinessProbe"] == {"httpGet": {"port": 15020, "path": "/app-health/app/readyz"}}


def test_prometheus_scraping_goes_to_the_agent() -> None:
    pod = istio(**{"prometheus.io/scrape": "true", "prometheus.io/port": "9100", "prometheus.io/path": "/m"})
    assert env(container(pod, "istio-proxy"), "ISTIO_PROMETHEUS_ANNOTATIONS") == (
        '{"scrape":"true","path":"/m","port":"9100"}'
    )
    annotations = pod["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == ("15020", "/stats/prometheus")
    for off in ({"prometheus.io/scrape": "false"}, {"prometheus.istio.io/merge-metrics": "false"}):
        pod = istio(**off)
        assert env(container(pod, "istio-proxy"), "ISTIO_PROMETHEUS_ANNOTATIONS") is None
        assert "prometheus.io/port" not in pod["metadata"]["annotations"]
    pod = istio(["meshConfig.enablePrometheusMerge=false"])
    assert "prometheus.io/port" not in pod["metadata"]["annotations"]


@pytest.mark.parametrize(
    ("sets", "proxy_config", "first", "post_start"),
    [
        ([], None, False, False),
        (["values.global.proxy.holdApplicationUntilProxyStarts=true"], None, True, True),
        ([], "holdApplicationUntilProxyStarts: true", True, True),
        # Istio: the proxy config's explicit false removes the hook; the values still put the proxy first.
        (
            ["values.global.proxy.holdApplicationUntilProxyStarts=true"],
            "holdApplicationUntilProxyStarts: false",
            True,
            False,
        ),
    ],
)
def test_a_proxy_that_holds_the_app_goes_first_with_its_hook(
    sets: list[str], proxy_config: str | None, first: bool, post_start: bool
) -> None:
    annotations = {"sidecar.istio.io/nativeSidecar": "false"}
    if proxy_config is not None:
        annotations["proxy.istio.io/config"] = proxy_config
    pod = istio(sets, **annotations)
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == (["istio-proxy", "app"] if first else ["app", "istio-proxy"])
    proxy = container(pod, "istio-proxy")
    assert ("postStart" in (proxy.get("lifecycle") or {})) == post_start
    assert "startupProbe" not in proxy and "preStop" not in (proxy.get("lifecycle") or {})  # a native sidecar's


def test_a_native_sidecar_holds_the_app_by_its_startup_probe_alone() -> None:
    proxy = container(istio(["values.global.proxy.holdApplicationUntilProxyStarts=true"]), "istio-proxy")
    assert proxy["restartPolicy"] == "Always"
    assert set(proxy["lifecycle"]) == {"preStop"}
    assert proxy["startupProbe"]["httpGet"]["port"] == 15021


def test_without_a_status_port_the_proxy_has_no_probes() -> None:
    proxy = container(istio(["values.global.proxy.statusPort=0"]), "istio-proxy")
    assert "readinessProbe" not in proxy and "startupProbe" not in proxy


def test_init_mode_cni_mode_and_the_webhook_agree_and_twice_is_once() -> None:
    """Probe rewriting changes the app containers: the same whatever captures the pod, whoever injects it."""
    parsed, values = read_injector_config("istio")
    results = []
    for sets in ([], ["components.cni.enabled=true"]):
        chosen = Injector(load_settings(sets, values=values), config=parsed)

        def inject(pod: Any, workload: str, namespace: str, chosen: Injector = chosen) -> Any:
            return injected_pod(pod, chosen, workload=workload, namespace=namespace)

        once = inject(copy.deepcopy(POD), "Pod shop/app", "shop").pod
        assert inject(once, "Pod shop/app", "shop").pod == once
        request = {"uid": "1", "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE"}
        request |= {"namespace": "shop", "object": copy.deepcopy(POD)}
        review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
        response = answer(review, inject)["response"]
        assert jsonpatch.apply_patch(POD, json.loads(base64.b64decode(response["patch"]))) == once
        spec = once["spec"]
        capture = ("istio-init", "istio-validation")
        results.append([c for c in [*spec["initContainers"], *spec["containers"]] if c["name"] not in capture])
    assert results[0] == results[1]


def test_a_template_without_listeners_gets_no_capture() -> None:
    pod = istio(**{"inject.istio.io/templates": "grpc-agent"})
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app", "istio-proxy"]
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["log"]
    assert env(container(pod, "istio-proxy"), "ISTIO_KUBE_APP_PROBERS") is None  # grpc-agent does not answer them


def test_overlays_are_laid_when_all_their_conditions_hold() -> None:
    tree = {
        "templates": {
            "sidecar": {
                "listeners": {"outbound": 15001, "inbound": 15006},
                "proxy": {"name": "istio-proxy", "image": "p", "securityContext": {"runAsUser": 1337}},
                "overlays": [
                    {"when": ["nativeSidecar"], "proxy": {"args": ["native"]}},
                    {"when": ["nativeSidecar", "tproxy"], "proxy": {"args": ["native-tproxy"]}},
                ],
            }
        }
    }
    chosen = Injector(load_settings(), config=parse_config(tree, "test"))
    for given, args in (
        ({"sidecar.istio.io/nativeSidecar": "true"}, ["native"]),
        ({"sidecar.istio.io/nativeSidecar": "true", "sidecar.istio.io/interceptionMode": "TPROXY"}, ["native-tproxy"]),
        ({"sidecar.istio.io/interceptionMode": "TPROXY"}, None),
    ):
        pod = {**POD, "metadata": {"name": "app", "annotations": given}}
        assert container(injected_pod(pod, chosen, workload="Pod shop/app").pod, "istio-proxy").get("args") == args


def test_a_placeholder_standing_for_nothing_drops_its_field_and_a_list_is_spliced() -> None:
    tree = {"a": "{{ .Empty }}", "b": "{{ .None }}", "c": "x{{ .Empty }}", "env": ["{{ .Items }}", {"name": "Z"}]}
    values = {"Empty": "", "None": None, "Items": [{"name": "A"}, {"name": "B"}]}
    assert substitute(tree, values, {}) == {"c": "x", "env": [{"name": "A"}, {"name": "B"}, {"name": "Z"}]}


def test_the_values_and_annotations_istios_template_reads() -> None:
    sets = [
        "values.global.logAsJson=true",
        "values.global.proxy.privileged=true",
        "values.global.multiCluster.clusterName=east",
        "values.global.meshID=mesh1",
        "values.global.proxy.clusterDomain=corp.local",
        "values.global.caAddress=ca.example:443",
        "meshConfig.defaultConfig.proxyMetadata.ISTIO_META_DNS_CAPTURE=true",
    ]
    mounts = '{"certs": {"mountPath": "/certs", "readOnly": true}}'
    volumes = '{"certs": {"secret": {"secretName": "certs"}}}'
    pod = istio(
        sets,
        **{
            "sidecar.istio.io/userVolumeMount": mounts,
            "sidecar.istio.io/userVolume": volumes,
            "sidecar.istio.io/logLevel": "debug",
            "sidecar.istio.io/proxyImage": "registry.example/proxy:2",
        },
    )
    proxy = container(pod, "istio-proxy")
    assert proxy["image"] == "registry.example/proxy:2"
    assert proxy["args"][3:] == [
        "$(POD_NAMESPACE).svc.corp.local",
        "--proxyLogLevel=debug",
        "--proxyComponentLogLevel=misc:error",
        "--log_output_level=default:info",
        "--log_as_json",
    ]
    assert (proxy["securityContext"]["privileged"], proxy["securityContext"]["allowPrivilegeEscalation"]) == (
        True,
        True,
    )
    assert [env(proxy, name) for name in ("CA_ADDR", "ISTIO_META_CLUSTER_ID", "ISTIO_META_MESH_ID")] == [
        "ca.example:443",
        "east",
        "mesh1",
    ]
    assert proxy["env"][-2:][0] == {"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}  # proxyMetadata, then probers
    assert proxy["volumeMounts"][-1] == {"name": "certs", "mountPath": "/certs", "readOnly": True}
    assert pod["spec"]["volumes"][-1] == {"name": "certs", "secret": {"secretName": "certs"}}


def test_a_bad_user_volume_annotation_is_named() -> None:
    with pytest.raises(ConfigError, match=r"invalid value '\[\]' for annotation 'sidecar.istio.io/userVolume'"):
        istio(**{"sidecar.istio.io/userVolume": "[]"})


def test_the_pod_gets_istios_labels_and_annotations_unless_it_has_them() -> None:
    pod = copy.deepcopy(POD)
    pod["metadata"]["labels"] = {"app": "a" * 62 + "-x", "version": "v2", "security.istio.io/tlsMode": "disabled"}
    result = istio(pod=pod, **{"kubectl.kubernetes.io/default-container": "log"})
    assert result["metadata"]["labels"] == {
        **pod["metadata"]["labels"],
        "service.istio.io/canonical-name": "a" * 62,  # 63 characters at most, then one trailing '-' dropped
        "service.istio.io/canonical-revision": "v2",
    }
    annotations = result["metadata"]["annotations"]
    assert annotations["kubectl.kubernetes.io/default-container"] == "log"
    assert annotations["kubectl.kubernetes.io/default-logs-container"] == "app"
    assert annotations["istio.io/rev"] == "default"


def test_the_templates_volumes_go_ahead_of_the_pods_own() -> None:
    """As Istio's strategic merge of its template over the pod orders them; a volume the pod has is its own."""
    pod = copy.deepcopy(POD)
    pod["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}, {"name": "istio-envoy", "emptyDir": {}}]
    volumes = istio(pod=pod)["spec"]["volumes"]
    names = [volume["name"] for volume in volumes]
    assert names[:3] == ["workload-socket", "credential-socket", "workload-certs"]
    assert names.index("data") == names.index("istio-envoy") - 1  # before the next volume it preceded
    assert {"name": "istio-envoy", "emptyDir": {}} in volumes
