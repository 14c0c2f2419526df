"""The repair's fallback: which pods it deletes through the API server (a fake one, over real HTTPS on
127.0.0.1) when a pod cannot be captured in place, and which it never deletes. The runtime side is a stand-in
holding sandboxes whose network namespace is gone; the real runtime's side is in tests/lab/test_repair.py."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from istio_iptables.cni import cri, kubeapi
from istio_iptables.cni.plugin import PluginConfig
from istio_iptables.cni.repair import Repairer, RepairOptions, Verdict, deletion_refusal
from tests.fake_kube_api import kubeconfig, make_certificate, pod, serve

TOKEN = "repair-token"
CNI_STATUS = '{"initContainers":["istio-validation"],"containers":["istio-proxy"]}'
INJECTED = {"sidecar.istio.io/status": CNI_STATUS}
REPLICA_SET = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "shop-5d9", "uid": "rs-1", "controller": True}
JOB = {"apiVersion": "batch/v1", "kind": "Job", "name": "nightly", "uid": "job-1", "controller": True}


class NetnsGoneRuntime:
    """The CRI as the repair reads it, for sandboxes whose pause process and namespace are gone."""

    def __init__(self, sandboxes: list[cri.Sandbox]) -> None:
        self.sandboxes = sandboxes

    def list_sandboxes(self, state: cri.SandboxState | None = None) -> list[cri.Sandbox]:
        return [sandbox for sandbox in self.sandboxes if state in (None, sandbox.state)]

    def sandbox_status(self, sandbox_id: str) -> cri.SandboxStatus:
        sandbox = next(sandbox for sandbox in self.sandboxes if sandbox.id == sandbox_id)
        return cri.SandboxStatus(sandbox=sandbox, ips=(), pid=0, netns_path="/nonexistent/netns/cni-gone")


def sandbox(name: str, uid: str, annotations: dict[str, str] | None = None, namespace: str = "shop") -> cri.Sandbox:
    return cri.Sandbox(
        id=f"sandbox-{name}",
        name=name,
        namespace=namespace,
        uid=uid,
        state=cri.SandboxState.READY,
        labels={},
        annotations=INJECTED if annotations is None else annotations,
    )


def api_pod(name: str, uid: str, owners: list[dict[str, Any]], restart_policy: str = "Always") -> dict[str, Any]:
    document = pod("shop", name, INJECTED)
    document["metadata"].update(uid=uid, ownerReferences=owners)
    document["spec"]["restartPolicy"] = restart_policy
    return document


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def api(certificate: tuple[Path, Path], tmp_path: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """The API server's pods (a dict the server deletes from) and a kubeconfig for it."""
    pods: dict[str, Any] = {}
    with serve(pods, TOKEN, *certificate) as url:
        path = tmp_path / "kubeconfig"
        path.write_text(kubeconfig(url, certificate[0], token=TOKEN))
        yield pods, str(path)


def run_cycle(sandboxes: list[cri.Sandbox], options: RepairOptions) -> tuple[Repairer, dict[Verdict, int]]:
    repairer = Repairer(NetnsGoneRuntime(sandboxes), options)  # type: ignore[arg-type]
    return repairer, dict(repairer.cycle())


CASES = [
    # (owners, restartPolicy, flags, deleted)
    ([REPLICA_SET], "Always", {}, True),
    ([], "Always", {}, False),
    ([], "Always", {"delete_bare_pods": True}, True),
    ([JOB], "Never", {}, False),
    ([JOB], "Never", {"delete_job_pods": True}, True),
    ([JOB], "OnFailure", {}, True),
    ([REPLICA_SET], "Never", {}, True),
    ([JOB], "Never", {"delete_bare_pods": True}, False),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=[
        "replicaset",
        "bare",
        "bare-allowed",
        "job-never",
        "job-never-allowed",
        "job-onfailure",
        "rs-never",
        "job-bare-flag",
    ],
)
def test_a_pod_that_cannot_be_captured_in_place_is_deleted_only_when_its_controller_recreates_it(
    api: tuple[dict[str, Any], str], case: tuple[list[dict[str, Any]], str, dict[str, bool], bool]
) -> None:
    pods, path = api
    owners, restart_policy, flags, deleted = case
    pods["shop/cart-1"] = api_pod("cart-1", "uid-1", owners, restart_policy)
    options = RepairOptions(plugin=PluginConfig(), kubeconfig=path, **flags)
    repairer, counts = run_cycle([sandbox("cart-1", "uid-1")], options)
    assert counts == {Verdict.DELETED if deleted else Verdict.KEPT: 1}
    assert ("shop/cart-1" not in pods) is deleted
    assert repairer.judged == {"sandbox-cart-1"}  # final either way: not looked into again


def test_without_credentials_the_pod_is_only_reported(caplog: pytest.LogCaptureFixture) -> None:
    _, counts = run_cycle([sandbox("cart-1", "uid-1")], RepairOptions(plugin=PluginConfig()))
    assert counts == {Verdict.KEPT: 1}
    assert "pod shop/cart-1: cannot be captured in place (its network namespace is gone)" in caplog.text


