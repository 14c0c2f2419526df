"""The plugin's Kubernetes API client against a fake API server over real HTTPS on 127.0.0.1."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_iptables.cni.kubeapi import KubeError, get_pod, read_kubeconfig
from tests.fake_kube_api import kubeconfig, make_certificate, pod, serve

TOKEN = "s3cret-token"
ANNOTATIONS = {"sidecar.istio.io/status": "{}", "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/8"}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(certificate: tuple[Path, Path]) -> Iterator[str]:
    pods = {"shop/cart-1": pod("shop", "cart-1", ANNOTATIONS, proxy_uid=1500)}
    with serve(pods, TOKEN, *certificate) as url:
        yield url


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(text)
    return str(path)


def test_the_pod_comes_with_its_annotations_containers_and_proxy_uid(
    server: str, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    found = get_pod(write(tmp_path, kubeconfig(server, certificate[0], token=TOKEN)), "shop", "cart-1")
    assert found.annotations == ANNOTATIONS
    assert found.containers == ("app", "istio-proxy")
    assert found.proxy_uid == 1500


def test_a_token_file_relative_to_the_kubeconfig(server: str, certificate: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    found = get_pod(write(tmp_path, kubeconfig(server, certificate[0], tokenFile="token")), "shop", "cart-1")
    assert found.proxy_uid == 1500


@pytest.mark.parametrize(
    "case",
    [("wrong", "shop", "HTTP 401"), (TOKEN, "other", "HTTP 404")],
    ids=["bad-token", "no-such-pod"],
)
def test_refusals_are_named_after_the_deadline(
    server: str, certificate: tuple[Path, Path], tmp_path: Path, case: tuple[str, str, str]
) -> None:
    token, namespace, expected = case
    path = write(tmp_path, kubeconfig(server, certificate[0], token=token))
    with pytest.raises(KubeError, match=expected) as error:
        get_pod(path, namespace, "cart-1", deadline=1.0)
    assert f"pod {namespace}/cart-1" in str(error.value)


def test_a_server_with_another_ca_is_refused(server: str, tmp_path: Path) -> None:
    other_ca, _ = make_certificate(tmp_path, "other")
    with pytest.raises(KubeError, match="CERTIFICATE_VERIFY_FAILED"):
        get_pod(write(tmp_path, kubeconfig(server, other_ca, token=TOKEN)), "shop", "cart-1", deadline=0.5)


def test_nothing_listening_fails_within_the_deadline(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    path = write(tmp_path, kubeconfig("https://127.0.0.1:9", certificate[0], token=TOKEN))
    with pytest.raises(KubeError, match=r"cannot get pod shop/cart-1 from https://127\.0\.0\.1:9"):
        get_pod(path, "shop", "cart-1", deadline=0.5)


def test_kubeconfig_json_without_context_takes_the_only_cluster_and_user(tmp_path: Path) -> None:
    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n").decode()
    text = (
        '{"clusters": [{"name": "c", "cluster": {"server": "https://198.18.0.1:6443", '
        f'"certificate-authority-data": "{ca}"}}}}], "users": [{{"name": "u", "user": {{"token": "t"}}}}]}}'
    )
    credentials = read_kubeconfig(write(tmp_path, text))
    assert (credentials.server, credentials.token) == ("https://198.18.0.1:6443", "t")
    assert credentials.ca_pem == "-----BEGIN CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "neither JSON nor YAML"),
        ("[]", "is not a map"),
        ('{"clusters": [{"name": "c", "cluster": {"server": "http://x"}}]}', "must be an https:// URL"),
        ('{"current-context": "gone"}', "no context named 'gone'"),
    ],
)
def test_unusable_kubeconfigs_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(KubeError, match=message):
        read_kubeconfig(write(tmp_path, text))


def test_a_missing_kubeconfig_is_named(tmp_path: Path) -> None:
    with pytest.raises(KubeError, match=f"cannot read kubeconfig {tmp_path}/absent"):
        read_kubeconfig(str(tmp_path / "absent"))
