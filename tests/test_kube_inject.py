"""Injection as Istio's injector does it, for the capture: which workloads, what container, where, which
annotations; and what it refuses."""

from __future__ import annotations

import copy
import functools
import json
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_iptables.kube.capture import RECORDED_PROXY_UID, InjectionError, capture_args, init_args, load_settings
from istio_iptables.kube.inject import DEFAULT_IMAGE, Injector, append_multus_network, inject_documents, inject_pod
from istio_iptables.kube.quantity import canonical_quantity, quantity_value

# These tests are about the capture: its init container, without a proxy (--capture-only).
CaptureOnly = functools.partial(Injector, capture_only=True)
DEFAULT = CaptureOnly(load_settings())


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": "app", "labels": {"app": "app"}}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"containers": [{"name": "app", "image": "app:1"}], **spec},
    }


def injected(document: dict[str, Any], injector: Injector = DEFAULT) -> dict[str, Any]:
    result: dict[str, Any] = inject_documents([document], injector)[0]
    return result


def init_container(document: dict[str, Any], name: str = "istio-init") -> dict[str, Any]:
    return next(c for c in document["spec"]["initContainers"] if c["name"] == name)


def test_a_pod_gets_istios_init_container_and_the_status() -> None:
    result = injected(pod())
    container = init_container(result)
    assert container["image"] == DEFAULT_IMAGE
    assert container["args"] == init_args({}, DEFAULT.settings)
    assert container["securityContext"]["runAsUser"] == 0
    assert container["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert container["resources"] == {
        "limits": {"cpu": "2", "memory": "1Gi"},
        "requests": {"cpu": "100m", "memory": "128Mi"},
    }
    status = json.loads(result["metadata"]["annotations"]["sidecar.istio.io/status"])
    assert status["initContainers"] == ["istio-init"]
    assert result["spec"]["containers"] == pod()["spec"]["containers"]  # the proxy is not ours to add


def test_the_input_is_not_changed() -> None:
    original = pod({"a": "b"}, initContainers=[{"name": "x", "image": "x"}])
    kept = copy.deepcopy(original)
    injected(original)
    assert original == kept


@pytest.mark.parametrize(
    "skipped",
    [
        pod(hostNetwork=True),
        pod({"sidecar.istio.io/inject": "false"}),
        pod({"sidecar.istio.io/inject": "enabled"}),  # only y/yes/true/on enable; anything else disables
        pod({"sidecar.istio.io/interceptionMode": "NONE"}),
        pod({"inject.istio.io/templates": "gateway"}),
        pod({"inject.istio.io/templates": "grpc-agent"}),
        pod({"sidecar.istio.io/status": "{}"}),
        {**pod(), "metadata": {"name": "app", "namespace": "kube-system"}},
        {**pod(), "metadata": {"name": "app", "labels": {"sidecar.istio.io/inject": "false"}}},
    ],
)
def test_what_istio_skips_is_passed_through_unchanged(skipped: dict[str, Any]) -> None:
    assert injected(skipped) == skipped


def test_the_label_wins_over_the_annotation() -> None:
    document = pod({"sidecar.istio.io/inject": "false"})
    document["metadata"]["labels"]["sidecar.istio.io/inject"] = "true"
    assert "initContainers" in injected(document)["spec"]


def test_a_mesh_wide_none_skips_unless_the_pod_asks_for_a_mode() -> None:
    none = CaptureOnly(load_settings(["meshConfig.defaultConfig.interceptionMode=NONE"]))
    assert injected(pod(), none) == pod()
    asked = injected(pod({"sidecar.istio.io/interceptionMode": "REDIRECT"}), none)
    assert "-m" in init_container(asked)["args"]


def test_templates_get_capture_only_with_the_sidecar_one() -> None:
    assert "initContainers" in injected(pod({"inject.istio.io/templates": "sidecar,spire"}))["spec"]
    # A custom template of the mesh's injector, unknown here: no capture of ours.
    assert injected(pod({"inject.istio.io/templates": "custom"})) == pod({"inject.istio.io/templates": "custom"})
    defaults = CaptureOnly(load_settings(values={"sidecarInjectorWebhook": {"defaultTemplates": ["gateway"]}}))
    assert injected(pod(), defaults) == pod()