def test_a_newer_pod_of_the_same_name_is_never_deleted(api: tuple[dict[str, Any], str]) -> None:
    pods, path = api
    pods["shop/db-0"] = api_pod("db-0", "uid-new", [{**REPLICA_SET, "kind": "StatefulSet"}])
    _, counts = run_cycle([sandbox("db-0", "uid-old")], RepairOptions(plugin=PluginConfig(), kubeconfig=path))
    assert counts == {Verdict.KEPT: 1}
    assert "shop/db-0" in pods


def test_the_deletion_names_the_pods_uid(api: tuple[dict[str, Any], str]) -> None:
    """A pod recreated under the same name between the look and the deletion is not the one deleted."""
    pods, path = api
    pods["shop/db-0"] = api_pod("db-0", "uid-new", [REPLICA_SET])
    assert kubeapi.delete_pod(path, "shop", "db-0", "uid-old") is False
    assert "shop/db-0" in pods
    assert kubeapi.delete_pod(path, "shop", "db-0", "uid-new") is True
    assert kubeapi.delete_pod(path, "shop", "db-0", "uid-new") is False  # gone already


def test_an_unanswered_api_server_leaves_the_pod_for_the_next_cycle(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    cluster = {"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}  # nothing listens on port 1
    path.write_text(json.dumps({"clusters": [cluster], "users": [{"name": "u", "user": {}}]}))
    options = RepairOptions(plugin=PluginConfig(), kubeconfig=str(path))
    repairer = Repairer(NetnsGoneRuntime([sandbox("cart-1", "uid-1")]), options)  # type: ignore[arg-type]
    assert dict(repairer.cycle()) == {}
    assert repairer.judged == set()


def test_pods_that_are_not_ours_are_never_looked_into(api: tuple[dict[str, Any], str]) -> None:
    pods, path = api
    others = [
        sandbox("plain", "uid-2", annotations={}),
        sandbox("sidecar", "uid-3", annotations={"sidecar.istio.io/status": '{"initContainers":["istio-init"]}'}),
        sandbox("system", "uid-4", namespace="kube-system"),
        sandbox("off", "uid-5", annotations={**INJECTED, "sidecar.istio.io/inject": "false"}),
    ]
    for item in others:
        pods[f"{item.namespace}/{item.name}"] = api_pod(item.name, item.uid, [REPLICA_SET])
    before = copy.deepcopy(pods)
    repairer, counts = run_cycle(others, RepairOptions(plugin=PluginConfig(), kubeconfig=path))
    assert counts == {}
    assert pods == before
    assert repairer.judged == {item.id for item in others}


def test_work_per_cycle_is_bounded(api: tuple[dict[str, Any], str]) -> None:
    pods, path = api
    sandboxes = [sandbox(f"cart-{index}", f"uid-{index}") for index in range(5)]
    for item in sandboxes:
        pods[f"shop/{item.name}"] = api_pod(item.name, item.uid, [REPLICA_SET])
    options = RepairOptions(plugin=PluginConfig(), kubeconfig=path, max_per_cycle=2)
    repairer = Repairer(NetnsGoneRuntime(sandboxes), options)  # type: ignore[arg-type]
    assert [dict(repairer.cycle()) for _ in range(4)] == [
        {Verdict.DELETED: 2},
        {Verdict.DELETED: 2},
        {Verdict.DELETED: 1},
        {},
    ]
    assert repairer.totals == {Verdict.DELETED: 5}
    assert pods == {}


OWNER_KINDS = st.sampled_from(["ReplicaSet", "StatefulSet", "DaemonSet", "Job", "CronJob", "Node"])


@given(
    kinds=st.lists(OWNER_KINDS, max_size=3),
    restart_policy=st.sampled_from(["Always", "OnFailure", "Never"]),
    bare=st.booleans(),
    jobs=st.booleans(),
)
def test_the_deletion_rule(kinds: list[str], restart_policy: str, bare: bool, jobs: bool) -> None:
    owners = tuple(kubeapi.Owner(kind, "x", True) for kind in kinds)
    found = kubeapi.Pod({}, {}, (), None, "uid", owners, restart_policy)
    options = RepairOptions(plugin=PluginConfig(), delete_bare_pods=bare, delete_job_pods=jobs)
    refused = deletion_refusal(found, options) is not None
    unowned = not kinds
    job_never = "Job" in kinds and restart_policy == "Never"
    assert refused == ((unowned and not bare) or (job_never and not jobs))


class BusyRuntime(NetnsGoneRuntime):
    """A runtime that lists a sandbox but does not give its status (removed meanwhile, or timing out)."""

    def sandbox_status(self, sandbox_id: str) -> cri.SandboxStatus:
        raise cri.CriError("PodSandboxStatus", "DEADLINE_EXCEEDED", "Deadline Exceeded")


def test_a_runtime_that_does_not_answer_is_no_reason_to_delete_a_pod(
    api: tuple[dict[str, Any], str], caplog: pytest.LogCaptureFixture
) -> None:
    pods, path = api
    pods["shop/cart-1"] = api_pod("cart-1", "uid-1", [REPLICA_SET])
    options = RepairOptions(plugin=PluginConfig(), kubeconfig=path)
    repairer = Repairer(BusyRuntime([sandbox("cart-1", "uid-1")]), options)  # type: ignore[arg-type]
    assert dict(repairer.cycle()) == {}
    assert "shop/cart-1" in pods
    assert repairer.judged == set()  # looked into again next cycle
    assert "pod shop/cart-1: the runtime did not give its status: PodSandboxStatus: DEADLINE_EXCEEDED" in caplog.text
