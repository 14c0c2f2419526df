"""Conformance with Istio's injector: every case of ``../shared/conformance/istio/inject/`` run through the
``inject`` command as a user would (``inject -f input.yaml --set ...``), compared per workload with Istio's
golden: the init containers but their image, and the capture annotations. Error cases exit 2 and name the
annotation. The corpus is read where it is, never copied."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from istio_iptables.kube.capture import load_settings
from istio_iptables.kube.inject import (
    INIT_CONTAINER,
    SIDECAR_STATUS,
    VALIDATION_CONTAINER,
    Injector,
    inject_documents,
    pod_paths,
)
from istio_iptables.kube.manifests import read_injector_config
from tests.helpers import SHARED, run_cli

CORPUS = SHARED / "conformance" / "istio" / "inject"
CASES = sorted(path.name for path in CORPUS.iterdir() if (path / "case.json").is_file()) if CORPUS.is_dir() else []
CAPTURE_ANNOTATIONS = (
    "sidecar.istio.io/interceptionMode",
    "k8s.v1.cni.cncf.io/networks",
    "istio.io/reroute-virtual-interfaces",
)


def _workloads(documents: list[Any]) -> list[dict[str, Any]]:
    found = []
    for document in documents:
        if isinstance(document, dict) and document.get("kind") == "List":
            found += _workloads(document.get("items") or [])
        elif isinstance(document, dict) and pod_paths(document) is not None:
            found.append(document)
    return found


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = (tree or {}).get(key)
    return tree


def _compared(workload: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    metadata_path, spec_path = pod_paths(workload)  # type: ignore[misc]
    spec = _at(workload, spec_path) or {}
    containers = [
        {key: value for key, value in container.items() if key != "image"}
        for container in spec.get("initContainers") or []
        if container.get("name") in (INIT_CONTAINER, VALIDATION_CONTAINER)
    ]
    annotations = (_at(workload, metadata_path) or {}).get("annotations") or {}
    compared: dict[str, Any] = {
        name: value
        for name, value in annotations.items()
        if name.startswith("traffic.sidecar.istio.io/") or name in CAPTURE_ANNOTATIONS
    }
    if containers:
        compared["status present"] = SIDECAR_STATUS in annotations
    return containers, compared


@pytest.mark.skipif(not CASES, reason=f"Istio's injection goldens are not there: {CORPUS} is absent")
@pytest.mark.parametrize("case", CASES)
def test_inject_matches_istios_injector(case: str, tmp_path: Path) -> None:
    folder = CORPUS / case
    spec = json.loads((folder / "case.json").read_text())
    output = tmp_path / "out.yaml"
    args = ["inject", "-f", str(folder / "input.yaml"), "-o", str(output), "--injector-config", "istio"]
    for setting in spec["sets"]:
        args += ["--set", setting]
    result = run_cli(args)
    if spec["expect"] == "error":
        assert result.code == 2, result
        assert spec["error"] in result.stderr.lower(), result.stderr
        assert "annotation 'traffic.sidecar.istio.io/" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not output.exists()
        return
    assert result.code == 0, result.stderr
    workloads = _workloads(list(yaml.safe_load_all(output.read_text())))
    expected_init = yaml.safe_load((folder / "expected-init.yaml").read_text())
    expected_annotations = yaml.safe_load((folder / "expected-annotations.yaml").read_text())
    assert len(workloads) == len(expected_init) == len(expected_annotations)
    for workload, containers, written in zip(workloads, expected_init, expected_annotations, strict=True):
        assert _compared(workload) == (containers, written)


PROXY_DIFFERENCES: dict[str, tuple[dict[str, Any], str]] = {
    "merge-probers": (
        {"proxy": None},
        "the pod is injected already (sidecar.istio.io/status): this injector leaves it as it is, so that "
        "injecting twice changes nothing; Istio's strips its earlier sidecar and injects it again (without the "
        "marks of the earlier injection, the pod gets Istio's proxy exactly: the test below)",
    ),
    "proxy-override-runas.tproxy": (
        {"securityContext.runAsUser": (0, 1234)},
        "TPROXY with the user's runAsUser 1234: Istio runs the proxy as root while its init container exempts "
        "UID 1234, so the proxy's own traffic would be captured again; ours keeps the user's runAsUser, the UID "
        "the capture exempts",
    ),
}
"""The corpus cases whose proxy differs from Istio's, each difference given (the field: Istio's value, ours;
the proxy: None when this injector adds none) and why."""


def _proxy_cases() -> list[str]:
    return [name for name in CASES if (CORPUS / name / "expected-proxy.yaml").is_file()]


PROXY_CASES = _proxy_cases()


def test_every_case_with_a_proxy_is_compared() -> None:
    if CASES:
        assert len(PROXY_CASES) == len([name for name in CASES if "error" not in name]), PROXY_CASES
        assert set(PROXY_DIFFERENCES) <= set(PROXY_CASES)


def _field(tree: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _without(tree: dict[str, Any], dotted: str) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    if not rest:
        return {key: value for key, value in tree.items() if key != head}
    return {**tree, head: _without(tree[head], rest)}


@pytest.mark.skipif(not CASES, reason=f"Istio's injection goldens are not there: {CORPUS} is absent")
@pytest.mark.parametrize("case", PROXY_CASES)
def test_the_istio_template_renders_istios_proxy(case: str, tmp_path: Path) -> None:
    """The shipped istio template's istio-proxy container (every field but the image: the corpus uses Istio's
    test hub) and the pod's volumes, against Istio's golden, with the case's settings; where they differ, it is
    by exactly the difference PROXY_DIFFERENCES gives."""
    folder = CORPUS / case
    output = tmp_path / "out.yaml"
    args = ["inject", "-f", str(folder / "input.yaml"), "-o", str(output), "--injector-config", "istio"]
    for setting in json.loads((folder / "case.json").read_text())["sets"]:
        args += ["--set", setting]
    result = run_cli(args)
    assert result.code == 0, result.stderr
    workloads = _workloads(list(yaml.safe_load_all(output.read_text())))
    expected = yaml.safe_load((folder / "expected-proxy.yaml").read_text())
    assert len(workloads) == len(expected)
    differences = PROXY_DIFFERENCES.get(case, ({}, ""))[0]
    for workload, wanted in zip(workloads, expected, strict=True):
        spec = _at(workload, pod_paths(workload)[1])  # type: ignore[index]
        found = [c for place in ("initContainers", "containers") for c in spec.get(place) or []]
        found = [c for c in found if c.get("name") == "istio-proxy"]
        if wanted["proxy"] is None:
            assert found == []
            continue
        place = wanted["proxy"].pop("_in")
        ours = [c for c in spec.get(place) or [] if c.get("name") == "istio-proxy"]
        if "proxy" in differences:
            assert not ours
            continue
        (proxy,) = ours
        proxy = {k: v for k, v in proxy.items() if k != "image"}
        wanted_proxy = {k: v for k, v in wanted["proxy"].items() if k != "image"}
        for dotted, (istios, own) in differences.items():
            assert (_field(wanted_proxy, dotted), _field(proxy, dotted)) == (istios, own)
            proxy, wanted_proxy = _without(proxy, dotted), _without(wanted_proxy, dotted)
        assert proxy == wanted_proxy
        assert [v for v in spec.get("volumes") or [] if v["name"] != "istio-iptables-lock"] == wanted["volumes"]


@pytest.mark.skipif("merge-probers" not in CASES, reason=f"Istio's injection goldens are not there: {CORPUS} is absent")
def test_a_pod_with_an_earlier_sidecars_proxy_gets_istios_merged_proxy() -> None:
    """merge-probers without what marks it injected (its status annotation, the earlier istio-init and
    volumes): its old istio-proxy is laid over the template's as Kubernetes' strategic merge orders lists, and
    its ISTIO_KUBE_APP_PROBERS takes the new container's probe, as in Istio's golden."""
    folder = CORPUS / "merge-probers"
    (deployment,) = filter(None, yaml.safe_load_all((folder / "input.yaml").read_text()))
    template = deployment["spec"]["template"]
    del template["metadata"]["annotations"][SIDECAR_STATUS]
    del template["spec"]["initContainers"], template["spec"]["volumes"]
    sets = json.loads((folder / "case.json").read_text())["sets"]
    parsed, values = read_injector_config("istio")
    chosen = Injector(load_settings(sets, values=values), config=parsed)
    (injected,) = _workloads(inject_documents([deployment], chosen))
    spec = _at(injected, pod_paths(injected)[1])  # type: ignore[index]
    (proxy,) = [c for c in spec["initContainers"] if c["name"] == "istio-proxy"]
    (wanted,) = yaml.safe_load((folder / "expected-proxy.yaml").read_text())
    assert {k: v for k, v in proxy.items() if k != "image"} == {
        k: v for k, v in wanted["proxy"].items() if k not in ("image", "_in")
    }
    assert spec["volumes"] == wanted["volumes"]
    assert "istio-proxy" not in [c["name"] for c in spec["containers"]]