def test_injecting_twice_changes_nothing() -> None:
    once = injected(pod(initContainers=[{"name": "setup", "image": "busybox"}]))
    assert injected(once) == once


def test_the_init_container_goes_last_and_the_validation_first() -> None:
    others = [{"name": "one", "image": "busybox"}, {"name": "two", "image": "busybox"}]
    names = [c["name"] for c in injected(pod(initContainers=others))["spec"]["initContainers"]]
    assert names == ["one", "two", "istio-init"]
    cni = CaptureOnly(load_settings(["components.cni.enabled=true"]))
    names = [c["name"] for c in injected(pod(initContainers=others), cni)["spec"]["initContainers"]]
    assert names == ["istio-validation", "one", "two"]


def test_with_a_native_sidecar_proxy_the_capture_comes_first() -> None:
    others = [{"name": "istio-proxy", "image": "proxy", "restartPolicy": "Always"}]
    names = [c["name"] for c in injected(pod(initContainers=others))["spec"]["initContainers"]]
    assert names == ["istio-init", "istio-proxy"]
    opted = pod({"sidecar.istio.io/nativeSidecar": "true"}, initContainers=[{"name": "one", "image": "x"}])
    assert [c["name"] for c in injected(opted)["spec"]["initContainers"]] == ["istio-init", "one"]


def test_a_users_container_of_the_same_name_is_merged_over_ours() -> None:
    user = {
        "name": "istio-init",
        "image": "auto",
        "args": ["istio-iptables", "-p", "15001"],
        "env": [{"name": "X", "value": "1"}],
        "securityContext": {"runAsUser": 7},
    }
    container = init_container(injected(pod(initContainers=[user])))
    assert container["args"] == ["istio-iptables", "-p", "15001"]  # lists are replaced
    assert container["image"] == DEFAULT_IMAGE  # "auto" means the injector's
    assert container["securityContext"]["runAsUser"] == 7
    assert container["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]  # maps are merged
    assert container["env"] == [{"name": "X", "value": "1"}]


def test_the_users_proxy_uid_and_gid() -> None:
    proxy = {"name": "istio-proxy", "image": "auto", "securityContext": {"runAsUser": 1234, "runAsGroup": 4321}}
    document = pod()
    document["spec"]["containers"].append(proxy)
    args = init_container(injected(document))["args"]
    assert args[args.index("-u") + 1] == "1234"
    cni = CaptureOnly(load_settings(["components.cni.enabled=true"]))
    validation = init_container(injected(document, cni), "istio-validation")
    assert (validation["securityContext"]["runAsUser"], validation["securityContext"]["runAsGroup"]) == (1234, 4321)
    tproxy = CaptureOnly(
        load_settings(["components.cni.enabled=true", "meshConfig.defaultConfig.interceptionMode=TPROXY"])
    )
    validation = init_container(injected(document, tproxy), "istio-validation")
    assert (validation["securityContext"]["runAsUser"], validation["securityContext"]["runAsGroup"]) == (1337, 1337)


@pytest.mark.parametrize(
    ("sets", "annotations", "run_as", "recorded"),
    [
        ([], {}, 1500, "1500"),
        ([], {}, None, None),
        ([], {}, 1337, None),
        (["meshConfig.defaultConfig.interceptionMode=TPROXY"], {}, 1234, "1234"),  # Istio's quirk: -u 1234
        ([], {"sidecar.istio.io/interceptionMode": "TPROXY"}, 1234, None),  # the template's -u 1337
    ],
)
def test_cni_mode_records_the_init_argvs_proxy_uid_for_the_plugin(
    sets: list[str], annotations: dict[str, str], run_as: int | None, recorded: str | None
) -> None:
    document = pod(annotations)
    context = {} if run_as is None else {"securityContext": {"runAsUser": run_as}}
    document["spec"]["containers"].append({"name": "istio-proxy", "image": "auto", **context})
    init_argv = init_container(injected(document, Injector(load_settings(sets))))["args"]
    written = injected(document, Injector(load_settings([*sets, "components.cni.enabled=true"])))
    assert written["metadata"]["annotations"].get(RECORDED_PROXY_UID) == recorded
    # What the plugin makes of the annotations alone is the init container's -u.
    plugin_args = capture_args(written["metadata"]["annotations"], load_settings(sets))
    assert plugin_args[plugin_args.index("-u") + 1] == init_argv[init_argv.index("-u") + 1]


def test_cni_mode_writes_the_settings_the_plugin_reads() -> None:
    cni = CaptureOnly(load_settings(["components.cni.enabled=true", "values.global.proxy.excludeOutboundPorts=25"]))
    annotations = injected(
        pod(
            {
                "traffic.sidecar.istio.io/excludeInboundPorts": "4",
                "status.sidecar.istio.io/port": "123",
                "traffic.sidecar.istio.io/excludeInterfaces": "eth9",
            }
        ),
        cni,
    )["metadata"]["annotations"]
    assert {key: value for key, value in annotations.items() if key != "sidecar.istio.io/status"} == {
        "traffic.sidecar.istio.io/excludeInboundPorts": "4,123",
        "status.sidecar.istio.io/port": "123",
        "traffic.sidecar.istio.io/excludeInterfaces": "eth9",
        "sidecar.istio.io/interceptionMode": "REDIRECT",
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "*",
        "traffic.sidecar.istio.io/includeInboundPorts": "*",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "25",
    }


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        ("", "default/istio-cni"),
        ("macvlan", "macvlan, default/istio-cni"),
        ("macvlan, default/istio-cni", "macvlan, default/istio-cni"),
        ('[{"name": "a"}]', '[{"name": "a"}, {"name": "istio-cni", "namespace": "default"}]'),
        ('[{"name": "istio-cni"}]', '[{"name": "istio-cni"}]'),
        ("[not json]", "[not json]"),  # a JSON list that does not parse is left alone
        ("[not json", "[not json, default/istio-cni"),  # without "]" Istio takes it for a comma list
    ],
)
def test_multus_networks(existing: str, expected: str) -> None:
    assert append_multus_network(existing, "default/istio-cni") == expected


