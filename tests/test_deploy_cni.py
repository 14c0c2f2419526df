"""deploy/istio-iptables-cni.yaml: the installer's DaemonSet is valid Kubernetes, and its container's args do
what the DaemonSet promises when run on directories laid out as its mounts lay them out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from istio_iptables.cni import install

from .helpers import ROOT

MANIFEST = ROOT / "deploy" / "istio-iptables-cni.yaml"
CLI = str(Path(sys.executable).with_name("istio-iptables"))


def test_the_service_account_may_only_get_pods() -> None:
    documents = _documents()
    assert documents["ClusterRole"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    [subject] = documents["ClusterRoleBinding"]["subjects"]
    spec = documents["DaemonSet"]["spec"]["template"]["spec"]
    assert subject["name"] == spec["serviceAccountName"] == documents["ServiceAccount"]["metadata"]["name"]
    assert documents["ClusterRoleBinding"]["roleRef"]["name"] == documents["ClusterRole"]["metadata"]["name"]


def _documents() -> dict[str, dict[str, Any]]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text())}


def _container() -> dict[str, Any]:
    [container] = _documents()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return container


def test_kubernetes_validate_accepts_every_document() -> None:
    pytest.importorskip("kubernetes_validate")
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(MANIFEST)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(_documents())


def test_the_installer_runs_on_every_node_before_pod_networking() -> None:
    spec = _documents()["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["priorityClassName"] == "system-node-critical"


def test_the_installer_needs_no_capability() -> None:
    context = _container()["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["privileged"] is False


def test_the_host_directories_are_mounted_where_the_args_point() -> None:
    documents = _documents()
    spec = documents["DaemonSet"]["spec"]["template"]["spec"]
    host_paths = {volume["name"]: volume["hostPath"]["path"] for volume in spec["volumes"] if "hostPath" in volume}
    mounts = {mount["mountPath"]: host_paths.get(mount["name"]) for mount in _container()["volumeMounts"]}
    arguments = dict(argument.split("=", 1) for argument in _container()["args"] if "=" in argument)
    assert mounts[arguments["--cni-conf-dir"]] == "/etc/cni/net.d"
    assert mounts[arguments["--cni-bin-dir"]] == "/opt/cni/bin"
    config_mount = str(Path(arguments["--plugin-config"]).parent)
    [volume] = [volume for volume in spec["volumes"] if volume["name"] in _mount_names(config_mount)]
    assert volume["configMap"]["name"] == documents["ConfigMap"]["metadata"]["name"]
    assert Path(arguments["--plugin-config"]).name in documents["ConfigMap"]["data"]
    assert "--watch" in _container()["args"]


def _mount_names(path: str) -> set[str]:
    return {mount["name"] for mount in _container()["volumeMounts"] if mount["mountPath"] == path}


def test_the_container_args_install_on_a_node_laid_out_as_the_mounts(tmp_path: Path) -> None:
    """The DaemonSet's own args (without --watch), their /host and ConfigMap paths moved under tmp_path."""
    node = tmp_path / "host"
    (node / "etc/cni/net.d").mkdir(parents=True)
    (node / "opt/cni/bin").mkdir(parents=True)
    (node / "etc/cni/net.d/10-bridge.conf").write_text('{"cniVersion": "1.0.0", "name": "k8s", "type": "bridge"}')
    settings_file = tmp_path / "plugin.json"
    settings_file.write_text(_documents()["ConfigMap"]["data"]["plugin.json"])
    plugin = tmp_path / "istio-iptables-cni"
    plugin.write_bytes(b"plugin")
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token")
    (account / "ca.crt").write_text("ca")
    arguments = [
        argument.replace("=/host/", f"={node}/").replace("=/etc/istio-iptables-cni/plugin.json", f"={settings_file}")
        for argument in _container()["args"]
        if argument != "--watch"
    ]
    environment = {**os.environ, "KUBERNETES_SERVICE_HOST": "198.18.0.1", "KUBERNETES_SERVICE_PORT": "443"}

    result = subprocess.run(
        [CLI, *arguments, "--plugin", str(plugin), "--service-account-dir", str(account)],
        capture_output=True,
        text=True,
        check=False,
        env=environment,
    )

    assert result.returncode == 0, result.stderr
    [*_, entry] = json.loads((node / "etc/cni/net.d/10-bridge.conflist").read_text())["plugins"]
    settings = json.loads(settings_file.read_text())
    assert entry == install.plugin_entry(
        {**settings, "kubernetes": {"kubeconfig": f"/etc/cni/net.d/{install.KUBECONFIG_FILE}"}}
    )
    assert (node / "etc/cni/net.d" / install.KUBECONFIG_FILE).exists()
    assert (node / "opt/cni/bin/istio-iptables-cni").read_bytes() == b"plugin"
