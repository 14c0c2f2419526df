"""Install and uninstall the CNI plugin on a node, as Istio's install-cni DaemonSet does.

Install copies the plugin executable into the CNI bin dir and appends the plugin's entry to the first
configuration file of the conf dir, the one the runtime reads (a ``.conf`` becomes a ``.conflist``). Users of
other installers lost their primary network through this step, so each write follows what their threads
taught (``nodefiles``: a new temporary file, fsync, rename, fsync of the directory; the entry inserted once;
other plugins and ``cniVersion`` untouched; never a primary configuration of our own, never a file we did not
create overwritten), and the conf dir is locked while the installer works so that two installers (a DaemonSet
rolling over) cannot interleave. Before the entry goes in, the plugin's settings are read by the plugin's own
parser, and the node is checked to run the plugin (``nodecheck``): whatever is refused leaves the
configuration as it was, so pods keep their network.

Uninstall restores the configuration file byte for byte (and a link as a link): install keeps the original
bytes and the digest of what it wrote in a state file in the conf dir (a name without a configuration suffix,
so no runtime reads it). If another agent has rewritten the file since, restoring the old bytes would undo its
change, so then only our entry is taken out. The entry goes first and the executable last, so no configuration
ever names a missing plugin (pods stuck Terminating, istio#59846).
"""

from __future__ import annotations

import base64
import fcntl
import glob
import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from istio_iptables.cni import nodecheck, nodefiles
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
AGENT_FILE = PLUGIN_TYPE + ".agent"
"""Beside the plugin's executable: the node agent's socket, for the thin client (``cni-client/``); without
it, the client runs the self-contained plugin itself."""
CONTENTS_SUFFIX = ".d"
"""A "onedir" build's directory beside its executable (PyInstaller's contents_directory)."""
NODE_ROOT = Path("/")
"""Where the node's file system is, as the installer sees it: "/" when it runs on the node itself."""
MAX_BACKOFF = 5.0
"""Seconds --watch waits at most between attempts that fail: a pod created meanwhile is not captured."""

log = Log(__name__)


