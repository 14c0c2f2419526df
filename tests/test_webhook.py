"""``istio-iptables webhook``: the AdmissionReview protocol against the real injection (the whole conformance
corpus), then the server as it runs in the product, over real HTTPS on 127.0.0.1 with a certificate made
here: patches applied with a JSON Patch library equal ``inject``'s output, 20 concurrent clients, bad
requests, certificate reload, SIGTERM drain, start-up errors; and deploy/webhook.yaml."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

jsonpatch = pytest.importorskip("jsonpatch", reason="the webhook extra is not installed")
yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
pytest.importorskip("aiohttp", reason="the webhook extra is not installed")
pytest.importorskip("cryptography", reason="cryptography (dev extra) is not installed")

from istio_iptables.errors import ConfigError  # noqa: E402
from istio_iptables.kube.capture import load_settings  # noqa: E402
from istio_iptables.kube.inject import Injector, inject_pod, injected_pod, pod_paths  # noqa: E402
from istio_iptables.kube.manifests import load_injector, read_injector_config  # noqa: E402
from istio_iptables.kube.template import shipped_text  # noqa: E402
from istio_iptables.kube.webhook import NotAReviewError, answer, json_patch  # noqa: E402
from tests.helpers import ROOT, SHARED, kubernetes_validate  # noqa: E402
from tests.webhook_lab import Authority, Webhook, command, review, running, wait_for  # noqa: E402

CORPUS = SHARED / "conformance" / "istio" / "inject"
DEPLOY = ROOT / "deploy" / "webhook.yaml"
CASES = sorted(path.name for path in CORPUS.iterdir() if (path / "case.json").is_file()) if CORPUS.is_dir() else []
needs_corpus = pytest.mark.skipif(not CASES, reason=f"Istio's injection goldens are not there: {CORPUS} is absent")
CAPTURE_CONTAINERS = ("istio-init", "istio-validation")


# ---- reviews made from the conformance corpus ---------------------------------------------------------------


def case(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((CORPUS / name / "case.json").read_text())
    return loaded


def pods(name: str) -> list[dict[str, Any]]:
    """Each workload of the case's input as the Pod the API server would send: the metadata Istio reads for
    the workload and its pod spec."""
    result = []
    for document in filter(None, yaml.safe_load_all((CORPUS / name / "input.yaml").read_text())):
        for item in document.get("items", [document]) if document.get("kind") == "List" else [document]:
            paths = pod_paths(item)
            if paths is not None:
                metadata, spec = (_at(item, path) for path in paths)
                result.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata or {}, "spec": spec})
    return result


def _at(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, Mapping) else None
    return tree


def injector(sets: list[str]) -> Injector:
    """The shipped istio template's injector: a pod gets Istio's proxy with the capture."""
    return load_injector(sets=sets, values_file="", mesh_file="", image="", hardened=False, injector_config="istio")


def injection(sets: list[str]) -> Any:
    chosen = injector(sets)
    return lambda pod, workload, namespace: injected_pod(pod, chosen, workload=workload, namespace=namespace)


def patched(pod: Mapping[str, Any], answered: Mapping[str, Any]) -> Any:
    """The pod as the API server stores it: the answer's patch applied to the pod it sent."""
    response = answered["response"]
    assert response["allowed"] is True, response
    if "patch" not in response:
        assert "patchType" not in response
        return pod
    assert response["patchType"] == "JSONPatch"
    return jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))


