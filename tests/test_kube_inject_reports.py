"""Nothing accepted silently (issue 16): ``inject`` says which workloads it left alone and why, refuses a
setting Istio's chart does not have where the capture reads (naming the nearest one), and warns of an init
image it will not use. Run as a user runs it, to see its stderr as they do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("yaml", reason="PyYAML is not installed")

from tests.helpers import ROOT

WORKLOADS = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: opted-out, namespace: shop}
spec:
  selector: {matchLabels: {app: a}}
  template:
    metadata: {labels: {app: a, sidecar.istio.io/inject: "false"}}
    spec: {containers: [{name: a, image: a}]}
---
apiVersion: v1
kind: Pod
metadata: {name: system, namespace: kube-system}
spec: {containers: [{name: a, image: a}]}
---
apiVersion: v1
kind: Pod
metadata: {name: host, namespace: shop}
spec: {hostNetwork: true, containers: [{name: a, image: a}]}
---
apiVersion: v1
kind: Pod
metadata: {name: gateway, namespace: shop, annotations: {inject.istio.io/templates: gateway}}
spec: {containers: [{name: a, image: a}]}
---
apiVersion: v1
kind: Pod
metadata: {name: none, namespace: shop, annotations: {sidecar.istio.io/interceptionMode: NONE}}
spec: {containers: [{name: a, image: a}]}
---
apiVersion: v1
kind: Pod
metadata: {name: injected, namespace: shop}
spec: {containers: [{name: a, image: a}]}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: not-a-workload, namespace: shop}
"""


def inject(tmp_path: Path, *options: str, manifests: str = WORKLOADS) -> tuple[int, str, str]:
    """``inject`` of the capture alone (``--capture-only``: these pods bring no proxy, and the reports and
    settings under test are the capture's)."""
    source = tmp_path / "in.yaml"
    source.write_text(manifests)
    command = [sys.executable, "-m", "istio_iptables", "inject", "--capture-only", "-f", str(source), *options]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    return done.returncode, done.stdout, done.stderr


def test_each_skipped_workload_is_reported_once_with_its_reason(tmp_path: Path) -> None:
    code, stdout, stderr = inject(tmp_path)
    assert code == 0 and "istio-init" in stdout
    lines = stderr.splitlines()
    expected = {
        "Deployment shop/opted-out": "label sidecar.istio.io/inject=false",
        "Pod kube-system/system": "namespace kube-system is a system namespace, never injected",
        "Pod shop/host": "hostNetwork: true",
        "Pod shop/gateway": "templates gateway have no capture",
        "Pod shop/none": "interception mode NONE asks for no capture",
    }
    assert len(lines) == len(expected), stderr
    for workload, reason in expected.items():
        (line,) = [line for line in lines if f"skipped {workload}:" in line]
        assert reason in line and line.count(workload) == 1, line
    assert "shop/injected" not in stderr and "not-a-workload" not in stderr


@pytest.mark.parametrize(
    ("assignment", "named", "nearest"),
    [
        ("values.global.proxy.includeIPRange=10.0.0.0/8", "values.global.proxy.includeIPRange", "includeIPRanges"),
        ("values.global.proxy.exclude_inbound_ports=8080", "values.global.proxy.exclude_inbound_ports", ""),
        ("values.global.proxy_init.imag=r/x:1", "values.global.proxy_init.imag", "image"),
        ("values.global.proxy.statusport=1", "values.global.proxy.statusport", "statusPort"),
    ],
)
def test_an_unknown_set_path_is_refused_naming_it_and_the_nearest(
    tmp_path: Path, assignment: str, named: str, nearest: str
) -> None:
    code, stdout, stderr = inject(tmp_path, "--set", assignment)
    assert code == 2 and not stdout
    assert stderr.count("\n") == 1 and f"unknown setting '{named}'" in stderr, stderr
    assert (f"did you mean '{nearest}'" in stderr) == bool(nearest), stderr


def test_an_unknown_values_key_is_refused(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("global:\n  proxy:\n    includeIPRange: 10.0.0.0/8\n")
    code, _, stderr = inject(tmp_path, "--values", str(values))
    assert code == 2 and stderr.count("\n") == 1
    assert "--values" in stderr and "'values.global.proxy.includeIPRange'" in stderr and "includeIPRanges" in stderr


def test_istio_s_settings_the_capture_does_not_read_are_accepted(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("global:\n  hub: docker.io/istio\n  proxy:\n    tracer: zipkin\n    logLevel: debug\n")
    options = ["--values", str(values), "--set", "values.global.proxy.readinessPeriodSeconds=200"]
    code, _, stderr = inject(tmp_path, *options, "--set", "values.pilot.autoscaleEnabled=false")
    assert code == 0, stderr


def test_an_init_image_without_a_registry_path_is_warned_about(tmp_path: Path) -> None:
    code, stdout, stderr = inject(tmp_path, "--set", "values.global.proxy_init.image=my-init")
    assert code == 0 and "image: istio-iptables:0.1.0" in stdout
    (line,) = [line for line in stderr.splitlines() if "proxy_init.image" in line]
    assert "'my-init'" in line and "no '/'" in line
    code, stdout, stderr = inject(tmp_path, "--set", "values.global.proxy_init.image=registry.local/init:1")
    assert code == 0 and "image: registry.local/init:1" in stdout and "proxy_init.image" not in stderr