def plugin_entry(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Our object in the conflist: the plugin type, the capabilities that make the runtime pass the pod's
    annotations and its DNS config, and the plugin's own settings."""
    from istio_iptables.cni.plugin import STANDARD_KEYS  # noqa: PLC0415

    reserved = STANDARD_KEYS & settings.keys()
    if reserved:
        raise ConfigError(f"invalid value for --plugin-config: sets {', '.join(sorted(reserved))}, which install owns")
    return {"type": PLUGIN_TYPE, **settings, "capabilities": {ANNOTATIONS_CAPABILITY: True, "dns": True}}


def checked_entry(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Our entry, read by the plugin's own parser as a runtime would hand it over: what the plugin would
    refuse at every pod's ADD or DEL is refused here, before anything is written."""
    from istio_iptables.cni.plugin import check_plugin_config  # noqa: PLC0415
    from istio_iptables.cni.protocol import CniError  # noqa: PLC0415

    entry = plugin_entry(settings)
    try:
        check_plugin_config(entry)
    except CniError as error:
        # The plugin's own words, which name the setting and its value, without saying "invalid value" twice.
        reason = error.message.removeprefix("plugin settings: ").removeprefix("invalid value for ")
        raise ConfigError(f"invalid value for --plugin-config: {reason}") from None
    return entry


@record
class ServiceAccount:
    """The installer's own service account, written into a kubeconfig for the plugin, which asks the API for
    a pod's annotations when the runtime does not pass them."""

    directory: Path
    """Holds ``token`` and ``ca.crt``, as Kubernetes mounts them."""
    server: str
    host_conf_dir: str
    """The conf dir as the plugin, on the node, sees it (the installer sees it where it is mounted)."""


class BundleCache:
    """What --watch saw of the plugin's files (the build's and the installed copy) when they last matched:
    their metadata, so that a steady state costs a few stat calls, not a read of the whole bundle."""

    def __init__(self) -> None:
        self.stamp: tuple[tuple[str, int, int, int, int], ...] | None = None


def install(
    conf_dir: Path,
    bin_dir: Path,
    plugin: Path,
    settings: Mapping[str, Any],
    account: ServiceAccount | None = None,
    *,
    root: Path = NODE_ROOT,
    agent_socket: str = "",
) -> list[str]:
    """Put the plugin in place; return what changed (nothing when already installed as asked).
    ``agent_socket``: the node agent's socket as the node sees it, written for the client (empty: no agent,
    and a file of an earlier install is removed)."""
    entry = _entry(settings, account)
    changes = _install_changes(conf_dir, bin_dir, plugin, entry, account, root=root, cache=None, agent=agent_socket)
    for change in changes or [f"{PLUGIN_TYPE} already installed as asked: nothing to change"]:
        log.info(change)
    return changes


def _entry(settings: Mapping[str, Any], account: ServiceAccount | None) -> dict[str, Any]:
    if account is not None:
        if "kubernetes" in settings:
            raise ConfigError("invalid value for --plugin-config: sets kubernetes, which --write-kubeconfig owns")
        settings = {**settings, "kubernetes": {"kubeconfig": f"{account.host_conf_dir.rstrip('/')}/{KUBECONFIG_FILE}"}}
    return checked_entry(settings)


def _install_changes(
    conf_dir: Path,
    bin_dir: Path,
    plugin: Path,
    entry: dict[str, Any],
    account: ServiceAccount | None,
    *,
    root: Path,
    cache: BundleCache | None,
    agent: str,
) -> list[str]:
    """``install`` of a checked entry, without its log lines: the changes made."""
    with _locked(_existing_dir(conf_dir, "--cni-conf-dir")), _one_line("install"):
        _existing_dir(bin_dir, "--cni-bin-dir")
        network = _primary_network(conf_dir)
        changes = _install_executable(plugin, bin_dir, root, cache)
        changes += _agent_file(bin_dir, agent)
        if account is not None:
            changes += _write_if_changed(conf_dir / KUBECONFIG_FILE, _kubeconfig(account), mode=0o600)
        changes += _insert_entry(conf_dir, network, entry, root)
    return changes


def _agent_file(bin_dir: Path, socket_path: str) -> list[str]:
    """Where the client finds the agent: written when one runs, removed when none does."""
    path = bin_dir / AGENT_FILE
    if socket_path:
        return _write_if_changed(path, f"{socket_path}\n".encode(), mode=0o644)
    return [f"removed {path}"] if nodefiles.remove(path) else []


def uninstall(conf_dir: Path, bin_dir: Path, *, root: Path = NODE_ROOT) -> list[str]:
    """Take the plugin out: the configuration first, the executable last; return what changed. A file that
    cannot be read is left as it is, with a warning, and the rest is still removed."""
    changes: list[str] = []
    with _locked(_existing_dir(conf_dir, "--cni-conf-dir")), _one_line("uninstall"):
        files = _read_state(conf_dir).get("files", {})
        for path in config_files(conf_dir):
            try:
                network = _read_config(path)
            except HostError as error:
                log.warning(f"{error}: left as it is")
                continue
            if network.is_list and _our_entries(network.document):
                changes.append(_take_out(conf_dir, network, files.get(path.name), root))
        for leftover in (conf_dir / STATE_FILE, conf_dir / KUBECONFIG_FILE):
            if nodefiles.remove(leftover):
                nodefiles.sync_dir(conf_dir)
        changes += _agent_file(bin_dir, "")
        executable = bin_dir / PLUGIN_TYPE
        if nodefiles.remove(executable):
            changes.append(f"removed {executable}")
        link = bin_dir / (PLUGIN_TYPE + CONTENTS_SUFFIX)
        nodefiles.remove(link)
        for contents in bin_dir.glob(f"{glob.escape(link.name)}-*"):
            nodefiles.remove(contents)
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
    root: Path = NODE_ROOT,
    agent_socket: str = "",
) -> None:
    """Install, then keep the plugin installed until ``stop`` is set: another agent rewriting the first
    configuration file (the cluster's network plugin does, on its own restarts) gets our entry back within
    ``interval`` seconds, and the plugin's kubeconfig follows the service account's token as Kubernetes
    rotates it. Polling sees every kind of change (rename, rewrite in place, a new first file), where watchers
    of single event types missed some (linkerd#11549).

    Each change is logged at info when it is made, and nothing else is: a steady state is silent. A failure
    (no configuration yet, a file system refusing a write) is a warning when it first appears, then retried
    with a growing delay until it clears."""
    entry, cache = _entry(settings, account), BundleCache()
    failures, problem = 0, ""
    while not stop.is_set():
        try:
            changes = _install_changes(
                conf_dir, bin_dir, plugin, entry, account, root=root, cache=cache, agent=agent_socket
            )
        except HostError as error:
            failures += 1
            delay = min(interval * 2 ** min(failures - 1, 16), max(interval, MAX_BACKOFF))
            (log.debug if str(error) == problem else log.warning)(f"{error}; retrying in {delay:g} s")
            problem = str(error)
            stop.wait(delay)
            continue
        if problem:
            log.info(f"{PLUGIN_TYPE}: the earlier problem has cleared")
        failures, problem = 0, ""
        for change in changes:
            log.info(change)
        if not changes:
            log.debug(f"{PLUGIN_TYPE} installed as asked: nothing to change")
        stop.wait(interval)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so a DaemonSet pod stops at once and leaves the plugin installed:
    pods created while it restarts must still be captured (istio#14327)."""
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    return stop


def config_files(conf_dir: Path) -> list[Path]:
    """The conf dir's configuration files in the order a runtime reads them, as libcni lists them
    (``ConfFiles`` in github.com/containernetworking/cni libcni/conf.go): every entry that is not a directory
    (a link is not, whatever it points to) whose extension, Go's ``filepath.Ext`` (from the name's last dot),
    is .conf, .conflist or .json, dotfiles included; containerd (go-cni ``loadFromConfDir``) and CRI-O
    (ocicni) sort the paths with ``sort.Strings``, bytewise, and the first is the pod network."""
    with os.scandir(conf_dir) as entries:
        names = [
            entry.name
            for entry in entries
            if not entry.is_dir(follow_symlinks=False) and _extension(entry.name) in CONFIG_SUFFIXES
        ]
    return [conf_dir / name for name in sorted(names, key=os.fsencode)]


def first_config(conf_dir: Path) -> Path | None:
    """The configuration file a runtime uses: the first in libcni's order."""
    return next(iter(config_files(conf_dir)), None)


def _extension(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:] if dot >= 0 else ""


@record
class _Network:
    """A configuration file as a runtime reads it: by its extension, a list of plugins or a single one."""

    path: Path
    document: dict[str, Any]
    content: bytes

    @property
    def is_list(self) -> bool:
        return _extension(self.path.name) == ".conflist"


def _read_config(path: Path) -> _Network:
    try:
        content = path.read_bytes()
        document = json.loads(content)
    except OSError as error:
        raise HostError(f"cannot read the CNI configuration {path}: {error.strerror}") from None
    except ValueError as error:
        raise HostError(f"cannot read the CNI configuration {path}: {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("plugins", []), list):
        raise HostError(f"cannot read the CNI configuration {path}: not a CNI network configuration object")
    return _Network(path, document, content)


def _primary_network(conf_dir: Path) -> _Network:
    """The first configuration file, when it holds a network our entry can follow: a runtime reads it as the
    pod network, so a file it would refuse, or one whose only plugin would be ours, is left alone."""
    path = first_config(conf_dir)
    if path is None:
        raise HostError(f"no CNI configuration in {conf_dir} yet: the cluster's network plugin writes it first")
    network = _read_config(path)
    problem = _primary_problem(network)
    if problem:
        raise HostError(
            f"the first CNI configuration {path} has no primary plugin ({problem}): left alone until the "
            "cluster's network plugin writes one"
        )
    return network


def _primary_problem(network: _Network) -> str:
    """Why a runtime would have no pod network of another plugin in this file (empty when it has one), in
    the terms of libcni's parser (NetworkConfFromBytes) and go-cni's check of a single-plugin file."""
    document = network.document
    if not network.is_list:
        kind = document.get("type")
        if not isinstance(kind, str) or not kind:
            return "no 'type'" + (": a list of plugins needs the .conflist extension" if "plugins" in document else "")
        return "its only plugin is ours" if kind == PLUGIN_TYPE else ""
    if not isinstance(document.get("name"), str):
        return "no 'name'"
    plugins = document.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        return "an empty 'plugins' list"
    for index, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) or not plugin["type"]:
            return f"plugin {index} has no 'type'"
    if all(_is_ours(plugin) for plugin in plugins):
        return "its only plugin is ours"
    return ""


def _install_executable(plugin: Path, bin_dir: Path, root: Path, cache: BundleCache | None) -> list[str]:
    """The plugin as built: the executable, and beside it the directory of what it loads when there is one
    (a PyInstaller "onedir" build: ``NAME.d``). That directory is installed under a name of its contents'
    digest, and ``NAME.d`` is a symbolic link to it, switched by a rename: a runtime starting the plugin
    meanwhile finds the old contents or the new ones, never a directory half copied. The node is checked to
    run the build first (its C library), and the installed executable is run (VERSION) before any
    configuration names it."""
    contents = plugin.with_name(plugin.name + CONTENTS_SUFFIX)
    stamp = _bundle_stamp(plugin, contents, bin_dir)
    if cache is not None and cache.stamp == stamp:
        return []
    try:
        content = plugin.read_bytes()
    except OSError as error:
        raise ConfigError(f"invalid value for --plugin: '{plugin}': {error.strerror}") from None
    nodecheck.check_c_library(contents, root)
    changes: list[str] = []
    if contents.is_dir():
        link = bin_dir / (PLUGIN_TYPE + CONTENTS_SUFFIX)
        versioned = link.with_name(f"{link.name}-{_tree_digest(contents)[:16]}")
        if not (link.is_symlink() and os.readlink(link) == versioned.name):
            if versioned.is_symlink() or not versioned.is_dir():
                nodefiles.remove(versioned)
                nodefiles.copy_tree_atomically(contents, versioned)
            nodefiles.replace_with_link(link, versioned.name)
            changes.append(f"wrote {versioned} and pointed {link.name} to it")
        for stale in bin_dir.glob(f"{glob.escape(link.name)}-*"):
            if stale != versioned:
                nodefiles.remove(stale)
    executable = bin_dir / PLUGIN_TYPE
    changes += _write_if_changed(executable, content, mode=0o755)
    nodecheck.check_runs(executable)
    if cache is not None:
        cache.stamp = _bundle_stamp(plugin, contents, bin_dir)
    return changes


def _bundle_stamp(plugin: Path, contents: Path, bin_dir: Path) -> tuple[tuple[str, int, int, int, int], ...]:
    """Size, mtime, inode and mode of every file of the build and of the installed copy (through the link)."""
    stamp = []
    installed = bin_dir / (PLUGIN_TYPE + CONTENTS_SUFFIX)
    for top in (plugin, contents, bin_dir / PLUGIN_TYPE, installed):
        paths = [str(top)]
        if top.is_dir():
            for directory, _, names in os.walk(top):
                paths += sorted(os.path.join(directory, name) for name in names)
        for path in paths:
            try:
                status = os.lstat(path)
            except FileNotFoundError:
                stamp.append((path, -1, -1, -1, -1))
                continue
            stamp.append((path, status.st_size, status.st_mtime_ns, status.st_ino, status.st_mode))
    if installed.is_symlink():
        stamp.append((os.readlink(installed), 0, 0, 0, 0))
    return tuple(stamp)


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


def _write_if_changed(path: Path, content: bytes, mode: int) -> list[str]:
    if nodefiles.read_own(path) == content:
        return []
    nodefiles.write_atomically(path, content, mode)
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


def _insert_entry(conf_dir: Path, network: _Network, entry: dict[str, Any], root: Path) -> list[str]:
    path, document = network.path, dict(network.document)
    state = _read_state(conf_dir)
    files = state.setdefault("files", {})
    if network.is_list:
        target = path
    else:
        # libcni's own conversion of a single-plugin file: the file's object whole, as the only plugin.
        document = {"cniVersion": document.get("cniVersion"), "name": document.get("name"), "plugins": [document]}
        target = _conversion_target(conf_dir, path, files)
    if _our_entries(document) == [entry] and target == path and not _is_ours(document["plugins"][0]):
        # Wherever it stands: a chained plugin installed after us may append itself behind our entry, and
        # moving ours back to the end would start a tug of war between the two installers.
        return []
    plugins = document["plugins"]
    others = [plugin for plugin in plugins if not _is_ours(plugin)]
    position = next((index for index, plugin in enumerate(plugins) if _is_ours(plugin)), 0) or len(others)
    document["plugins"] = [*others[:position], entry, *others[position:]]
    content = _serialized(document)
    previous = files.pop(path.name, None)
    files[target.name] = {**_original(previous, network), "installed": _digest(content)}
    nodefiles.write_atomically(conf_dir / STATE_FILE, json.dumps(state, indent=2, sort_keys=True).encode(), 0o600)
    if target == path:
        nodefiles.write_config(target, content, root)
    else:
        nodefiles.write_atomically(target, content)
        # The new .conflist sorts after the old .conf, so the runtime keeps reading the old file until it goes.
        nodefiles.remove(path)
        nodefiles.sync_dir(conf_dir)
    return [f"added the {PLUGIN_TYPE} entry to {target}" + (f" (was {path.name})" if target != path else "")]


def _conversion_target(conf_dir: Path, path: Path, files: Mapping[str, Any]) -> Path:
    """Where a single-plugin file becomes a list: its name with the .conflist extension, or else its whole
    name with .conflist added, whichever is free (or ours from an earlier conversion) and still sorts first
    once the old file is gone. A file we did not create is never overwritten."""
    others = [other.name for other in config_files(conf_dir) if other != path]
    stem = path.name[: path.name.rfind(".")]
    for name in (stem + ".conflist", path.name + ".conflist"):
        free = name in files or not os.path.lexists(conf_dir / name)
        if free and sorted([*others, name], key=os.fsencode)[0] == name:
            return conf_dir / name
    raise HostError(
        f"cannot turn {path} into a list of plugins: {stem}.conflist and {path.name}.conflist are taken or would "
        "not be read first; left alone"
    )


def _take_out(conf_dir: Path, network: _Network, original: dict[str, str] | None, root: Path) -> str:
    """Our entry out of one file: the file as it was before install while it is still as we wrote it (a
    link put back as a link), else the file without our entry."""
    path = network.path
    restored = conf_dir / original["name"] if original else path
    unchanged = original is not None and _digest(network.content) == original["installed"]
    # A file we did not create may have taken the original's name since: it is never overwritten.
    if original and unchanged and (restored == path or not os.path.lexists(restored)):
        content = base64.b64decode(original["content"])
        if restored == path:
            nodefiles.write_config(path, content, root)
        elif "link" in original:
            nodefiles.replace_with_link(restored, original["link"])
        else:
            nodefiles.write_atomically(restored, content)
        if restored != path:
            nodefiles.remove(path)
            nodefiles.sync_dir(conf_dir)
        return f"restored {restored} as it was before install"
    document = dict(network.document)
    document["plugins"] = [plugin for plugin in document["plugins"] if not _is_ours(plugin)]
    nodefiles.write_config(path, _serialized(document), root)
    return f"removed the {PLUGIN_TYPE} entry from {path} (rewritten by another agent since)"


def _original(record: dict[str, str] | None, network: _Network) -> dict[str, str]:
    """What uninstall is to write back: the bytes from before our first install while the file is still as we
    wrote it; once another agent has rewritten it, its version (without any entry of ours), so that uninstall
    never undoes a change that is not ours. A link is kept as its target's name."""
    if record and _digest(network.content) == record["installed"]:
        return {key: value for key, value in record.items() if key != "installed"}
    content = network.content
    if network.is_list and _our_entries(network.document):
        document = dict(network.document)
        document["plugins"] = [plugin for plugin in document["plugins"] if not _is_ours(plugin)]
        content = _serialized(document)
    kept = {"name": network.path.name, "content": _b64(content)}
    if network.path.is_symlink():
        kept["link"] = os.readlink(network.path)
    return kept


def _digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _read_state(conf_dir: Path) -> dict[str, Any]:
    content = nodefiles.read_own(conf_dir / STATE_FILE)
    if content is None:
        return {}
    try:
        state = json.loads(content)
    except ValueError:
        log.warning(f"ignoring {conf_dir / STATE_FILE}: not JSON")
        return {}
    return state if isinstance(state, dict) else {}


def _is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def _our_entries(document: dict[str, Any]) -> list[Any]:
    plugins = document.get("plugins", [])
    return [plugin for plugin in plugins if _is_ours(plugin)] if isinstance(plugins, list) else []


def _serialized(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2) + "\n").encode()


def _existing_dir(path: Path, flag: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"invalid value for {flag}: '{path}': not a directory")
    return path


@contextmanager
def _one_line(action: str) -> Iterator[None]:
    """Whatever the file system refuses on the way is one line (HostError), never a traceback."""
    try:
        yield
    except OSError as error:
        raise nodefiles.failure(action, error) from None


@contextmanager
def _locked(conf_dir: Path) -> Iterator[None]:
    """The conf dir itself is the lock (flock on the directory), so locking leaves no file behind."""
    try:
        descriptor = os.open(conf_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise nodefiles.failure("lock", error) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
