"""The mesh-less relay (relay/, the ``relay`` injection template's proxy) carrying real TCP in a pod namespace
captured by the rules ``inject --injector-config relay`` writes: outbound and inbound, IPv4 and IPv6,
REDIRECT and TPROXY. The relay runs as the template says (UID 1337; in TPROXY mode root in group 1337 with
NET_ADMIN), with the args the template renders, and logs each connection (source, destination, bytes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import run_cli
from tests.kernel.netlab import APP_UID, PEER4, PEER6, POD4, POD6, Actor, Lab, apply_capture, missing_prerequisites
from tests.kernel.test_traffic import reply

pytestmark = pytest.mark.kernel

MANIFEST = """\
apiVersion: v1
kind: Pod
metadata:
  name: shop
  annotations: {}
spec:
  containers:
  - {name: shop, image: shop:1, securityContext: {runAsUser: 1000}}
"""


@pytest.fixture(params=["legacy", "nft", "native"])
def variant(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    reason = missing_prerequisites(name)
    if reason:
        pytest.skip(reason)
    return name


def injected(tmp_path: Path, mode: str) -> tuple[list[str], dict[str, Any]]:
    """The init container's capture args and the proxy, as ``inject --injector-config relay`` writes them."""
    source = tmp_path / "shop.yaml"
    document = yaml.safe_load(MANIFEST)
    document["metadata"]["annotations"]["sidecar.istio.io/interceptionMode"] = mode
    source.write_text(yaml.safe_dump(document))
    result = run_cli(["inject", "-f", str(source), "--injector-config", "relay"])
    assert result.code == 0, result.stderr
    init, proxy = yaml.safe_load(result.stdout)["spec"]["initContainers"]
    assert (init["name"], proxy["name"], proxy["restartPolicy"]) == ("istio-init", "istio-proxy", "Always")
    args: list[str] = init["args"]
    return args[1:], proxy


def start_relay(lab: Lab, proxy: dict[str, Any]) -> Actor:
    context = proxy["securityContext"]
    caps = [cap.lower() for cap in context["capabilities"].get("add", [])]
    actor = lab.spawn(
        lab.pod,
        [sys.executable, "-m", "relay", *proxy["args"]],
        name="relay",
        uid=context["runAsUser"],
        gid=context["runAsGroup"],
        # setpriv also for a root relay: it must run in the proxy's group, which the capture exempts.
        caps=caps or (["net_bind_service"] if context["runAsUser"] == 0 else []),
    )
    actor.listens = [(kind, port) for port in (15001, 15006, 15021) for kind in ("tcp", "tcp6")]
    return actor


def relayed(relay: Actor) -> list[dict[str, Any]]:
    return [json.loads(line) for line in relay.stdout.read_text().splitlines() if '"direction"' in line]


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
def test_real_tcp_goes_through_the_relay_both_ways(lab: Lab, variant: str, mode: str, tmp_path: Path) -> None:
    args, proxy = injected(tmp_path, mode)
    assert f"--mode={mode}" in proxy["args"]
    actors = [
        lab.echo(lab.peer, "peer", [8080]),
        lab.echo(lab.pod, "app", [8080], uid=APP_UID),
        relay := start_relay(lab, proxy),
    ]
    apply_capture(lab, args, variant, ipv6=True)
    lab.wait_ready(*actors)

    # Outbound, IPv4 and IPv6: the peer answers the relay's connection, from the pod's address.
    # Inbound: the app sees the relay's passthrough source (127.0.0.6, ::6), not the peer.
    exchanges = [
        ("outbound", PEER4, lab.pod, APP_UID, reply("peer", POD4, PEER4, 8080, "out4"), "out4"),
        ("outbound", PEER6, lab.pod, APP_UID, reply("peer", POD6, PEER6, 8080, "out6"), "out6"),
        ("inbound", POD4, lab.peer, 0, reply("app", "127.0.0.6", POD4, 8080, "in4"), "in4"),
        ("inbound", POD6, lab.peer, 0, reply("app", "::6", POD6, 8080, "in6"), "in6"),
    ]
    for _, host, ns, uid, answer, data in exchanges:
        assert lab.client(host, 8080, data=data, ns=ns, uid=uid) == answer

    # One log line per connection: direction, source, original destination, bytes each way.
    events = relayed(relay)
    assert len(events) == len(exchanges), relay.output()
    for event, (direction, host, _, _, answer, data) in zip(events, exchanges, strict=True):
        assert (event["direction"], event["destination"]) == (direction, f"{host}:8080")
        assert (event["sent"], event["received"]) == (len(data), len(answer.encode()))
    assert events[2]["source"].startswith(f"{PEER4}:")
    assert events[3]["source"].startswith(f"{PEER6}:")


def test_a_connection_that_was_not_redirected_is_logged_and_closed(lab: Lab, tmp_path: Path) -> None:
    """No capture: a connection straight to the relay's listener has no original destination to go to."""
    _, proxy = injected(tmp_path, "REDIRECT")
    relay = start_relay(lab, proxy)
    lab.wait_ready(relay)
    result = lab.try_client(POD4, 15001, data="x")
    assert result.stdout == ""  # closed (or reset) without an answer
    (event,) = relayed(relay)
    assert event["direction"] == "outbound"
    assert "destination" not in event
    assert event["source"].startswith(f"{POD4}:")
    assert event["error"]
