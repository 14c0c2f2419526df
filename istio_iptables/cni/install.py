"""Install and uninstall the CNI plugin on a node, as Istio's install-cni DaemonSet does.

Install copies the plugin executable into the CNI bin dir and appends the plugin's entry to the first
configuration file of the conf dir, the one the runtime reads (a ``.conf`` becomes a ``.conflist``). Users of
other installers lost their primary network through this step, so each write follows what their threads
taught (temp file, fsync, rename, fsync of the directory; the entry inserted once; other plugins and
``cniVersion`` untouched; never a primary configuration of our own), and the conf dir is locked while the
installer works so that two installers (a DaemonSet rolling over) cannot interleave.

Uninstall restores the configuration file byte for byte: install keeps the original bytes and the digest of
what it wrote in a state file in the conf dir (a name without a configuration suffix, so no runtime reads it).
If another agent has rewritten the file since, restoring the old bytes would undo its change, so then only our
entry is taken out. The entry goes first and the executable last, so no configuration ever names a missing
plugin (pods stuck Terminating, istio#59846).
"""

from __future__ import annotations

import base64
import fcntl
import glob
import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from istio_iptables.errors import ConfigError, HostError
from istio_iptables.log import Log
from istio_iptables.records import record

PLUGIN_TYPE = "istio-iptables-cni"
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
CONFIG_SUFFIXES = (".conf", ".conflist", ".json")
"""The files libcni (containerd, CRI-O) reads from a conf dir, first in lexicographic order wins."""
STATE_FILE = ".istio-iptables-cni.state"
KUBECONFIG_FILE = "istio-iptables-cni-kubeconfig"
"""The plugin's credentials for the Kubernetes API, beside the configuration (a name no runtime reads)."""
_TEMPORARY = ".istio-iptables-cni.tmp"
CONTENTS_SUFFIX = ".d"
"""A "onedir" build's directory beside its executable (PyInstaller's contents_directory)."""

log = Log(__name__)


