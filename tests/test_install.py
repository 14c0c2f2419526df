"""README's install line, run for real: a new venv, ``pip install .`` of this checkout (its files copied, so
the build leaves nothing in the checkout), then every command a newcomer meets either works or names the extra
it needs in one line, with exit code 2.

One venv for the module; pip's cache is used as it is (the build requirements and the dependencies come from
it after the first run). Marked ``install``: ``-m 'not install'`` leaves it out of a quick local run, and
scripts/test (CI) runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.namespaces import Pod, iptables_save, needs_root

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "istio_iptables")
"""What a build reads (the images copy the same)."""
INIT = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]
INIT += ["-d", "15090,15021,15020"]
APP = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
spec:
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
    spec:
      containers:
      - name: app
        image: registry.example.com/app:1.0
"""


class Install:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.source = work / "source"
        self.bin = work / "venv" / "bin"

    def run(
        self, command: list[str], stdin: str = "", env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / command[0]), *command[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, **(env or {})},
            cwd=cwd or self.work,
            check=False,
        )


@pytest.fixture(scope="module")
def installed() -> Iterator[Install]:
    """README's line: ``python3 -m venv .venv && .venv/bin/pip install .``, in a directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="istio-iptables-install-") as directory:
        install = Install(Path(directory))
        install.source.mkdir()
        for name in SOURCES:
            if (ROOT / name).is_dir():
                ignored = shutil.ignore_patterns("__pycache__")
                shutil.copytree(ROOT / name, install.source / name, ignore=ignored)
            else:
                shutil.copy(ROOT / name, install.source / name)
        subprocess.run([_python3(), "-m", "venv", str(install.work / "venv")], check=True, timeout=300)
        done = install.run(["pip", "install", "-q", str(install.source)])
        assert done.returncode == 0, done.stdout + done.stderr
        yield install


def _python3() -> str:
    """The interpreter README's line names, else the one running the tests (a venv's: its base is used)."""
    return shutil.which("python3") or sys.executable


def test_the_build_warns_of_nothing(installed: Install, tmp_path: Path) -> None:
    """setuptools' deprecation warnings (a license given as a table stops building in 2027) come with the
    backend's output, which pip shows with -v."""
    done = installed.run(["pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(installed.source)])
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "Deprecat" not in output, [line for line in output.splitlines() if "Deprecat" in line or "license" in line]
    assert len(list(tmp_path.glob("istio_iptables-*.whl"))) == 1


def test_inject_works(installed: Install) -> None:
    """With a shipped injector configuration: its template and the schema it is checked against are package
    data, which only an install shows missing."""
    (installed.work / "app.yaml").write_text(APP)
    done = installed.run(["istio-iptables", "inject", "--injector-config", "relay", "-f", "app.yaml"])
    assert done.returncode == 0, done.stderr
    assert "name: istio-init" in done.stdout and "name: istio-proxy" in done.stdout


def test_webhook_help_works(installed: Install) -> None:
    done = installed.run(["istio-iptables", "webhook", "--help"])
    assert done.returncode == 0, done.stderr
    assert "--tls-cert-file" in done.stdout


def test_the_webhook_names_its_extra(installed: Install) -> None:
    done = installed.run(["istio-iptables", "webhook", "--tls-cert-file", "tls.crt", "--tls-key-file", "tls.key"])
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "istio-iptables: webhook needs the webhook extra: pip install 'istio-iptables[webhook]'\n"


def test_the_plugin_answers_version(installed: Install) -> None:
    done = installed.run(["istio-iptables-cni"], stdin='{"cniVersion":"1.0.0"}', env={"CNI_COMMAND": "VERSION"})
    assert done.returncode == 0, done.stderr
    assert "1.0.0" in json.loads(done.stdout)["supportedVersions"]


def test_the_plugin_reads_a_pods_proxy_config(installed: Install) -> None:
    """The annotation is YAML: an injected pod whose ProxyConfig says interceptionMode NONE is left alone (the
    plugin decides that before it looks at the pod's namespace, which this test does not make)."""
    annotations = {
        "sidecar.istio.io/status": json.dumps({"initContainers": ["istio-validation"]}),
        "proxy.istio.io/config": "interceptionMode: NONE\n",
    }
    previous = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": []}
    config = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "istio-iptables-cni",
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
        "prevResult": previous,
    }
    environment = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/istio-iptables-test-not-made",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=app",
        "CNI_PATH": "/nonexistent",
    }
    done = installed.run(["istio-iptables-cni"], stdin=json.dumps(config), env=environment)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == previous


def test_build_cni_plugin_names_what_it_needs(installed: Install) -> None:
    """Run from a copy (the script works in its own checkout and first clears its build directories)."""
    scripts = installed.work / "build-checkout" / "scripts"
    scripts.mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "build-cni-plugin", scripts)
    done = subprocess.run(
        [str(scripts / "build-cni-plugin")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": str(installed.bin / "python")},
        check=False,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"scripts/build-cni-plugin: {installed.bin / 'python'} cannot import PyInstaller: install the dev extra "
        "(pip install -e '.[dev]') or set PYTHON\n"
    )


@pytest.mark.kernel
@needs_root
def test_the_libiptc_backend_names_its_extra(installed: Install) -> None:
    with Pod.create() as pod:
        done = installed.run(["istio-iptables", "--network-namespace", pod.name, "--backend", "libiptc", *INIT])
        assert (done.returncode, done.stdout) == (2, "")
        # Before it, the log's line on the pod's IPv6 address, written as the plan was made.
        assert done.stderr.splitlines()[-1] == (
            "istio-iptables: --backend libiptc needs the libiptc extra: pip install 'istio-iptables[libiptc]'"
        )
        assert "ISTIO" not in iptables_save(pod, "legacy", 4) + iptables_save(pod, "nft", 4)