def capture_containers(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The capture's init containers, image aside (as expected-init.yaml has them)."""
    return [
        {key: value for key, value in container.items() if key != "image"}
        for container in pod["spec"].get("initContainers") or []
        if container.get("name") in CAPTURE_CONTAINERS
    ]


def check_case(name: str, answer_of: Any) -> None:
    """Every workload of the case reviewed through ``answer_of``: the patched pod is exactly what inject_pod
    makes of it, and its capture container Istio's (expected-init.yaml); an error case is refused naming the
    annotation."""
    settings = case(name)
    chosen = injector(settings["sets"])
    workloads = pods(name)
    if settings["expect"] == "error":
        refusals = [answer_of(pod)["response"] for pod in workloads]
        refused = [response for response in refusals if not response["allowed"]]
        assert refused, refusals
        bad = {key for pod in workloads for key in (pod["metadata"].get("annotations") or {})}
        assert any(key in response["status"]["message"] for key in bad for response in refused), refused
        return
    expected = yaml.safe_load((CORPUS / name / "expected-init.yaml").read_text())
    assert len(expected) == len(workloads)
    for pod, containers in zip(workloads, expected, strict=True):
        namespace = pod["metadata"].get("namespace") or "apps"
        result = patched(pod, answer_of(pod))
        workload = f"pod {namespace}/{pod['metadata'].get('name') or '*'}"
        assert result == inject_pod(pod, chosen, workload=workload, namespace=namespace)
        assert capture_containers(result) == containers


# ---- the protocol, in process -------------------------------------------------------------------------------


@needs_corpus
@pytest.mark.parametrize("name", CASES)
def test_every_conformance_case_through_the_protocol(name: str) -> None:
    inject = injection(case(name)["sets"])
    check_case(name, lambda pod: answer(review(pod), inject))


def test_the_answer_carries_the_uid_and_a_patch_with_escaped_annotation_keys() -> None:
    pod = {"metadata": {"name": "app", "annotations": {"a/b": "c"}}, "spec": {"containers": [{"name": "app"}]}}
    answered = answer(review(pod, uid="e3a1-77"), injection([]))
    assert answered["apiVersion"] == "admission.k8s.io/v1" and answered["kind"] == "AdmissionReview"
    assert answered["response"]["uid"] == "e3a1-77"
    operations = json.loads(base64.b64decode(answered["response"]["patch"]))
    paths = [operation["path"] for operation in operations]
    assert "/metadata/annotations/sidecar.istio.io~1status" in paths
    assert "/spec/initContainers" in paths
    assert patched(pod, answered)["metadata"]["annotations"]["a/b"] == "c"


def test_an_injected_pod_and_a_skipped_one_get_no_patch() -> None:
    inject = injection([])
    pod = {"metadata": {"name": "app"}, "spec": {"containers": [{"name": "app"}]}}
    once = patched(pod, answer(review(pod), inject))
    assert once != pod
    again = answer(review(once), inject)["response"]
    assert again == unchanged("already injected (sidecar.istio.io/status is set)")
    host = {"metadata": {"name": "host"}, "spec": {"hostNetwork": True, "containers": [{"name": "app"}]}}
    assert answer(review(host), inject)["response"] == unchanged(
        "hostNetwork: true (the pod shares the node's network namespace)"
    )
    opted_out = {"metadata": {"name": "x", "annotations": {"sidecar.istio.io/inject": "false"}}, "spec": {}}
    assert answer(review(opted_out), inject)["response"] == unchanged(
        "annotation sidecar.istio.io/inject=false (only y, yes, true, on ask for injection)"
    )


def unchanged(why: str) -> dict[str, Any]:
    """The answer for a pod admitted as it is: no patch, and the reason as the warning kubectl shows."""
    return {"uid": "5a1b", "allowed": True, "warnings": [f"istio-iptables: not injected: {why}"]}


def test_an_injected_pod_says_why_in_a_warning() -> None:
    pod = {"metadata": {"name": "app"}, "spec": {"containers": [{"name": "app"}]}}
    response = answer(review(pod), injection([]))["response"]
    assert response["warnings"] == [
        "istio-iptables: injected the capture and the proxy of template sidecar: "
        "policy enabled and the pod does not opt out"
    ]


def test_the_namespace_comes_from_the_request_when_the_pod_has_none() -> None:
    pod = {"metadata": {"generateName": "app-7d9f-"}, "spec": {"containers": [{"name": "app"}]}}
    assert answer(review(pod, namespace="kube-system"), injection([]))["response"] == unchanged(
        "namespace kube-system is a system namespace, never injected"
    )
    assert "patch" in answer(review(pod, namespace="apps"), injection([]))["response"]


def test_a_refused_pod_is_named_with_its_namespace_and_the_annotation() -> None:
    pod = {
        "metadata": {"generateName": "app-7d9f-", "annotations": {"traffic.sidecar.istio.io/includeInboundPorts": "x"}},
        "spec": {"containers": [{"name": "app"}]},
    }
    response = answer(review(pod, namespace="shop"), injection([]))["response"]
    assert response["allowed"] is False and response["uid"] == "5a1b"
    message = response["status"]["message"]
    assert "pod shop/app-7d9f-*" in message and "traffic.sidecar.istio.io/includeInboundPorts" in message
    assert "\n" not in message and response["status"]["code"] == 400


def test_only_a_pod_s_creation_is_injected() -> None:
    pod = {"metadata": {"name": "app"}, "spec": {"containers": [{"name": "app"}]}}

    def refuse(*_: Any) -> dict[str, Any]:
        raise ConfigError("must not be called")

    for request in (
        {"operation": "UPDATE"},
        {"operation": "CREATE", "subResource": "ephemeralcontainers"},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
        {"kind": {"group": "example.com", "version": "v1", "kind": "Pod"}},
    ):
        assert answer(review(pod, **request), refuse)["response"] == {"uid": "5a1b", "allowed": True}, request
    assert answer(review(pod), refuse)["response"]["allowed"] is False  # the same pod at creation is reviewed


@pytest.mark.parametrize(
    "body",
    [
        [],
        "review",
        {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "u"}},
        {"apiVersion": "admission.k8s.io/v1", "kind": "Pod"},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}},
        review({"metadata": {}}, uid=7),  # type: ignore[arg-type]
        review([]),  # type: ignore[arg-type]
    ],
)
def test_what_is_not_a_review_is_refused_as_such(body: Any) -> None:
    with pytest.raises(NotAReviewError):
        answer(body, injection([]))


