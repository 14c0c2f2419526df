"""The lab's kubelet: the pure mapping of a pod spec (unit tests), and on the runtime the order of init
containers, a native sidecar left running, env from fieldRefs, and the security context as a container sees
it (its user, its capability sets, no_new_privs, the read-only root, the masked paths)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from istio_iptables.cni import cri
from tests.lab.conftest import LabImages
from tests.lab.kubelet import (
    DEFAULT_MASKED_PATHS,
    Pod,
    PodError,
    check_run_as_non_root,
    downward_file,
    expand,
    pod_document,
    resource_value,
    security_context,
)

# --- the mapping, pure ---------------------------------------------------------------------------------


def test_the_pods_security_context_is_merged_under_the_containers() -> None:
    context = security_context(
        {"runAsUser": 1000, "capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}, "allowPrivilegeEscalation": False},
        {"runAsUser": 2000, "runAsGroup": 3000, "seccompProfile": {"type": "RuntimeDefault"}},
    )
    assert (context.run_as_user, context.run_as_group) == (1000, 3000)
    assert context.no_new_privs and context.seccomp_runtime_default
    assert (context.add_capabilities, context.drop_capabilities) == (("NET_ADMIN",), ("ALL",))
    assert context.masked_paths == DEFAULT_MASKED_PATHS


def test_only_an_explicit_false_sets_no_new_privs_and_privileged_unmasks() -> None:
    assert not security_context({}, {}).no_new_privs
    assert not security_context({"allowPrivilegeEscalation": True}, {}).no_new_privs
    privileged = security_context({"privileged": True}, {})
    assert privileged.privileged and privileged.masked_paths == () and privileged.readonly_paths == ()
    with pytest.raises(PodError, match="Localhost"):
        security_context({"seccompProfile": {"type": "Localhost"}}, {})


def test_run_as_non_root_is_checked_against_the_image_user_as_the_kubelet_does() -> None:
    check_run_as_non_root("a", {"runAsNonRoot": True, "runAsUser": 1}, {}, (None, ""))
    check_run_as_non_root("a", {}, {"runAsNonRoot": True}, (65532, ""))
    with pytest.raises(PodError, match="runAsUser breaks non-root policy"):
        check_run_as_non_root("a", {"runAsNonRoot": True, "runAsUser": 0}, {}, (65532, ""))
    with pytest.raises(PodError, match="image will run as root"):
        check_run_as_non_root("a", {"runAsNonRoot": True}, {}, (None, ""))
    with pytest.raises(PodError, match="non-numeric user"):
        check_run_as_non_root("a", {"runAsNonRoot": True}, {}, (None, "nobody"))


def test_variable_references_expand_as_the_kubelets_do() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)-$(C)-$$(A)", env) == "1-two-$(C)-$(A)"


def test_resource_refs_are_the_containers_amount_over_the_divisor_rounded_up() -> None:
    container = {"resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}, "requests": {"cpu": "100m"}}}
    assert resource_value("X", {"resource": "limits.cpu", "divisor": "1"}, container) == "2"
    assert resource_value("X", {"resource": "requests.cpu", "divisor": "1m"}, container) == "100"
    assert resource_value("X", {"resource": "limits.memory"}, container) == str(1024**3)
    assert resource_value("X", {"resource": "limits.memory", "divisor": "1Mi"}, container) == "1024"
    with pytest.raises(PodError, match=r"env X: resourceFieldRef requests\.memory: the container sets none"):
        resource_value("X", {"resource": "requests.memory"}, container)


def test_downward_api_files_are_the_kubelets() -> None:
    metadata = {"name": "shop", "labels": {"b": "2", "a": 'say "hi"'}}
    assert downward_file("v", "metadata.labels", metadata, "u1") == 'a="say \\"hi\\""\nb="2"'
    assert downward_file("v", "metadata.annotations", metadata, "u1") == ""
    assert downward_file("v", "metadata.name", metadata, "u1") == "shop"
    assert downward_file("v", "metadata.uid", metadata, "u1") == "u1"
    with pytest.raises(PodError, match=r"volume v: downwardAPI fieldRef spec\.nodeName"):
        downward_file("v", "spec.nodeName", metadata, "u1")


def test_a_workloads_pod_template_becomes_the_pod() -> None:
    deployment = {
        "kind": "Deployment",
        "metadata": {"name": "shop", "namespace": "store"},
        "spec": {"template": {"metadata": {"labels": {"app": "shop"}}, "spec": {"containers": []}}},
    }
    pod = pod_document(deployment)
    assert pod["kind"] == "Pod"
    assert pod["metadata"] == {"labels": {"app": "shop"}, "generateName": "shop-", "namespace": "store"}


# --- on the runtime ------------------------------------------------------------------------------------

STATUS = (
    "import os, sys\n"
    "fields = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
    "print(os.getuid(), os.getgid(), *(fields[key].strip() for key in ('CapBnd', 'CapEff', 'NoNewPrivs')))\n"
    "print(os.environ['POD_NAME'], os.environ['POD_NAMESPACE'], os.environ['POD_IP'], os.environ['LABEL'])\n"
    "print(open(sys.argv[1], 'rb').read(1) == b'')\n"
    "try:\n"
    "    open('/written', 'w')\n"
    "except OSError as error:\n"
    "    print(error.strerror)\n"
)


def pod_spec(containers: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "order", "namespace": "lab", "labels": {"app": "order"}},
        "spec": {
            "volumes": [{"name": "shared", "emptyDir": {}}],
            **containers,
        },
    }


def step(name: str, image: str, program: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": image,
        "command": ["python3.11", "-c", program],
        "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
        **extra,
    }


@pytest.mark.kernel
def test_init_containers_run_in_order_and_a_native_sidecar_keeps_running(
    images: LabImages, run_pod: Callable[..., Pod]
) -> None:
    append = "import sys; open('/shared/order', 'a').write(sys.argv[1] + '\\n')"
    idle = "import sys, time; open('/shared/order', 'a').write(sys.argv[1] + '\\n'); time.sleep(3600)"
    spec = pod_spec(
        {
            "initContainers": [
                {**step("first", images.init, append), "args": ["first"]},
                {**step("sidecar", images.init, idle), "args": ["sidecar"], "restartPolicy": "Always"},
                {**step("second", images.init, append), "args": ["second"]},
            ],
            "containers": [{**step("app", images.init, idle), "args": ["app"]}],
        },
    )
    pod = run_pod(spec)
    assert (pod.exit_code("first"), pod.exit_code("second")) == (0, 0)
    assert pod.container("sidecar").state == cri.ContainerState.RUNNING
    assert pod.container("app").state == cri.ContainerState.RUNNING
    order = pod.exec("app", ["cat", "/shared/order"]).stdout.split()
    assert order == ["first", "sidecar", "second", "app"]


@pytest.mark.kernel
def test_a_failing_init_container_stops_the_pod_with_its_exit_code(
    images: LabImages, run_pod: Callable[..., Pod]
) -> None:
    spec = pod_spec(
        {
            "initContainers": [step("fails", images.init, "import sys; print('no'); sys.exit(3)")],
            "containers": [step("app", images.init, "pass")],
        },
    )
    pod = run_pod(spec, check=False)
    assert (pod.failed_init, pod.exit_code("fails"), pod.logs("fails")) == ("fails", 3, "no\n")
    assert "app" not in pod.containers
    with pytest.raises(PodError, match=r"init container fails of pod .* exited 3"):
        run_pod(spec)


@pytest.mark.kernel
def test_the_container_sees_its_security_context_and_env(images: LabImages, run_pod: Callable[..., Pod]) -> None:
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
    ]
    context = {
        "runAsUser": 1337,
        "runAsGroup": 1338,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["NET_RAW"]},
    }
    # A masked path this kernel has (/dev/null is bound over it); on the machine itself it is not empty.
    masked = next(p for p in DEFAULT_MASKED_PATHS if os.path.isfile(p) and Path(p).read_bytes()[:1])
    probe = step("probe", images.init, STATUS, args=[masked], env=env, securityContext=context)
    spec = pod_spec({"containers": [probe]})
    pod = run_pod(spec)
    pod.wait("probe")
    assert pod.exit_code("probe") == 0, pod.logs("probe")
    ids, names, masked_empty, write = pod.logs("probe").splitlines()
    # Non-root: NET_RAW only in the bounding set, none effective; allowPrivilegeEscalation false.
    assert ids == "1337 1338 0000000000002000 0000000000000000 1"
    assert names == f"order lab {pod.ip} order"
    assert masked_empty == "True"
    assert write == "Read-only file system"