def test_resource_annotations_in_canonical_form() -> None:
    annotations = {"sidecar.istio.io/proxyCPU": "1500m", "sidecar.istio.io/proxyMemoryLimit": "2048Mi"}
    assert init_container(injected(pod(annotations)))["resources"] == {
        "requests": {"cpu": "1500m"},
        "limits": {"memory": "2Gi"},
    }
    with pytest.raises(InjectionError, match=r"annotation 'sidecar\.istio\.io/proxyCPU'"):
        injected(pod({"sidecar.istio.io/proxyCPU": "lots"}))


@pytest.mark.parametrize(
    ("text", "amount"),
    [
        ("100m", Fraction(1, 10)),
        ("2", 2),
        ("1Gi", 1024**3),
        ("1.5e3", 1500),
        ("-1k", -1000),
        ("1n", Fraction(1, 10**9)),
    ],
)
def test_a_quantitys_amount(text: str, amount: Fraction) -> None:
    assert quantity_value(text) == amount


@given(st.integers(-(10**12), 10**12), st.sampled_from(["m", "", "k", "Ki", "Mi", "e3"]))
def test_the_canonical_spelling_stands_for_the_same_amount(number: int, suffix: str) -> None:
    text = f"{number}{suffix}"
    assert quantity_value(canonical_quantity(text)) == quantity_value(text)


def test_null_resources_in_the_values_drop_the_charts_defaults() -> None:
    values = {
        "global": {
            "proxy": {
                "resources": {
                    "limits": {"cpu": None, "memory": "500Mi", "ephemeral-storage": None},
                    "requests": {"cpu": "100m", "memory": None, "ephemeral-storage": "1Gi"},
                }
            }
        }
    }
    assert init_container(injected(pod(), CaptureOnly(load_settings(values=values))))["resources"] == {
        "limits": {"memory": "500Mi"},
        "requests": {"cpu": "100m", "ephemeral-storage": "1Gi"},
    }
    no_resources = CaptureOnly(load_settings(values={"global": {"proxy": {"resources": None}}}))
    assert init_container(injected(pod(), no_resources))["resources"] == {}


