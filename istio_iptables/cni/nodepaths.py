"""Where a node's container runtime reads CNI configurations and plugins: its conf dir and bin dir, found by
reading the runtime's own configuration under the node's root (where the node's file system is mounted here).

kubeadm and kind (containerd), k3s (its own containerd), GKE (containerd, plugins in /home/kubernetes/bin),
CRI-O, and OpenShift (CRI-O with Multus) each lay these out differently; docs/cni.md has the table.

containerd's CRI plugin keeps its CNI settings in ``[plugins.<cri>.cni]`` (``conf_dir``, ``bin_dir``, or
``bin_dirs`` since 2.1), where ``<cri>`` depends on the configuration's ``version``: 1 ``cri``, 2
``"io.containerd.grpc.v1.cri"``, 3 (containerd 2) ``"io.containerd.cri.v1.runtime"``. Unset keys are the
runtime's defaults, /etc/cni/net.d and /opt/cni/bin. When the first configuration file of the conf dir is
Multus's, the pod network that Multus delegates to is the first file of Multus's own default-network dir, and
our entry belongs there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from istio_iptables.errors import HostError
from istio_iptables.records import record

DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIR = "/opt/cni/bin"
K3S_CONTAINERD = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml"
CONTAINERD = "/etc/containerd/config.toml"
CRIO = "/etc/crio/crio.conf"
CRIO_DROP_INS = "/etc/crio/crio.conf.d"
CRI_PLUGIN = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
"""The section of containerd's CRI plugin in each version of containerd's configuration."""
MULTUS_TYPES = ("multus", "multus-shim")
MULTUS_DEFAULT_NETWORK_DIRS = ("/run/multus/cni/net.d", "/var/run/multus/cni/net.d")


@record
class NodePaths:
    """The CNI dirs as the node sees them, and where they were read from (for the log)."""

    conf_dir: str
    bin_dir: str
    source: str


def discover(root: Path) -> NodePaths:
    """The runtime's CNI dirs: k3s's containerd, else containerd's, else CRI-O's configuration, the first
    that the node has; the runtimes' defaults when it has none of them."""
    for path in (K3S_CONTAINERD, CONTAINERD):
        document = _toml(root, path)
        if document is not None:
            return _multus_delegate(root, _containerd_paths(document, path))
    crio = _crio_paths(root)
    if crio is not None:
        return _multus_delegate(root, crio)
    return NodePaths(DEFAULT_CONF_DIR, DEFAULT_BIN_DIR, "the runtimes' defaults (no containerd or CRI-O configuration)")


def under(root: Path, node_path: str) -> Path:
    """A path of the node, as seen here."""
    return root / node_path.lstrip("/")


def _containerd_paths(document: dict[str, Any], path: str) -> NodePaths:
    version = document.get("version", 1)
    plugins = document.get("plugins")
    section = CRI_PLUGIN.get(version, CRI_PLUGIN[3]) if isinstance(version, int) else CRI_PLUGIN[1]
    cri = plugins.get(section) if isinstance(plugins, dict) else None
    cni = cri.get("cni") if isinstance(cri, dict) else None
    cni = cni if isinstance(cni, dict) else {}
    bin_dirs = cni.get("bin_dirs")
    first_bin_dir = bin_dirs[0] if isinstance(bin_dirs, list) and bin_dirs else None
    return NodePaths(
        _text(cni.get("conf_dir"), path, "conf_dir") or DEFAULT_CONF_DIR,
        _text(cni.get("bin_dir") or first_bin_dir, path, "bin_dir") or DEFAULT_BIN_DIR,
        f'containerd\'s {path} (plugins."{section}".cni)',
    )


def _crio_paths(root: Path) -> NodePaths | None:
    """CRI-O's [crio.network]: crio.conf, then each drop-in in name order, a later file's key winning."""
    drop_ins = under(root, CRIO_DROP_INS)
    names = sorted(entry.name for entry in os.scandir(drop_ins) if entry.is_file()) if drop_ins.is_dir() else []
    sources = [CRIO, *(f"{CRIO_DROP_INS}/{name}" for name in names)]
    network: dict[str, Any] = {}
    read = []
    for path in sources:
        document = _toml(root, path)
        if document is None:
            continue
        read.append(path)
        crio = document.get("crio")
        section = crio.get("network") if isinstance(crio, dict) else None
        network.update(section if isinstance(section, dict) else {})
    if not read:
        return None
    plugin_dirs = network.get("plugin_dirs") or [network.get("plugin_dir") or DEFAULT_BIN_DIR]
    where = ", ".join(read)
    return NodePaths(
        _text(network.get("network_dir"), where, "network_dir") or DEFAULT_CONF_DIR,
        _text(plugin_dirs[0] if isinstance(plugin_dirs, list) else None, where, "plugin_dirs") or DEFAULT_BIN_DIR,
        f"CRI-O's {where} ([crio.network])",
    )


def _multus_delegate(root: Path, paths: NodePaths) -> NodePaths:
    from istio_iptables.cni.install import first_config  # noqa: PLC0415 (libcni's order, kept once)

    conf_dir = under(root, paths.conf_dir)
    first = first_config(conf_dir) if conf_dir.is_dir() else None
    if first is None or _plugin_type(first) not in MULTUS_TYPES:
        return paths
    for delegate in MULTUS_DEFAULT_NETWORK_DIRS:
        if under(root, delegate).is_dir():
            return NodePaths(delegate, paths.bin_dir, f"{paths.source}, whose first file {first.name} is Multus's")
    return paths


def _plugin_type(path: Path) -> object:
    import json  # noqa: PLC0415

    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    plugins = document.get("plugins")
    if isinstance(plugins, list) and plugins and isinstance(plugins[0], dict):
        return plugins[0].get("type")
    return document.get("type")


def _toml(root: Path, path: str) -> dict[str, Any] | None:
    """A TOML file of the node, None when it has none; one line when it cannot be read."""
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415
    else:
        import tomli as tomllib  # noqa: PLC0415

    try:
        with open(under(root, path), "rb") as file:
            document: dict[str, Any] = tomllib.load(file)
            return document
    except FileNotFoundError:
        return None
    except OSError as error:
        raise HostError(f"cannot read the runtime's configuration {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise HostError(f"cannot read the runtime's configuration {path}: {error}") from None


def _text(value: object, path: str, key: str) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not value.startswith("/"):
        raise HostError(f"cannot use {key} = {value!r} from {path}: not an absolute path")
    return value
