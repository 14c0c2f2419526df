"""``inject``'s YAML reads back the same with the YAML 1.1 readers Kubernetes users have: PyYAML's rules and
kubectl's (sigs.k8s.io/yaml, a go-yaml v2, which also takes ``y``, ``n``, ``1e3`` or ``0o17`` for booleans and
numbers). kubectl runs without a cluster: ``kubectl patch --local`` reads a file as ``apply`` would and
prints it as JSON."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")

from istio_iptables.kube.manifests import dump_documents  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed (scripts/test installs Debian's kubernetes-client)"
)

MISREAD = [
    *("y", "Y", "n", "N", "yes", "No", "on", "OFF", "true", "False", "~", "null", ""),
    *("1e3", "1E3", "1.5e3", "-1.5e-3", "0o17", "0O17", "0x1F", "0b101", "017", "0999", "1_000", "1__0", "+1"),
    *(".5", ".5e3", ".inf", "-.Inf", ".NaN", "12", "-12", "18446744073709551616", "1.", "1.e3"),
    *("2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10 -5", "1:20", "190:20:30", "<<", "="),
]
"""Strings that some YAML 1.1 reader takes for a boolean, null, a number, a date, a merge key or a value."""

TRICKY = st.text(alphabet="0123456789abcdefxoXOBeE._-+:~yYnNtT ", max_size=10)
"""Strings made of what numbers, booleans and dates are made of."""
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)


def kubectl_reads(text: str) -> Any:
    """The object kubectl makes of one YAML document, as JSON (no cluster needed)."""
    assert KUBECTL is not None
    done = subprocess.run(
        [KUBECTL, "patch", "--local", "-f", "-", "--type=merge", "-p", "{}", "-o", "json"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def configmap(strings: list[str]) -> dict[str, Any]:
    """Each string as a key, a value, a label value and a list item (an annotation is a map of strings too)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "strings",
            "labels": {f"l{index}": text for index, text in enumerate(strings)},
            "annotations": {"as-list": json.dumps(strings)},
        },
        "data": {text: text for text in strings},
    }


@pytest.mark.parametrize("text", MISREAD)
def test_strings_a_yaml_1_1_reader_misreads_are_quoted(text: str) -> None:
    written = dump_documents([{"key": text}])
    assert written != f"key: {text}\n", written
    assert yaml.safe_load(written) == {"key": text}


def test_other_strings_stay_plain() -> None:
    for text in ("istio-iptables:0.1.0", "1.2.3", "10-net", "15001,15006", "x1e3", "1.5e3x", "0x", "0o8"):
        assert dump_documents([{"key": text}]) == f"key: {text}\n", text


@given(st.lists(st.one_of(TRICKY, ANY_TEXT), max_size=8))
def test_pyyaml_reads_back_every_string(strings: list[str]) -> None:
    document = configmap(strings)
    assert yaml.safe_load(dump_documents([document])) == document


@needs_kubectl
def test_kubectl_reads_back_the_strings_yaml_1_1_misreads() -> None:
    document = configmap(MISREAD)
    assert kubectl_reads(dump_documents([document])) == document


@needs_kubectl
@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(TRICKY, TRICKY, ANY_TEXT), min_size=1, max_size=40, unique=True))
def test_kubectl_reads_back_every_string(strings: list[str]) -> None:
    document = configmap(strings)
    assert kubectl_reads(dump_documents([document])) == document


@needs_kubectl
def test_kubectl_reads_inject_s_output_as_inject_wrote_it() -> None:
    """The documented ``sidecar.istio.io/inject: "y"`` label, through ``inject`` (with Istio's proxy template:
    its output is the most there is to read back) and then kubectl."""
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app", "namespace": "shop", "labels": {"version": "1e3"}},
        "spec": {
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app", "sidecar.istio.io/inject": "y"}},
                "spec": {"containers": [{"name": "app", "image": "app:1", "args": ["0o17", "n", "1.5e3"]}]},
            },
        },
    }
    done = subprocess.run(
        [sys.executable, "-m", "istio_iptables", "inject", "--injector-config", "istio", "-f", "-"],
        input=json.dumps(deployment),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    written = yaml.safe_load(done.stdout)
    names = [c["name"] for c in written["spec"]["template"]["spec"]["initContainers"]]
    assert "istio-init" in names and "istio-proxy" in names  # Istio's template: the proxy as a native sidecar
    assert kubectl_reads(done.stdout) == written