def test_env_is_the_proxy_metadata_sorted() -> None:
    injector = CaptureOnly(load_settings(["meshConfig.defaultConfig.proxyMetadata.B=2"]))
    document = pod({"proxy.istio.io/config": "proxyMetadata:\n  A: x\n"})
    assert init_container(injected(document, injector))["env"] == [
        {"name": "A", "value": "x"},
        {"name": "B", "value": "2"},
    ]


def test_hardened_is_non_root_read_only_with_the_lock_volume() -> None:
    result = injected(pod(), CaptureOnly(load_settings(), hardened=True))
    container = init_container(result)
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == context["runAsGroup"] == 65532
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert container["volumeMounts"] == [{"name": "istio-iptables-lock", "mountPath": "/run/istio-iptables"}]
    assert {"name": "istio-iptables-lock", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}} in result["spec"][
        "volumes"
    ]
    assert container["args"] == init_args({}, load_settings())


def test_workloads_and_lists() -> None:
    template = {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"name": "a", "image": "a"}]}}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"template": template},
    }
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "c"},
        "spec": {"jobTemplate": {"spec": {"template": template}}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}
    listed = {"apiVersion": "v1", "kind": "List", "items": [deployment, service, cronjob]}
    result = inject_documents([listed, "text", None], DEFAULT)
    items = result[0]["items"]
    assert init_container(items[0]["spec"]["template"])
    assert items[1] == service
    assert init_container(items[2]["spec"]["jobTemplate"]["spec"]["template"])
    # Istio's quirk: a CronJob's status annotation goes on the job template's metadata.
    assert "sidecar.istio.io/status" in items[2]["spec"]["jobTemplate"]["metadata"]["annotations"]
    assert result[1:] == ["text", None]


@pytest.mark.parametrize(
    "api_version",
    ["example.com/v1", "", "apps/", None],  # a custom resource named Deployment, or no version
)
def test_only_kubernetes_own_workload_kinds_are_injected(api_version: str | None) -> None:
    template = {"metadata": {}, "spec": {"containers": [{"name": "a", "image": "a"}]}}
    document = {
        "apiVersion": api_version,
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"template": template},
    }
    assert injected(document) == document


@pytest.mark.parametrize(
    ("document", "named"),
    [
        (
            pod({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "*"}),
            "annotation 'traffic.sidecar.istio.io/excludeOutboundIPRanges'",
        ),
        (pod({"status.sidecar.istio.io/port": 123}), "annotation 'status.sidecar.istio.io/port'"),  # type: ignore[dict-item]
        ({**pod(), "spec": []}, "spec is not a map"),
        ({**pod(), "metadata": {"name": "app", "annotations": "x"}}, "metadata.annotations is not a map"),
        (pod(initContainers={"name": "x"}), "spec.initContainers is not a list"),
    ],
)
def test_bad_workloads_are_refused_naming_the_workload(document: dict[str, Any], named: str) -> None:
    with pytest.raises(InjectionError) as raised:
        injected(document)
    assert str(raised.value).startswith("Pod default/app: ")
    assert named in str(raised.value)


def test_inject_pod_takes_a_template() -> None:
    template = {"metadata": {}, "spec": {"containers": [{"name": "a", "image": "a"}]}}
    result = inject_pod(template, DEFAULT, workload="Deployment default/a")
    assert set(result) == {"metadata", "spec"}
    assert init_container(result)


_annotation_values = st.text(alphabet="0123456789,*./abc -", max_size=12)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "traffic.sidecar.istio.io/includeInboundPorts",
                "traffic.sidecar.istio.io/excludeInboundPorts",
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "traffic.sidecar.istio.io/excludeOutboundPorts",
                "traffic.sidecar.istio.io/includeOutboundPorts",
                "status.sidecar.istio.io/port",
            ]
        ),
        _annotation_values,
        max_size=4,
    )
)
def test_any_annotations_are_injected_idempotently_or_refused(annotations: dict[str, str]) -> None:
    try:
        once = injected(pod(annotations))
    except InjectionError as error:
        assert str(error).startswith("Pod default/app: ")
        return
    assert injected(once) == once
