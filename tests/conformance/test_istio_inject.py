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

from istio_iptables.kube.inject import INIT_CONTAINER, SIDECAR_STATUS, VALIDATION_CONTAINER, pod_paths
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


PROXY_NOT_COMPARED = {
    "gateway": "Istio's gateway template, not its sidecar",
    "grpc-agent": "Istio's grpc-agent template, not its sidecar",
    "hello-host-network-with-ns": "hostNetwork: Istio's proxy, no capture; ours leaves the pod alone",
    "deploymentconfig-with-canonical-service-label": "the workload name from Istio's canonical-name labels",
}
"""The cases whose proxy is not compared, and why; so are those with settings or with the proxy's settings
in annotations or containers (custom proxy settings), and those whose proxy Istio gives the app's probes."""


def _proxy_cases() -> list[str]:
    chosen = []
    for name in CASES:
        folder = CORPUS / name
        if (
            name in PROXY_NOT_COMPARED
            or not (folder / "expected-proxy.yaml").is_file()
            or json.loads((folder / "case.json").read_text())["sets"]
        ):
            continue
        # The interception mode is the capture's setting, not the proxy's.
        text = (folder / "input.yaml").read_text().replace("sidecar.istio.io/interceptionMode", "")
        expected = (folder / "expected-proxy.yaml").read_text()
        custom = (
            "sidecar.istio.io/",
            "status.sidecar",
            "readiness.status",
            "prometheus.io",
            "proxy.istio.io",
            "istio-proxy",
        )
        if any(marker in text for marker in custom) or "ISTIO_KUBE_APP_PROBERS" in expected:
            continue
        chosen.append(name)
    return chosen


PROXY_CASES = _proxy_cases()


def test_enough_cases_compare_the_proxy() -> None:
    if CASES:
        assert len(PROXY_CASES) >= 10, PROXY_CASES


@pytest.mark.skipif(not CASES, reason=f"Istio's injection goldens are not there: {CORPUS} is absent")
@pytest.mark.parametrize("case", PROXY_CASES)
def test_the_istio_template_renders_istios_proxy(case: str, tmp_path: Path) -> None:
    """The shipped istio template's istio-proxy container and the pod's volumes, against Istio's default
    template's (every field but the image: the corpus uses Istio's test hub)."""
    folder = CORPUS / case
    output = tmp_path / "out.yaml"
    result = run_cli(["inject", "-f", str(folder / "input.yaml"), "-o", str(output), "--injector-config", "istio"])
    assert result.code == 0, result.stderr
    workloads = _workloads(list(yaml.safe_load_all(output.read_text())))
    expected = yaml.safe_load((folder / "expected-proxy.yaml").read_text())
    assert len(workloads) == len(expected)
    for workload, wanted in zip(workloads, expected, strict=True):
        spec = _at(workload, pod_paths(workload)[1])  # type: ignore[index]
        place = wanted["proxy"].pop("_in")
        (proxy,) = [c for c in spec.get(place) or [] if c.get("name") == "istio-proxy"]
        assert {k: v for k, v in proxy.items() if k != "image"} == {
            k: v for k, v in wanted["proxy"].items() if k != "image"
        }
        assert [v for v in spec.get("volumes") or [] if v["name"] != "istio-iptables-lock"] == wanted["volumes"]