_KEYS = st.text(alphabet="ab/~.-01", min_size=1, max_size=6)
_TREES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _TREES, max_size=4), st.dictionaries(_KEYS, _TREES, max_size=4))
def test_the_patch_turns_any_object_into_any_other(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Keys with '/' and '~' (annotation keys have them) included: JSON Pointer escapes them."""
    operations = json_patch(before, after)
    assert jsonpatch.apply_patch(before, operations) == after
    assert json.loads(json.dumps(operations)) == operations
    assert (operations == []) == (before == after)


# ---- over HTTPS ---------------------------------------------------------------------------------------------


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Webhook]:
    with running(tmp_path, ["--injector-config", "istio"]) as server:
        yield server


@needs_corpus
@pytest.mark.parametrize(
    "name", ["hello", "traffic-params", "hello-tproxy", "hello-cncf-networks", "list", "proxy-override-runas"]
)
def test_the_served_patch_makes_what_inject_makes(tmp_path: Path, name: str) -> None:
    options = ["--injector-config", "istio"]
    options += [option for assignment in case(name)["sets"] for option in ("--set", assignment)]
    with running(tmp_path, options) as server:
        check_case(name, lambda pod: server.review(review(pod)))


@needs_corpus
def test_the_served_patch_makes_what_the_inject_command_writes(webhook: Webhook) -> None:
    """The corpus's Pod manifests through ``istio-iptables inject`` and through the webhook: the same pods."""
    names = [
        name for name in CASES if (CORPUS / name / "input.yaml").read_text().startswith("apiVersion: v1\nkind: Pod\n")
    ]
    assert len(names) >= 3
    for name in names:
        assert not case(name)["sets"], name  # the one server serves the chart defaults
        source = CORPUS / name / "input.yaml"
        argv = command("inject", "-f", str(source), "--injector-config", "istio")
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        for pod, written in zip(yaml.safe_load_all(source.read_text()), yaml.safe_load_all(done.stdout), strict=True):
            assert pod["kind"] == "Pod", name
            assert patched(pod, webhook.review(review(pod, namespace="default"))) == written, name


def test_ready_answers_once_serving(webhook: Webhook) -> None:
    connection = webhook.connection(host="istio-iptables-webhook.istio-iptables.svc")
    connection.request("GET", "/ready")
    response = connection.getresponse()
    assert (response.status, response.read()) == (200, b"ok\n")
    connection.close()


def test_200_reviews_from_20_concurrent_clients(webhook: Webhook) -> None:
    """Each client keeps its connection (as the API server does) and sends 10 reviews, each a different pod;
    every answer must carry its own uid and its own pod's patch."""
    inject = injection([])
    ranges = [f"198.18.{index}.0/24" for index in range(200)]

    def pod(index: int) -> dict[str, Any]:
        annotations = {"traffic.sidecar.istio.io/excludeOutboundIPRanges": ranges[index]}
        return {
            "metadata": {"name": f"app-{index}", "annotations": annotations},
            "spec": {"containers": [{"name": "a"}]},
        }

    def client(number: int) -> list[tuple[int, Any]]:
        connection = webhook.connection()
        results = []
        try:
            for index in range(number * 10, number * 10 + 10):
                body = json.dumps(review(pod(index), uid=f"uid-{index}")).encode()
                connection.request("POST", "/inject", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                results.append((index, (response.status, json.loads(response.read()))))
        finally:
            connection.close()
        return results

    with ThreadPoolExecutor(20) as pool:
        answers = [result for results in pool.map(client, range(20)) for result in results]
    assert len(answers) == 200
    for index, (status, answered) in answers:
        assert status == 200
        assert answered["response"]["uid"] == f"uid-{index}"
        expected = inject(pod(index), f"pod apps/app-{index}", "apps").pod
        assert patched(pod(index), answered) == expected
    assert webhook.process.poll() is None


def test_bad_requests_get_400_or_415_and_the_server_keeps_serving(webhook: Webhook) -> None:
    good = json.dumps(review({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "a"}]}})).encode()
    assert webhook.post(good, content_type="text/plain")[0] == 415
    assert webhook.post(good, content_type="application/yaml")[0] == 415
    for body in (
        b"{",
        b"\xff\xfe\x00",
        b"[]",
        b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}',
    ):
        status, text = webhook.post(body)
        assert status == 400 and text, body
    assert webhook.post(good, path="/mutate")[0] == 404
    bad_pod = {"metadata": {"name": "a", "annotations": {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "*"}}}
    refused = webhook.review(review({**bad_pod, "spec": {"containers": [{"name": "a"}]}}))["response"]
    assert refused["allowed"] is False
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges" in refused["status"]["message"]
    assert webhook.post(good, content_type="application/json; charset=utf-8")[0] == 200
    assert webhook.post(good, path="/inject/cluster/Kubernetes/net/network1")[0] == 200
    assert webhook.process.poll() is None
    assert "Traceback" not in webhook.stderr()


