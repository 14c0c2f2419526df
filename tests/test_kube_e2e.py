"""End to end without a kernel: the init container's args that ``inject`` wrote, run by the CLI with
``--dry-run``, print exactly the rules of the equivalent long flags written by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import run_cli

MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: shop}
spec:
  template:
    metadata:
      annotations:
        traffic.sidecar.istio.io/includeInboundPorts: "8080,8081"
        traffic.sidecar.istio.io/excludeOutboundPorts: "9090"
        traffic.sidecar.istio.io/includeOutboundIPRanges: "198.18.0.0/15"
        traffic.sidecar.istio.io/excludeOutboundIPRanges: "198.19.0.0/24"
        traffic.sidecar.istio.io/includeOutboundPorts: "5432"
        traffic.sidecar.istio.io/excludeInterfaces: "eth9"
        status.sidecar.istio.io/port: "15021"
        sidecar.istio.io/interceptionMode: MODE
    spec:
      containers:
      - {name: shop, image: shop:1}
      - name: istio-proxy
        image: auto
        securityContext: {runAsUser: 1500, runAsGroup: 1500}
"""


def injected_args(tmp_path: Path, mode: str, *sets: str) -> list[str]:
    source = tmp_path / "shop.yaml"
    source.write_text(MANIFEST.replace("MODE", mode))
    result = run_cli(["inject", "-f", str(source), *(token for s in sets for token in ("--set", s))])
    assert result.code == 0, result.stderr
    document: dict[str, Any] = yaml.safe_load(result.stdout)
    (container,) = document["spec"]["template"]["spec"]["initContainers"]
    args: list[str] = container["args"]
    return args


@pytest.mark.parametrize(
    ("mode", "uid"),
    [
        ("REDIRECT", "1500"),  # the user's istio-proxy UID is exempted...
        ("TPROXY", "1337"),  # ...unless the pod's annotation asks for TPROXY (Istio's template)
    ],
)
def test_injected_args_print_the_rules_of_the_equivalent_flags(tmp_path: Path, mode: str, uid: str) -> None:
    args = injected_args(tmp_path, mode, "values.global.logAsJson=true", "meshConfig.proxyListenPort=15101")
    by_hand = [
        "--envoy-port", "15101",
        "--inbound-capture-port", "15006",
        "--proxy-uid", uid,
        "--istio-inbound-interception-mode", mode,
        "--istio-service-cidr", "198.18.0.0/15",
        "--istio-service-exclude-cidr", "198.19.0.0/24",
        "--istio-inbound-ports", "8080,8081",
        "--istio-local-exclude-ports", "15090,15021",  # the status port 15021 is already there
        "--istio-outbound-ports", "5432",
        "--istio-local-outbound-ports-exclude", "9090",
        "--istio-exclude-interfaces", "eth9",
        "--log_output_level", "default:info",
        "--log_as_json",
    ]  # fmt: skip
    for extra in (["--no-ipv6"], ["--ipv6"], ["--native-nftables", "--ipv6"]):
        from_inject = run_cli([*args, *extra, "--dry-run"])
        from_flags = run_cli([*by_hand, *extra, "--dry-run"])
        assert from_inject.code == from_flags.code == 0, from_inject.stderr + from_flags.stderr
        assert from_inject.stdout == from_flags.stdout
        assert from_inject.stdout.strip()


def test_cni_mode_args_validate_and_apply_nothing(tmp_path: Path) -> None:
    args = injected_args(tmp_path, "REDIRECT", "components.cni.enabled=true")
    assert args[-2:] == ["--run-validation", "--skip-rule-apply"]
    from_inject = run_cli([*args[:-2], "--no-ipv6", "--dry-run"])
    assert from_inject.code == 0, from_inject.stderr
    assert "-A ISTIO_OUTPUT" in from_inject.stdout