def plugin_entry(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Our object in the conflist: the plugin type, the capabilities that make the runtime pass the pod's
    annotations and its DNS config, and the plugin's own settings."""
    reserved = {"type", "capabilities"} & settings.keys()
    if reserved:
        raise ConfigError(f"invalid value for --plugin-config: sets {', '.join(sorted(reserved))}, which install owns")
    return {"type": PLUGIN_TYPE, **settings, "capabilities": {ANNOTATIONS_CAPABILITY: True, "dns": True}}


@record
class ServiceAccount:
    """The installer's own service account, written into a kubeconfig for the plugin, which asks the API for
    a pod's annotations when the runtime does not pass them."""

    directory: Path
    """Holds ``token`` and ``ca.crt``, as Kubernetes mounts them."""
    server: str
    host_conf_dir: str
    """The conf dir as the plugin, on the node, sees it (the installer sees it where it is mounted)."""


def install(
    conf_dir: Path, bin_dir: Path, plugin: Path, settings: Mapping[str, Any], account: ServiceAccount | None = None
) -> list[str]:
    """Put the plugin in place; return what changed (nothing when already installed as asked)."""
    if account is not None:
        if "kubernetes" in settings:
            raise ConfigError("invalid value for --plugin-config: sets kubernetes, which --write-kubeconfig owns")
        settings = {**settings, "kubernetes": {"kubeconfig": f"{account.host_conf_dir.rstrip('/')}/{KUBECONFIG_FILE}"}}
    entry = plugin_entry(settings)
    with _locked(_existing_dir(conf_dir, "--cni-conf-dir")):
        _existing_dir(bin_dir, "--cni-bin-dir")
        changes = _install_executable(plugin, bin_dir)
        if account is not None:
            changes += _write_if_changed(conf_dir / KUBECONFIG_FILE, _kubeconfig(account), mode=0o600)
        changes += _insert_entry(conf_dir, entry)
    for change in changes or [f"{PLUGIN_TYPE} already installed as asked: nothing to change"]:
        log.info(change)
    return changes


def uninstall(conf_dir: Path, bin_dir: Path) -> list[str]:
    """Take the plugin out: the configuration first, the executable last; return what changed."""
    changes: list[str] = []
    with _locked(_existing_dir(conf_dir, "--cni-conf-dir")):
        state = _read_state(conf_dir)
        for path in _config_files(conf_dir):
            document = _read_config(path)
            if not _our_entries(document):
                continue
            original = state.get("files", {}).get(path.name)
            if original and _digest(path.read_bytes()) == original["installed"]:
                restored = conf_dir / original["name"]
                _write_atomically(restored, base64.b64decode(original["content"]))
                if restored != path:
                    path.unlink()
                    _sync_dir(conf_dir)
                changes.append(f"restored {restored} as it was before install")
            else:
                document["plugins"] = [plugin for plugin in document["plugins"] if not _is_ours(plugin)]
                _write_atomically(path, _serialized(document))
                changes.append(f"removed the {PLUGIN_TYPE} entry from {path} (rewritten by another agent since)")
        for leftover in (conf_dir / STATE_FILE, conf_dir / KUBECONFIG_FILE):
            if leftover.exists():
                leftover.unlink()
                _sync_dir(conf_dir)
        executable = bin_dir / PLUGIN_TYPE
        if executable.exists():
            executable.unlink()
            changes.append(f"removed {executable}")
        link = bin_dir / (PLUGIN_TYPE + CONTENTS_SUFFIX)
        for contents in [link, *bin_dir.glob(f"{glob.escape(link.name)}-*")]:
            if contents.is_symlink():
                contents.unlink()
            elif contents.is_dir():
                shutil.rmtree(contents)
                changes.append(f"removed {contents}")
    for change in changes or [f"{PLUGIN_TYPE} is not installed: nothing to remove"]:
        log.info(change)
    return changes


def watch(
    conf_dir: Path,
    bin_dir: Path,
    plugin: Path,
    settings: Mapping[str, Any],
    account: ServiceAccount | None,
    *,
    interval: float,
    stop: threading.Event,
) -> None:
    """Install, then keep the plugin installed until ``stop`` is set: another agent rewriting the first
    configuration file (the cluster's network plugin does, on its own restarts) gets our entry back within
    ``interval`` seconds, and the plugin's kubeconfig follows the service account's token as Kubernetes
    rotates it. Polling sees every kind of change (rename, rewrite in place, a new first file), where watchers
    of single event types missed some (linkerd#11549)."""
    while not stop.is_set():
        try:
            install(conf_dir, bin_dir, plugin, settings, account)
        except HostError as error:
            # No configuration yet (the network plugin writes it after us) or a file being rewritten: retry.
            log.warning(f"{error}; retrying in {interval:g} s")
        stop.wait(interval)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a DaemonSet pod stops at once and leaves the plugin installed:
    pods created while it restarts must still be captured (istio#14327)."""
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    return stop


def first_config(conf_dir: Path) -> Path | None:
    """The configuration file a runtime uses: the first in lexicographic order."""
    return next(iter(_config_files(conf_dir)), None)


def _config_files(conf_dir: Path) -> list[Path]:
    return sorted(
        path
        for path in conf_dir.iterdir()
        if path.suffix in CONFIG_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


def _install_executable(plugin: Path, bin_dir: Path) -> list[str]:
    """The plugin as built: the executable, and beside it the directory of what it loads when there is one
    (a PyInstaller "onedir" build: ``NAME.d``). That directory is installed under a name of its contents'
    digest, and ``NAME.d`` is a symbolic link to it, switched by a rename: a runtime starting the plugin
    meanwhile finds the old contents or the new ones, never a directory half copied."""
    try:
        content = plugin.read_bytes()
    except OSError as error:
        raise ConfigError(f"invalid value for --plugin: '{plugin}': {error.strerror}") from None
    changes: list[str] = []
    contents = plugin.with_name(plugin.name + CONTENTS_SUFFIX)
    if contents.is_dir():
        link = bin_dir / (PLUGIN_TYPE + CONTENTS_SUFFIX)
        versioned = link.with_name(f"{link.name}-{_tree_digest(contents)[:16]}")
        if not (link.is_symlink() and os.readlink(link) == versioned.name):
            if not versioned.is_dir():
                _copy_tree_atomically(contents, versioned)
            _replace_with_link(link, versioned.name)
            changes.append(f"wrote {versioned} and pointed {link.name} to it")
        for stale in bin_dir.glob(f"{glob.escape(link.name)}-*"):
            if stale != versioned:
                shutil.rmtree(stale)
    return changes + _write_if_changed(bin_dir / PLUGIN_TYPE, content, mode=0o755)


def _tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix().encode()
        if path.is_symlink():
            digest.update(b"L" + relative + b"\0" + os.readlink(path).encode() + b"\0")
        elif path.is_file():
            digest.update(b"F" + relative + b"\0" + oct(path.stat().st_mode & 0o777).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _copy_tree_atomically(source: Path, target: Path) -> None:
    temporary = target.with_name(_TEMPORARY)
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        shutil.copytree(source, temporary, symlinks=True)
        os.replace(temporary, target)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise HostError(f"cannot write {target}: {error.strerror}") from None
    _sync_dir(target.parent)


def _replace_with_link(link: Path, target_name: str) -> None:
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)  # a copy made by hand, not by us
    temporary = link.with_name(_TEMPORARY)
    temporary.unlink(missing_ok=True)
    os.symlink(target_name, temporary)
    os.replace(temporary, link)
    _sync_dir(link.parent)


def _write_if_changed(path: Path, content: bytes, mode: int) -> list[str]:
    if path.exists() and path.read_bytes() == content:
        return []
    _write_atomically(path, content, mode)
    return [f"wrote {path}"]


def _kubeconfig(account: ServiceAccount) -> bytes:
    """A kubeconfig (JSON, which is YAML too) with the service account's token and the cluster's CA."""
    try:
        token = (account.directory / "token").read_text().strip()
        ca = (account.directory / "ca.crt").read_bytes()
    except OSError as error:
        raise HostError(f"cannot read the service account for --write-kubeconfig: {error}") from None
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "cluster", "cluster": {"server": account.server, "certificate-authority-data": _b64(ca)}}
        ],
        "users": [{"name": PLUGIN_TYPE, "user": {"token": token}}],
        "contexts": [{"name": PLUGIN_TYPE, "context": {"cluster": "cluster", "user": PLUGIN_TYPE}}],
        "current-context": PLUGIN_TYPE,
    }
    return _serialized(document)