def test_a_changed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    authority = Authority()
    with running(tmp_path, ["--injector-config", "relay"], authority=authority) as server:
        first = server.served_serial()
        cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
        second = authority.issue(tmp_path / "next.crt", tmp_path / "next.key")
        # The new certificate beside the old key: not a pair (a load into the live context would drop the key).
        os.replace(tmp_path / "next.crt", cert_file)
        assert wait_for(lambda: "kept the previous TLS certificate" in server.stderr(), 10), server.stderr()
        assert server.served_serial() == first
        time.sleep(2.5)  # the files are looked at every second: the mismatch is seen again, and not said again
        os.replace(tmp_path / "next.key", key_file)
        assert wait_for(lambda: server.served_serial() == second, 10), server.stderr()
        assert server.stderr().count("kept the previous TLS certificate") == 1  # said once, not every second
        assert server.review(review({"metadata": {"name": "a"}, "spec": {}}))["response"]["allowed"] is True
        assert server.process.poll() is None


def test_a_secret_volume_update_is_seen(tmp_path: Path) -> None:
    """The kubelet updates a mounted Secret by swapping the ..data symlink: the file names never change."""
    authority = Authority()
    mount = tmp_path / "mount"
    mount.mkdir()
    first_dir, second_dir = mount / "..v1", mount / "..v2"
    first_dir.mkdir()
    second_dir.mkdir()
    authority.issue(first_dir / "tls.crt", first_dir / "tls.key")
    second = authority.issue(second_dir / "tls.crt", second_dir / "tls.key")
    (mount / "..data").symlink_to("..v1")
    for name in ("tls.crt", "tls.key"):
        (mount / name).symlink_to(f"..data/{name}")
    with running(
        tmp_path, ["--injector-config", "relay"], authority=authority, tls=(mount / "tls.crt", mount / "tls.key")
    ) as server:
        assert server.served_serial() != second
        (mount / "..data.tmp").symlink_to("..v2")
        os.replace(mount / "..data.tmp", mount / "..data")
        assert wait_for(lambda: server.served_serial() == second, 10), server.stderr()


def test_sigterm_finishes_the_review_in_flight_and_exits_within_5_s(webhook: Webhook) -> None:
    body = json.dumps(review({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "a"}]}})).encode()
    context = ssl.create_default_context(cafile=str(webhook.ca_file))
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", webhook.port), timeout=10), server_hostname="127.0.0.1"
    ) as tls:
        head = "POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        tls.sendall(head.encode() + body[:20])
        assert wait_for(lambda: webhook.process.poll() is None, 1)
        time.sleep(0.2)  # the headers are in: the request is in flight
        started = time.monotonic()
        webhook.process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: "stopped listening" in webhook.stderr(), 5), webhook.stderr()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", webhook.port), timeout=2).close()
        tls.sendall(body[20:])
        received = b""
        while chunk := tls.recv(65536):
            received += chunk
    head_text, _, answer_body = received.partition(b"\r\n\r\n")
    assert head_text.startswith(b"HTTP/1.1 200"), received
    assert b"connection: close" in head_text.lower()
    assert json.loads(answer_body)["response"]["uid"] == "5a1b"
    assert webhook.process.wait(5) == 0
    assert time.monotonic() - started < 5


