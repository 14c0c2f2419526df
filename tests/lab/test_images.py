"""The images built from the Dockerfiles (unchanged, by buildah, as a build step runs: no NET_ADMIN) and what the
init image gives a container in the init container's security context, on the real runtime.

Before the fixes of issue 17 the Dockerfile did not build: a RUN step ran the venv's interpreter after setcap
had given it capabilities that a build step cannot grant (EPERM), and ``apt-get purge --auto-remove
libcap2-bin`` took iproute2 with it, so the capability check of /usr/bin/ip failed. The ``images`` fixture
builds both Dockerfiles; the checks below replace scripts/check-image-install's, which imitated the build
and the pod with setpriv and noticed neither."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.lab import images
from tests.lab import node as lab_node
from tests.lab.conftest import LabImages
from tests.lab.kubelet import Pod
from tests.lab.workloads import idle_command, with_programs

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
INIT_POD = ROOT / "deploy" / "istio-init-pod.yaml"
CAPABLE = ("/usr/sbin/xtables-legacy-multi", "/usr/sbin/xtables-nft-multi", "/usr/sbin/nft", "/usr/bin/ip")
VENV_PYTHON = "/opt/istio-iptables/bin/python"
LOCK = "/run/istio-iptables/xtables.lock"
CAPEFF = 'print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")))'


@pytest.fixture
def init_like(images: LabImages, run_pod: Callable[..., Pod]) -> Iterator[tuple[Pod, list[str]]]:
    """deploy/istio-init-pod.yaml's init container kept running (its security context, its lock volume) as
    the pod's only container, and the init container's args."""
    document: dict[str, Any] = yaml.safe_load(INIT_POD.read_text())
    spec = document["spec"]
    (init,) = spec.pop("initContainers")
    args: list[str] = init["args"]
    spec["containers"] = [{**init, "name": "init-like"}]
    yield run_pod(with_programs(document, images.init, {"init-like": idle_command()})), args


def run(pod: Pod, *argv: str) -> str:
    result = pod.exec("init-like", list(argv))
    assert result.exit_code == 0, f"{argv} exited {result.exit_code}: {result.stdout}{result.stderr}"
    return result.stdout


def test_both_images_build_and_load(lab: lab_node.Node, images: LabImages) -> None:
    assert lab.runtime.image_present(images.init)
    assert lab.runtime.image_present(images.cni)
    assert lab.runtime.image_user(images.init) == (65532, "")  # numeric: the kubelet can check runAsNonRoot


def test_the_programs_keep_their_file_capabilities_and_only_the_entrypoints_interpreter_has_them(
    init_like: tuple[Pod, list[str]],
) -> None:
    pod, _ = init_like
    # /usr/bin/ip is there (iproute2 was not purged with libcap2-bin) and every capable file has its xattr.
    run(pod, "python3.11", "-c", "import os, sys; [os.getxattr(p, 'security.capability') for p in sys.argv[1:]]",
        *CAPABLE, VENV_PYTHON)  # fmt: skip
    # As 65532 with NET_ADMIN and NET_RAW only in the bounding set: the capable interpreter gets both.
    assert run(pod, VENV_PYTHON, "-c", CAPEFF).strip() == "0000000000003000"
    assert run(pod, f"{VENV_PYTHON}3.11", "-c", CAPEFF).strip() == "0000000000000000"
    assert run(pod, "python3.11", "-c", CAPEFF).strip() == "0000000000000000"


@pytest.mark.parametrize("family", ["iptables", "ip6tables"])
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_the_image_user_runs_iptables(init_like: tuple[Pod, list[str]], family: str, backend: str) -> None:
    pod, _ = init_like
    if pod.in_netns(f"{family}-{backend}", "-t", "nat", "-S", check=False).returncode != 0:
        pytest.skip(f"this kernel lacks {family}-{backend} (root cannot use it either)")
    wait = ["--wait=30"] if backend == "legacy" else []
    run(pod, f"{family}-{backend}", *wait, "-t", "nat", "-N", "ISTIO_IMAGE_CHECK")
    payload = "*nat\n-N ISTIO_RESTORE_CHECK\n-A OUTPUT -j ISTIO_RESTORE_CHECK\nCOMMIT\n"
    run(pod, "sh", "-c", f'printf "{payload}" | {family}-{backend}-restore --noflush {" ".join(wait)}'.strip())
    saved = pod.in_netns(f"{family}-{backend}-save", "-t", "nat").stdout
    assert ":ISTIO_IMAGE_CHECK" in saved and "-A OUTPUT -j ISTIO_RESTORE_CHECK" in saved
    if backend == "legacy":
        # Legacy iptables locks XTABLES_LOCKFILE, on the pod's emptyDir (the root filesystem is read-only).
        assert run(pod, "stat", "-c", "%u", LOCK).strip() == "65532"


def test_the_entrypoint_applies_the_injectors_args_again_without_change_and_tproxy_routes(
    init_like: tuple[Pod, list[str]],
) -> None:
    pod, args = init_like
    run(pod, "/usr/local/bin/istio-iptables", *args)
    first = _rules(pod)
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in first
    run(pod, "/usr/local/bin/istio-iptables", *args)
    assert _rules(pod) == first
    tproxy = [("TPROXY" if arg == "REDIRECT" else arg) for arg in args]
    run(pod, "/usr/local/bin/istio-iptables", *tproxy)
    assert "fwmark 0x539 lookup 133" in pod.in_netns("ip", "rule").stdout
    assert pod.in_netns("ip", "route", "show", "table", "133").stdout.startswith("local default dev lo")


def _rules(pod: Pod) -> str:
    """The nat tables of both back ends, without counters."""
    saved = []
    for save in ("iptables-legacy-save", "iptables-nft-save"):
        text = pod.in_netns(save, "-t", "nat", check=False).stdout
        saved += [re.sub(r" \[\d+:\d+\]$", "", line) for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(saved)


def test_a_build_leaves_the_machines_cni_config_alone(tmp_path: Path) -> None:
    """buildah makes /etc/cni/net.d (and a lock file in it) on any build unless told where its CNI config is."""
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (scripts/test installs it)")
    before = sorted(Path("/etc/cni").rglob("*")) if Path("/etc/cni").exists() else None
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY x /x\n")
    (tmp_path / "x").write_text("x\n")
    with images._shadowed_var_lib() as (work, wrap):
        subprocess.run(
            [*wrap, "buildah", "--root", str(work / "root"), "--runroot", str(work / "runroot"),
             "--storage-driver", "vfs", "bud", "--pull=never", "--network", "host", "--isolation", "oci",
             "-t", "lab-cni-probe", str(tmp_path)],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    after = sorted(Path("/etc/cni").rglob("*")) if Path("/etc/cni").exists() else None
    assert after == before