def _b64(content: bytes) -> str:
    return base64.b64encode(content).decode()


def _insert_entry(conf_dir: Path, entry: dict[str, Any]) -> list[str]:
    path = first_config(conf_dir)
    if path is None:
        raise HostError(f"no CNI configuration in {conf_dir} yet: the cluster's network plugin writes it first")
    document = _read_config(path)
    original = path.read_bytes()
    if "plugins" in document:
        target = path
    else:
        # libcni's own conversion of a single-plugin file: the file's object whole, as the only plugin.
        document = {"cniVersion": document.get("cniVersion"), "name": document.get("name"), "plugins": [document]}
        target = path.with_suffix(".conflist")
    if _our_entries(document) == [entry] and target == path:
        # Wherever it stands: a chained plugin installed after us may append itself behind our entry, and
        # moving ours back to the end would start a tug of war between the two installers.
        return []
    plugins = document["plugins"]
    position = next((index for index, plugin in enumerate(plugins) if _is_ours(plugin)), len(plugins))
    others = [plugin for plugin in plugins if not _is_ours(plugin)]
    document["plugins"] = [*others[:position], entry, *others[position:]]
    content = _serialized(document)
    state = _read_state(conf_dir)
    files = state.setdefault("files", {})
    files[target.name] = {**_original(files.pop(path.name, None), path, original), "installed": _digest(content)}
    _write_atomically(conf_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True).encode())
    _write_atomically(target, content)
    if target != path:
        # The new .conflist sorts after the old .conf, so the runtime keeps reading the old file until it goes.
        path.unlink()
        _sync_dir(conf_dir)
    return [f"added the {PLUGIN_TYPE} entry to {target}" + (f" (was {path.name})" if target != path else "")]


def _original(record: dict[str, str] | None, path: Path, content: bytes) -> dict[str, str]:
    """What uninstall is to write back: the bytes from before our first install while the file is still as we
    wrote it; once another agent has rewritten it, its version (without any entry of ours), so that uninstall
    never undoes a change that is not ours."""
    if record and _digest(content) == record["installed"]:
        return {"name": record["name"], "content": record["content"]}
    document = json.loads(content)
    if _our_entries(document):
        document["plugins"] = [plugin for plugin in document["plugins"] if not _is_ours(plugin)]
        content = _serialized(document)
    return {"name": path.name, "content": _b64(content)}


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise HostError(f"cannot read the CNI configuration {path}: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("plugins", []), list):
        raise HostError(f"cannot read the CNI configuration {path}: not a CNI network configuration object")
    return document


def _read_state(conf_dir: Path) -> dict[str, Any]:
    try:
        state = json.loads((conf_dir / STATE_FILE).read_bytes())
    except FileNotFoundError:
        return {}
    except ValueError:
        log.warning(f"ignoring {conf_dir / STATE_FILE}: not JSON")
        return {}
    return state if isinstance(state, dict) else {}


def _is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def _our_entries(document: dict[str, Any]) -> list[Any]:
    return [plugin for plugin in document.get("plugins", []) if _is_ours(plugin)]


def _serialized(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def _write_atomically(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Write ``path`` so that a reader, or a crash, sees the old bytes or the new ones, never a mix or an empty
    file (istio#42046): a temporary file in the same directory, fsync, rename, fsync of the directory."""
    temporary = path.with_name(_TEMPORARY)
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(descriptor, mode)
            view = memoryview(content)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise HostError(f"cannot write {path}: {error.strerror}") from None
    _sync_dir(path.parent)


def _sync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _existing_dir(path: Path, flag: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"invalid value for {flag}: '{path}': not a directory")
    return path


@contextmanager
def _locked(conf_dir: Path) -> Iterator[None]:
    """The conf dir itself is the lock (flock on the directory), so locking leaves no file behind."""
    descriptor = os.open(conf_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