def test_sigterm_with_only_an_idle_keep_alive_connection_exits_at_once(webhook: Webhook) -> None:
    idle = webhook.connection()
    idle.request("GET", "/ready")
    assert idle.getresponse().read() == b"ok\n"  # the connection stays open, as the API server keeps it
    started = time.monotonic()
    webhook.process.send_signal(signal.SIGTERM)
    assert webhook.process.wait(5) == 0
    assert time.monotonic() - started < 2
    idle.close()
    assert "Traceback" not in webhook.stderr()


def test_bad_options_end_with_one_line_and_exit_2(tmp_path: Path) -> None:
    authority = Authority()
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    authority.issue(cert_file, key_file)
    tls = ["--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)]
    for extra, named in (
        (["--tls-cert-file", str(tmp_path / "missing"), "--tls-key-file", str(key_file)], "--tls-cert-file"),
        (["--tls-cert-file", str(cert_file), "--tls-key-file", str(cert_file)], "--tls-key-file"),
        ([*tls, "--port", "65536"], "--port"),
        ([*tls, "--address", "localhost"], "--address"),
        ([*tls, "--set", "values.global.proxy.statusPort=x"], "statusPort"),
        ([*tls, "--values", str(tmp_path / "missing.yaml")], "--values"),
        ([*tls, "--image", "a b"], "--image"),
        (tls[2:], "--tls-cert-file"),
    ):
        done = subprocess.run(command("webhook", *extra), capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 2, (extra, done.stderr)
        assert done.stderr.count("\n") == 1 and named in done.stderr, (extra, done.stderr)


def test_a_port_in_use_ends_with_exit_1(tmp_path: Path) -> None:
    authority = Authority()
    authority.issue(tmp_path / "tls.crt", tmp_path / "tls.key")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        argv = command(
            "webhook",
            "--address",
            "127.0.0.1",
            "--port",
            port,
            "--tls-cert-file",
            str(tmp_path / "tls.crt"),
            "--tls-key-file",
            str(tmp_path / "tls.key"),
        )
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and port in done.stderr, done.stderr


def test_a_plain_run_and_help_load_no_webhook_code() -> None:
    probe = (
        "import sys\n"
        "from istio_iptables.cli import fast as cli\n"
        "for argv in (['-p', '15001', '-i', '*', '--dry-run'], ['--help'], ['webhook', '--help']):\n"
        "    try: cli.main(argv)\n"
        "    except SystemExit as exit_: assert exit_.code == 0, (argv, exit_.code)\n"
        "    loaded = {'aiohttp', 'jsonpatch', 'ssl', 'istio_iptables.kube.webhook'} & set(sys.modules)\n"
        "    assert not loaded, (argv, loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# ---- deploy/webhook.yaml ------------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    return {document["kind"]: document for document in yaml.safe_load_all(DEPLOY.read_text())}


def test_kubernetes_validate_accepts_the_deployment_with_a_real_ca_bundle(tmp_path: Path) -> None:
    text = DEPLOY.read_text()
    assert text.count("caBundle: CA_BUNDLE_BASE64\n") == 1
    filled = tmp_path / "webhook.yaml"
    filled.write_text(text.replace("CA_BUNDLE_BASE64", base64.b64encode(Authority().pem()).decode()))
    report = kubernetes_validate(filled)
    assert report.count("passed") == len(manifests()), report


def test_the_webhook_configuration_is_what_kubernetes_and_the_server_agree_on() -> None:
    found = manifests()
    (hook,) = found["MutatingWebhookConfiguration"]["webhooks"]
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    assert hook["failurePolicy"] == "Fail"
    assert hook["namespaceSelector"] == {"matchLabels": {"istio-injection": "enabled"}}
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    service, deployment = found["Service"], found["Deployment"]
    reference = hook["clientConfig"]["service"]
    assert reference == {
        "name": service["metadata"]["name"],
        "namespace": service["metadata"]["namespace"],
        "path": "/inject",
        "port": service["spec"]["ports"][0]["port"],
    }
    # The webhook's own namespace is never selected: its pods must not wait for it.
    assert found["Namespace"]["metadata"]["labels"]["istio-injection"] != "enabled"
    assert service["metadata"]["namespace"] == found["Namespace"]["metadata"]["name"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    options = dict(argument.removeprefix("--").split("=", 1) for argument in container["args"][1:])
    assert container["args"][0] == "webhook" and options["port"] == str(container["ports"][0]["containerPort"])
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert probe["httpGet"] == {"path": "/ready", "port": "https-webhook", "scheme": "HTTPS"}


def test_the_deployment_reads_only_what_it_mounts_and_needs_no_capability() -> None:
    found = manifests()
    template = found["Deployment"]["spec"]["template"]["spec"]
    (container,) = template["containers"]
    volumes = {volume["name"]: volume for volume in template["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    options = dict(argument.removeprefix("--").split("=", 1) for argument in container["args"][1:])
    for option, source in (
        ("tls-cert-file", "secret"),
        ("tls-key-file", "secret"),
        ("values", "configMap"),
        ("mesh-config", "configMap"),
    ):
        directory, _, key = options[option].rpartition("/")
        assert source in mounts[directory], option
        if source == "configMap":
            configmap = found["ConfigMap"]
            assert mounts[directory]["configMap"]["name"] == configmap["metadata"]["name"]
            assert key in configmap["data"], option
        else:
            assert key in ("tls.crt", "tls.key")  # the keys of a kubernetes.io/tls Secret
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]} and security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True and security["readOnlyRootFilesystem"] is True
    # Without capabilities in the bounding set the kernel refuses to execute a file that carries them: the
    # command must name an interpreter the Dockerfile gives none.
    interpreter = container["command"][0]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "venv --copies" in dockerfile and interpreter.startswith("/opt/istio-iptables/bin/")
    assert f"setcap cap_net_admin,cap_net_raw+ep {interpreter} " not in dockerfile
    assert f"setcap cap_net_admin,cap_net_raw+ep {interpreter}\n" not in dockerfile
    assert "EXTRAS" in dockerfile  # the image with the webhook extra: --build-arg EXTRAS=webhook


def test_the_configmap_s_settings_are_what_the_webhook_serves_with(tmp_path: Path) -> None:
    """The ConfigMap's keys written as the kubelet mounts them, the webhook started on them."""
    data = manifests()["ConfigMap"]["data"]
    for key, text in data.items():
        (tmp_path / key).write_text(text)
    assert set(data) == {"config", "values", "mesh"}
    assert yaml.safe_load(data["config"]) == yaml.safe_load(yaml.safe_load(shipped_text("relay"))["data"]["config"]), (
        "deploy/webhook.yaml's template is the shipped relay's"
    )
    extra = ["--values", str(tmp_path / "values"), "--mesh-config", str(tmp_path / "mesh")]
    extra += ["--injector-config", str(tmp_path / "config")]
    server_dir = tmp_path / "tls"
    server_dir.mkdir()
    with running(server_dir, extra) as server:
        pod = {"metadata": {"name": "a"}, "spec": {"containers": [{"name": "a"}]}}
        result = patched(pod, server.review(review(pod)))
    values = json.loads(data["values"])
    chosen = Injector(
        settings=load_settings(values=values, mesh_config=yaml.safe_load(data["mesh"])),
        config=read_injector_config("relay")[0],
    )
    assert result == inject_pod(pod, chosen, workload="pod apps/a", namespace="apps")


def test_the_docs_certificate_commands_make_what_the_api_server_accepts(tmp_path: Path) -> None:
    """docs/webhook.md's openssl commands, run as written: the webhook serves the result, and a client that trusts
    only ca.crt verifies it for the Service's DNS name (what the API server checks)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    document = (ROOT / "docs" / "webhook.md").read_text()
    block = document.split("<!-- webhook-certificate -->", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    script = "\n".join(line.strip() for line in block.splitlines())
    done = subprocess.run(["sh", "-ec", script], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    (tmp_path / "ca.crt").rename(tmp_path / "docs-ca.crt")
    with running(tmp_path, tls=(tmp_path / "tls.crt", tmp_path / "tls.key")) as server:
        server.ca_file = tmp_path / "docs-ca.crt"
        connection = server.connection(host="istio-iptables-webhook.istio-iptables.svc")
        connection.request("GET", "/ready")
        assert connection.getresponse().status == 200
        connection.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            server.connection(host="istio-iptables-webhook.default.svc").connect()
