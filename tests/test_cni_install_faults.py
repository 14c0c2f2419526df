"""The installer under hostile input and faults (issue 20): what a clumsy operator or a hostile file in the
conf dir does to ``cni install`` / ``uninstall`` / ``--watch``. Each case failed before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from istio_iptables.cni import install, plugin
from istio_iptables.cni.protocol import CniError, read_request
from istio_iptables.errors import ConfigError, HostError
from tests.helpers import fake_cni_plugin, run_cli

CLI = str(Path(sys.executable).with_name("istio-iptables"))
CALICO = {
    "name": "k8s-pod-network",
    "cniVersion": "1.0.0",
    "plugins": [{"type": "calico"}, {"type": "portmap", "capabilities": {"portMappings": True}}],
}
BRIDGE = {"cniVersion": "0.3.1", "name": "k8s-pod-network", "type": "bridge", "bridge": "cni0"}


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path, Path]:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    (tmp_path / "build").mkdir()
    return conf_dir, bin_dir, fake_cni_plugin(tmp_path / "build" / "istio-iptables-cni")


def _snapshot(directory: Path) -> dict[str, tuple[bytes, bool]]:
    return {
        path.name: (os.readlink(path).encode() if path.is_symlink() else path.read_bytes(), path.is_symlink())
        for path in sorted(directory.iterdir())
    }


def _write(path: Path, document: object) -> bytes:
    content = json.dumps(document).encode()
    path.write_bytes(content)
    return content


# --- settings the plugin refuses ---------------------------------------------------------------------------

REFUSED_SETTINGS = [
    pytest.param({"exclude_namespace": ["kube-system"]}, "exclude_namespace", id="misspelt key"),
    pytest.param({"log_level": "loud"}, "log_level", id="bad value"),
    pytest.param({"iptables": "nftables"}, "iptables", id="bad variant"),
    pytest.param({"exclude_namespaces": "kube-system"}, "exclude_namespaces", id="wrongly typed list"),
    pytest.param({"values": {"global": {"nativeNftables": "yes"}}}, "values.global.nativeNftables", id="typed"),
    pytest.param({"mesh_config": {"defaultConfig": {"interceptionMode": "BYPASS"}}}, "interceptionMode", id="mode"),
]


def _request(command: str, settings: dict[str, Any]) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "k8s", **install.plugin_entry(settings)}).encode()


def _plugin_answers(command: str, settings: dict[str, Any], netns: str) -> str:
    environment = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": netns}
    environment["CNI_ARGS"] = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=app"
    return plugin.handle(read_request(environment, _request(command, settings)))


@pytest.mark.parametrize(("settings", "key"), REFUSED_SETTINGS)
def test_the_plugin_refuses_these_settings_on_every_del(settings: dict[str, Any], key: str, tmp_path: Path) -> None:
    """What the installer must refuse: the plugin itself fails every DEL with them (here before it enters the
    namespace, which is a plain file)."""
    netns = tmp_path / "netns"
    netns.touch()
    with pytest.raises(CniError, match=key):
        _plugin_answers("DEL", settings, str(netns))


@pytest.mark.parametrize(("settings", "key"), REFUSED_SETTINGS)
def test_install_refuses_settings_the_plugin_refuses_one_line_exit_2_untouched(
    node: tuple[Path, Path, Path], tmp_path: Path, settings: dict[str, Any], key: str
) -> None:
    conf_dir, bin_dir, executable = node
    _write(conf_dir / "10-calico.conflist", CALICO)
    settings_file = tmp_path / "plugin.json"
    settings_file.write_text(json.dumps(settings))
    before = (_snapshot(conf_dir), _snapshot(bin_dir))
    arguments = ["--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir), "--plugin", str(executable)]

    result = run_cli(["cni", "install", *arguments, "--plugin-config", str(settings_file)])

    assert result.code == 2, result
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "--plugin-config" in result.stderr and key in result.stderr
    assert (_snapshot(conf_dir), _snapshot(bin_dir)) == before


def test_settings_the_plugin_accepts_are_installed(node: tuple[Path, Path, Path], tmp_path: Path) -> None:
    conf_dir, bin_dir, executable = node
    _write(conf_dir / "10-calico.conflist", CALICO)
    settings = {"values": {"global": {"nativeNftables": True}}, "log_level": "debug", "iptables": "nft"}
    _plugin_answers("DEL", settings, str(tmp_path / "gone"))
    install.install(conf_dir, bin_dir, executable, settings)
    [*_, entry] = json.loads((conf_dir / "10-calico.conflist").read_bytes())["plugins"]
    assert entry["values"] == settings["values"]


# --- never the primary network -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "document"),
    [
        ("10-empty.conflist", {"cniVersion": "1.0.0", "name": "k8s", "plugins": []}),
        ("10-typeless.conflist", {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"mtu": 1400}]}),
        ("10-ours.conflist", {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "istio-iptables-cni"}]}),
        ("10-notype.conf", {"cniVersion": "1.0.0", "name": "k8s", "bridge": "cni0"}),
        ("10-list-in-a.conf", {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "calico"}]}),
        ("10-noname.conflist", {"cniVersion": "1.0.0", "plugins": [{"type": "calico"}]}),
    ],
)
def test_a_first_file_without_a_primary_plugin_is_left_alone(
    node: tuple[Path, Path, Path], name: str, document: object
) -> None:
    conf_dir, bin_dir, executable = node
    _write(conf_dir / name, document)
    before = _snapshot(conf_dir)
    with pytest.raises(HostError, match=rf"{name}.*no primary|{name}.*left alone"):
        install.install(conf_dir, bin_dir, executable, {})
    assert _snapshot(conf_dir) == before


def test_watch_waits_while_the_first_file_has_no_primary_plugin(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, executable = node
    path = conf_dir / "10-net.conflist"
    empty = _write(path, {"cniVersion": "1.0.0", "name": "k8s", "plugins": []})
    watcher, log = _watch(conf_dir, bin_dir, executable)
    try:
        _wait_for(lambda: "no primary" in log.read_text(), 30)
        assert path.read_bytes() == empty
        _write(path, CALICO)  # the network plugin is ready
        _wait_for(lambda: b"istio-iptables-cni" in path.read_bytes())
    finally:
        stderr = _stop(watcher, log)
    assert "Traceback" not in stderr


# --- never overwrite a file it did not create -----------------------------------------------------------


def test_converting_a_conf_never_overwrites_a_conflist_of_the_same_name(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, executable = node
    conf = _write(conf_dir / "10-net.conf", BRIDGE)
    conflist = _write(conf_dir / "10-net.conflist", CALICO)
    before = _snapshot(conf_dir)

    install.install(conf_dir, bin_dir, executable, {})
    assert (conf_dir / "10-net.conflist").read_bytes() == conflist
    [first, *_] = install.first_config(conf_dir), None
    assert first is not None
    assert [entry["type"] for entry in json.loads(first.read_bytes())["plugins"]] == ["bridge", "istio-iptables-cni"]

    install.uninstall(conf_dir, bin_dir)
    assert _snapshot(conf_dir) == before
    assert (conf_dir / "10-net.conf").read_bytes() == conf


# --- uninstall when another file is broken ----------------------------------------------------------------


def test_uninstall_removes_everything_of_ours_despite_a_broken_file(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, executable = node
    original = _write(conf_dir / "10-calico.conflist", CALICO)
    account = conf_dir.parent / "account"
    account.mkdir()
    (account / "token").write_text("token")
    (account / "ca.crt").write_text("ca")
    service = install.ServiceAccount(account, "https://198.18.0.1:443", "/etc/cni/net.d")
    install.install(conf_dir, bin_dir, executable, {}, service)
    (conf_dir / "99-broken.conflist").write_text("{oops")

    result = run_cli(["cni", "uninstall", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir)])

    assert result.code == 0, result
    assert sorted(path.name for path in conf_dir.iterdir()) == ["10-calico.conflist", "99-broken.conflist"]
    assert (conf_dir / "10-calico.conflist").read_bytes() == original
    assert list(bin_dir.iterdir()) == []
    assert "99-broken.conflist" in result.stderr


# --- symlinks ---------------------------------------------------------------------------------------------


def test_a_link_at_a_temporary_or_state_name_never_makes_install_write_its_target(
    node: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    conf_dir, bin_dir, executable = node
    _write(conf_dir / "10-calico.conflist", CALICO)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for directory in (conf_dir, bin_dir):
        for name in (".istio-iptables-cni.tmp", install.STATE_FILE, install.KUBECONFIG_FILE):
            if not (directory / name).exists():
                (directory / name).symlink_to(victim)

    install.install(conf_dir, bin_dir, executable, {})

    assert victim.read_bytes() == b"precious"
    assert b"istio-iptables-cni" in (conf_dir / "10-calico.conflist").read_bytes()
    assert not (conf_dir / install.STATE_FILE).is_symlink()


def test_a_linked_configuration_keeps_its_link_and_uninstall_restores_it(
    node: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    conf_dir, bin_dir, executable = node
    elsewhere = tmp_path / "calico"
    elsewhere.mkdir()
    original = _write(elsewhere / "10-calico.conflist", CALICO)
    (conf_dir / "10-calico.conflist").symlink_to("../calico/10-calico.conflist")
    before = _snapshot(conf_dir)

    install.install(conf_dir, bin_dir, executable, {})
    assert (conf_dir / "10-calico.conflist").is_symlink()
    assert b"istio-iptables-cni" in (elsewhere / "10-calico.conflist").read_bytes()
    assert sorted(path.name for path in elsewhere.iterdir()) == ["10-calico.conflist"]  # no temporary left

    install.uninstall(conf_dir, bin_dir)
    assert _snapshot(conf_dir) == before
    assert (elsewhere / "10-calico.conflist").read_bytes() == original


def test_a_linked_conf_converted_gets_its_link_back_on_uninstall(node: tuple[Path, Path, Path], tmp_path: Path) -> None:
    conf_dir, bin_dir, executable = node
    target = tmp_path / "bridge.conf"
    original = _write(target, BRIDGE)
    (conf_dir / "10-bridge.conf").symlink_to(target)
    before = _snapshot(conf_dir)

    install.install(conf_dir, bin_dir, executable, {})
    assert target.read_bytes() == original
    install.uninstall(conf_dir, bin_dir)
    assert _snapshot(conf_dir) == before


# --- file system errors -----------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the conf dir is mounted read-only in a mount namespace")
def test_a_read_only_conf_dir_is_one_line_and_watch_retries(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, executable = node
    _write(conf_dir / "10-calico.conflist", CALICO)
    arguments = ["--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir), "--plugin", str(executable)]
    once = subprocess.run(
        _read_only(conf_dir, [CLI, "cni", "install", *arguments]),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert once.returncode == 1, once
    assert len(once.stderr.splitlines()) == 1 and "Traceback" not in once.stderr
    assert str(conf_dir) in once.stderr and "Read-only file system" in once.stderr
    # The conf dir stays read-only until --watch says it retries, then becomes writable (the mount goes).
    command = [CLI, "cni", "install", *arguments, "--watch", "--interval", "0.05"]
    watcher, log = _logged(_read_only(conf_dir, command), conf_dir.parent)
    try:
        _wait_for(lambda: b"retrying in" in log.read_bytes(), 20)
        subprocess.run(["nsenter", f"--mount=/proc/{watcher.pid}/ns/mnt", "umount", str(conf_dir)], check=True)
        _wait_for(lambda: b"istio-iptables-cni" in (conf_dir / "10-calico.conflist").read_bytes(), 20)
        assert watcher.poll() is None, "--watch exited instead of retrying"
    finally:
        stderr = _stop(watcher, log)
    assert "Traceback" not in stderr and "retrying in" in stderr


def _read_only(directory: Path, command: list[str]) -> list[str]:
    """``command`` run in a mount namespace of its own where ``directory`` is mounted read-only over itself
    (root ignores permission bits); the test's own mounts are never touched. Its process is the command's
    (unshare and the shell exec it), so the mount can be lifted through ``/proc/PID/ns/mnt``."""
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(directory), *command]


def test_a_link_where_a_bundle_directory_is_expected_is_replaced_never_followed(
    node: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    conf_dir, bin_dir, executable = node
    _write(conf_dir / "10-calico.conflist", CALICO)
    contents = executable.with_name("istio-iptables-cni.d")
    contents.mkdir()
    (contents / "lib.so").write_bytes(b"one")
    install.install(conf_dir, bin_dir, executable, {})
    first = (bin_dir / "istio-iptables-cni.d").resolve().name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "lib.so").write_bytes(b"not ours")
    # An old release's directory that is a link now (once a traceback: rmtree refuses links)...
    (bin_dir / "istio-iptables-cni.d-0000000000000000").symlink_to(elsewhere)
    (contents / "lib.so").write_bytes(b"two")  # a new release
    install.install(conf_dir, bin_dir, executable, {})
    assert (bin_dir / "istio-iptables-cni.d" / "lib.so").read_bytes() == b"two"
    # ...and a link at the very name of the release being installed (once taken for our own copy).
    (contents / "lib.so").write_bytes(b"one")
    install.nodefiles.remove(bin_dir / first)
    (bin_dir / first).symlink_to(elsewhere)
    install.install(conf_dir, bin_dir, executable, {})

    assert (bin_dir / "istio-iptables-cni.d" / "lib.so").read_bytes() == b"one"
    assert not (bin_dir / first).is_symlink()
    assert sorted(path.name for path in elsewhere.iterdir()) == ["lib.so"]
    assert (elsewhere / "lib.so").read_bytes() == b"not ours"


# --- libcni's reading of the conf dir ---------------------------------------------------------------------


def test_files_are_read_as_libcni_reads_them(node: tuple[Path, Path, Path]) -> None:
    """libcni.ConfFiles (containernetworking/cni libcni/conf.go) lists every entry that is not a directory
    whose extension is .conf, .conflist or .json, dotfiles included; go-cni and ocicni sort the paths."""
    conf_dir, _, _ = node
    for name in ("10-b.conflist", "10-a.json", ".00-x.conflist", "05-c.conf", "01-d.conf.bak", "00-e.txt", ".conf"):
        _write(conf_dir / name, CALICO)
    (conf_dir / "00-dir.conflist").mkdir()
    (conf_dir / "00-link.conflist").symlink_to("10-b.conflist")
    names = [path.name for path in install.config_files(conf_dir)]
    assert names == [".00-x.conflist", ".conf", "00-link.conflist", "05-c.conf", "10-a.json", "10-b.conflist"]


def test_a_dotfile_first_gets_our_entry(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, executable = node
    _write(conf_dir / ".00-x.conflist", CALICO)
    other = _write(conf_dir / "10-calico.conflist", CALICO)
    install.install(conf_dir, bin_dir, executable, {})
    assert b"istio-iptables-cni" in (conf_dir / ".00-x.conflist").read_bytes()
    assert (conf_dir / "10-calico.conflist").read_bytes() == other


# --- --watch ----------------------------------------------------------------------------------------------


def test_watch_checks_the_bundle_by_metadata_and_is_quiet_in_a_steady_state(
    node: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    conf_dir, bin_dir, executable = node
    path = conf_dir / "10-calico.conflist"
    _write(path, CALICO)
    contents = executable.with_name("istio-iptables-cni.d")
    contents.mkdir()
    (contents / "lib.so").write_bytes(b"x" * 4 * 1024 * 1024)
    watcher, log = _watch(conf_dir, bin_dir, executable, "--log_output_level=default:debug")
    try:
        _wait_for(lambda: b"istio-iptables-cni" in path.read_bytes())
        time.sleep(0.5)
        reads = _read_bytes(watcher.pid)
        time.sleep(1)  # about 20 rounds
        steady_reads = _read_bytes(watcher.pid) - reads
        _write(path, CALICO)  # rewritten by the network plugin
        _wait_for(lambda: b"istio-iptables-cni" in path.read_bytes())
        time.sleep(0.3)
    finally:
        stderr = _stop(watcher, log)
    bundle = executable.stat().st_size + 4 * 1024 * 1024
    assert steady_reads < bundle, "the bundle was read again while nothing changed"
    infos = [line for line in stderr.splitlines() if "\tinfo\t" in line]
    assert len([line for line in infos if "added the istio-iptables-cni entry" in line]) == 2, stderr
    assert not [line for line in infos if "nothing to change" in line], stderr


def _read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def _watch(conf_dir: Path, bin_dir: Path, executable: Path, *log_flags: str) -> tuple[subprocess.Popen[bytes], Path]:
    command = [CLI, *log_flags, "cni", "install", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir)]
    return _logged([*command, "--plugin", str(executable), "--watch", "--interval", "0.05"], conf_dir.parent)


def _logged(command: list[str], directory: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """``command`` started with its log in a file, which the test can read while it runs."""
    log = directory / "watch.log"
    with log.open("wb") as file:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=file), log


def _stop(watcher: subprocess.Popen[bytes], log: Path) -> str:
    watcher.send_signal(signal.SIGTERM)
    try:
        watcher.wait(timeout=10)
    finally:
        watcher.kill()
        watcher.wait()
    return log.read_text()


def _wait_for(condition: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def test_bad_settings_refused_by_the_function_install_and_the_plugin_share() -> None:
    with pytest.raises(ConfigError, match=r"--plugin-config.*log_level"):
        install.checked_entry({"log_level": "loud"})
