"""The CNI installer on a conf dir and bin dir made in the test: what a node's /etc/cni/net.d and /opt/cni/bin
go through when the DaemonSet installs, re-installs and uninstalls the plugin, and when other agents write
the same files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from istio_iptables.cni import install
from istio_iptables.errors import ConfigError, HostError
from tests.helpers import fake_cni_plugin, run_cli

CLI = str(Path(sys.executable).with_name("istio-iptables"))

BRIDGE_CONF = b"""{
    "cniVersion": "0.3.1",
    "name": "k8s-pod-network",
    "type": "bridge", "bridge": "cni0", "isGateway": true,
    "ipam": {"type": "host-local", "subnet": "198.18.0.0/24"}
}
"""
CALICO_CONFLIST = b"""{"name":"k8s-pod-network","cniVersion":"1.0.0","plugins":[
 {"type":"calico","log_level":"info","datastore_type":"kubernetes"},
 {"type":"portmap","snat":true,"capabilities":{"portMappings":true}}]}
"""
SETTINGS = {"exclude_namespaces": ["kube-system"], "log_level": "info"}


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path, Path]:
    conf_dir, bin_dir = tmp_path / "net.d", tmp_path / "bin"
    conf_dir.mkdir()
    bin_dir.mkdir()
    return conf_dir, bin_dir, fake_cni_plugin(tmp_path / "istio-iptables-cni.build")


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(directory.iterdir())}


def _plugins(path: Path) -> list[dict[str, object]]:
    document = json.loads(path.read_bytes())
    assert isinstance(document["plugins"], list)
    return document["plugins"]


def test_a_single_plugin_conf_becomes_a_conflist_ending_with_our_entry(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)

    changes = install.install(conf_dir, bin_dir, plugin, SETTINGS)

    assert not (conf_dir / "10-bridge.conf").exists()
    document = json.loads((conf_dir / "10-bridge.conflist").read_bytes())
    assert (document["cniVersion"], document["name"]) == ("0.3.1", "k8s-pod-network")
    assert document["plugins"][0] == json.loads(BRIDGE_CONF)
    assert document["plugins"][1] == {
        "type": "istio-iptables-cni",
        **SETTINGS,
        "capabilities": {"io.kubernetes.cri.pod-annotations": True, "dns": True},
    }
    assert (bin_dir / "istio-iptables-cni").read_bytes() == plugin.read_bytes()
    assert os.access(bin_dir / "istio-iptables-cni", os.X_OK)
    assert len(changes) == 2


def test_a_conflist_keeps_its_plugins_and_cni_version(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-calico.conflist").write_bytes(CALICO_CONFLIST)

    install.install(conf_dir, bin_dir, plugin, {})

    document = json.loads((conf_dir / "10-calico.conflist").read_bytes())
    assert document["cniVersion"] == "1.0.0"
    assert document["plugins"][:2] == json.loads(CALICO_CONFLIST)["plugins"]
    assert [entry["type"] for entry in document["plugins"]] == ["calico", "portmap", "istio-iptables-cni"]


def test_only_the_first_configuration_file_is_changed(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "05-calico.conflist").write_bytes(CALICO_CONFLIST)
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    (conf_dir / "00-notes.txt").write_bytes(b"not a configuration")

    install.install(conf_dir, bin_dir, plugin, {})

    assert [entry["type"] for entry in _plugins(conf_dir / "05-calico.conflist")][-1] == "istio-iptables-cni"
    assert (conf_dir / "10-bridge.conf").read_bytes() == BRIDGE_CONF
    assert (conf_dir / "00-notes.txt").read_bytes() == b"not a configuration"


def test_running_install_again_changes_nothing(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    install.install(conf_dir, bin_dir, plugin, SETTINGS)
    before = (_snapshot(conf_dir), _snapshot(bin_dir))

    assert install.install(conf_dir, bin_dir, plugin, SETTINGS) == []
    assert (_snapshot(conf_dir), _snapshot(bin_dir)) == before


@pytest.mark.parametrize("original", [("10-bridge.conf", BRIDGE_CONF), ("10-calico.conflist", CALICO_CONFLIST)])
def test_uninstall_restores_the_file_byte_for_byte_and_removes_the_plugin(
    node: tuple[Path, Path, Path], original: tuple[str, bytes]
) -> None:
    conf_dir, bin_dir, plugin = node
    name, content = original
    (conf_dir / name).write_bytes(content)
    install.install(conf_dir, bin_dir, plugin, SETTINGS)
    install.install(conf_dir, bin_dir, plugin, {"log_level": "debug"})  # a re-install with other settings

    install.uninstall(conf_dir, bin_dir)

    assert sorted(path.name for path in conf_dir.iterdir()) == [name]
    assert (conf_dir / name).read_bytes() == content
    assert list(bin_dir.iterdir()) == []


def test_uninstall_with_nothing_installed_succeeds_and_changes_nothing(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, _ = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    before = _snapshot(conf_dir)

    assert install.uninstall(conf_dir, bin_dir) == []
    assert install.uninstall(conf_dir, bin_dir) == []
    assert _snapshot(conf_dir) == before


def test_changed_settings_replace_our_entry_where_it_stands(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    path = conf_dir / "10-calico.conflist"
    path.write_bytes(CALICO_CONFLIST)
    install.install(conf_dir, bin_dir, plugin, {"log_level": "info"})
    # Another chained plugin's installer appended itself after us.
    document = json.loads(path.read_bytes())
    document["plugins"].append({"type": "bandwidth"})
    path.write_text(json.dumps(document))

    install.install(conf_dir, bin_dir, plugin, {"log_level": "debug"})
    types = [(entry["type"], entry.get("log_level")) for entry in _plugins(path)]
    assert types == [("calico", "info"), ("portmap", None), ("istio-iptables-cni", "debug"), ("bandwidth", None)]
    # And leaves it there: no tug of war with the other installer.
    assert install.install(conf_dir, bin_dir, plugin, {"log_level": "debug"}) == []


def test_duplicate_entries_collapse_to_one(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    path = conf_dir / "10-calico.conflist"
    document = json.loads(CALICO_CONFLIST)
    document["plugins"] += [{"type": "istio-iptables-cni"}, {"type": "istio-iptables-cni", "old": True}]
    path.write_text(json.dumps(document))

    install.install(conf_dir, bin_dir, plugin, {})

    assert [entry["type"] for entry in _plugins(path)].count("istio-iptables-cni") == 1


def test_a_rewrite_by_the_network_plugin_gets_our_entry_back_and_uninstall_keeps_the_rewrite(
    node: tuple[Path, Path, Path],
) -> None:
    conf_dir, bin_dir, plugin = node
    path = conf_dir / "10-calico.conflist"
    path.write_bytes(CALICO_CONFLIST)
    install.install(conf_dir, bin_dir, plugin, {})
    rewritten = CALICO_CONFLIST.replace(b'"info"', b'"debug"')
    path.write_bytes(rewritten)  # Calico restarts and writes its file anew, without us

    install.install(conf_dir, bin_dir, plugin, {})
    assert [entry["type"] for entry in _plugins(path)] == ["calico", "portmap", "istio-iptables-cni"]

    install.uninstall(conf_dir, bin_dir)
    assert path.read_bytes() == rewritten


def test_uninstall_after_another_agent_edited_our_file_removes_only_our_entry(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    path = conf_dir / "10-calico.conflist"
    path.write_bytes(CALICO_CONFLIST)
    install.install(conf_dir, bin_dir, plugin, {})
    document = json.loads(path.read_bytes())
    document["plugins"].insert(2, {"type": "bandwidth"})
    path.write_text(json.dumps(document))

    install.uninstall(conf_dir, bin_dir)

    assert [entry["type"] for entry in _plugins(path)] == ["calico", "portmap", "bandwidth"]


def test_no_configuration_yet_is_an_error_that_creates_nothing(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    with pytest.raises(HostError, match=r"no CNI configuration in .* yet"):
        install.install(conf_dir, bin_dir, plugin, {})
    assert list(conf_dir.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b'{"plugins": {"type": "x"}}'])
def test_an_unreadable_configuration_is_refused_untouched(node: tuple[Path, Path, Path], content: bytes) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-broken.conflist").write_bytes(content)
    before = _snapshot(conf_dir)
    with pytest.raises(HostError, match=r"cannot read the CNI configuration .*10-broken.conflist"):
        install.install(conf_dir, bin_dir, plugin, {})
    assert _snapshot(conf_dir) == before


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    node: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-calico.conflist").write_bytes(CALICO_CONFLIST)
    real_replace = os.replace

    def refuse_the_configuration(source: str | Path, target: str | Path) -> None:
        if str(target).endswith(".conflist"):
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", refuse_the_configuration)
    with pytest.raises(HostError, match=r"cannot write .*10-calico.conflist: No space left on device"):
        install.install(conf_dir, bin_dir, plugin, {})
    assert (conf_dir / "10-calico.conflist").read_bytes() == CALICO_CONFLIST
    assert not any(path.name.endswith(".tmp") for path in [*conf_dir.iterdir(), *bin_dir.iterdir()])


def test_the_state_file_is_never_read_as_a_configuration(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    install.install(conf_dir, bin_dir, plugin, {})
    extras = [path.name for path in conf_dir.iterdir() if path.name != "10-bridge.conflist"]
    assert extras == [install.STATE_FILE]
    assert not extras[0].endswith(install.CONFIG_SUFFIXES)


def test_concurrent_installers_write_one_entry(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    command = [CLI, "cni", "install", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir)]
    command += ["--plugin", str(plugin)]
    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(lambda _: subprocess.run(command, capture_output=True, timeout=60, check=False), range(8)))
    assert [run.returncode for run in runs] == [0] * 8, [run.stderr for run in runs]
    assert [entry["type"] for entry in _plugins(conf_dir / "10-bridge.conflist")] == ["bridge", "istio-iptables-cni"]
    install.uninstall(conf_dir, bin_dir)
    assert (conf_dir / "10-bridge.conf").read_bytes() == BRIDGE_CONF


def test_watch_reinstalls_after_a_rewrite_and_stops_on_sigterm_leaving_the_plugin(
    node: tuple[Path, Path, Path],
) -> None:
    conf_dir, bin_dir, plugin = node
    path = conf_dir / "10-calico.conflist"
    command = [CLI, "cni", "install", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir)]
    watcher = subprocess.Popen(
        [*command, "--plugin", str(plugin), "--watch", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # Started before the network plugin wrote its file: it waits, then installs.
        time.sleep(0.3)
        path.write_bytes(CALICO_CONFLIST)
        _wait_for(lambda: b"istio-iptables-cni" in path.read_bytes())
        path.write_bytes(CALICO_CONFLIST)  # rewritten by Calico
        _wait_for(lambda: b"istio-iptables-cni" in path.read_bytes())
        watcher.send_signal(signal.SIGTERM)
        _, stderr = watcher.communicate(timeout=5)
    finally:
        watcher.kill()
        watcher.wait()
    assert watcher.returncode == 0, stderr
    assert b"Traceback" not in stderr
    assert [entry["type"] for entry in _plugins(path)] == ["calico", "portmap", "istio-iptables-cni"]
    assert (bin_dir / "istio-iptables-cni").exists()


def test_the_agent_file_names_the_socket_while_an_agent_runs_and_goes_with_it(node: tuple[Path, Path, Path]) -> None:
    """The client reads the agent's socket from a file beside it: written when the installer is told an
    agent runs, rewritten when the socket moves, removed by an install without one and by uninstall."""
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    agent_file = bin_dir / install.AGENT_FILE
    arguments = ["cni", "install", "--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir)]
    arguments += ["--plugin", str(plugin)]

    first = run_cli([*arguments, "--agent-socket", "/var/run/istio-iptables-cni/agent.sock"])
    assert first.code == 0, first
    assert agent_file.read_text() == "/var/run/istio-iptables-cni/agent.sock\n"
    assert install.install(conf_dir, bin_dir, plugin, {}, agent_socket="/var/run/istio-iptables-cni/agent.sock") == []
    install.install(conf_dir, bin_dir, plugin, {}, agent_socket="/run/other/agent.sock")
    assert agent_file.read_text() == "/run/other/agent.sock\n"
    assert install.install(conf_dir, bin_dir, plugin, {}) == [f"removed {agent_file}"]
    assert not agent_file.exists()
    install.install(conf_dir, bin_dir, plugin, {}, agent_socket="/run/other/agent.sock")
    install.uninstall(conf_dir, bin_dir)
    assert sorted(path.name for path in bin_dir.iterdir()) == []


def _wait_for(condition: object, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.02)


def test_settings_cannot_take_over_the_type_or_capabilities() -> None:
    with pytest.raises(ConfigError, match="--plugin-config: sets capabilities, type"):
        install.plugin_entry({"type": "bridge", "capabilities": {}})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--cni-conf-dir", "/nonexistent/net.d", "--cni-bin-dir", "{bin}"], "--cni-conf-dir: '/nonexistent/net.d'"),
        (["--cni-conf-dir", "{conf}", "--cni-bin-dir", "/nonexistent/bin"], "--cni-bin-dir: '/nonexistent/bin'"),
        (["--cni-conf-dir", "{conf}", "--cni-bin-dir", "{bin}", "--plugin", "/nonexistent/p"], "--plugin:"),
        (["--cni-conf-dir", "{conf}", "--cni-bin-dir", "{bin}", "--plugin-config", "{bad}"], "--plugin-config:"),
        (["--cni-conf-dir", "{conf}", "--cni-bin-dir", "{bin}", "--watch", "--interval", "0"], "--interval: '0'"),
        (["--cni-conf-dir", "{conf}", "--cni-bin-dir", "{bin}", "--agent-socket", "agent.sock"], "--agent-socket: "),
    ],
)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    node: tuple[Path, Path, Path], tmp_path: Path, arguments: list[str], message: str
) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    bad = tmp_path / "settings.json"
    bad.write_text("[]")
    before = (_snapshot(conf_dir), _snapshot(bin_dir))
    values = {"conf": str(conf_dir), "bin": str(bin_dir), "bad": str(bad)}
    filled = [argument.format(**values) for argument in arguments]
    if "--plugin" not in filled:
        filled += ["--plugin", str(plugin)]

    result = run_cli(["cni", "install", *filled])

    assert result.code == 2, result
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert (_snapshot(conf_dir), _snapshot(bin_dir)) == before


@pytest.fixture
def account(tmp_path: Path) -> install.ServiceAccount:
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    (directory / "token").write_text("token-one\n")
    (directory / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    return install.ServiceAccount(directory, "https://[2001:db8::1]:443", "/etc/cni/net.d")


def test_the_plugin_gets_a_kubeconfig_of_the_service_account(
    node: tuple[Path, Path, Path], account: install.ServiceAccount
) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)

    install.install(conf_dir, bin_dir, plugin, SETTINGS, account)

    kubeconfig = conf_dir / install.KUBECONFIG_FILE
    assert kubeconfig.stat().st_mode & 0o777 == 0o600
    document = json.loads(kubeconfig.read_bytes())
    assert document["users"][0]["user"] == {"token": "token-one"}
    assert document["clusters"][0]["cluster"]["server"] == "https://[2001:db8::1]:443"
    [*_, entry] = _plugins(conf_dir / "10-bridge.conflist")
    assert entry["kubernetes"] == {"kubeconfig": f"/etc/cni/net.d/{install.KUBECONFIG_FILE}"}
    assert install.install(conf_dir, bin_dir, plugin, SETTINGS, account) == []

    (account.directory / "token").write_text("token-two\n")  # Kubernetes rotated it
    assert install.install(conf_dir, bin_dir, plugin, SETTINGS, account) == [f"wrote {kubeconfig}"]
    assert json.loads(kubeconfig.read_bytes())["users"][0]["user"] == {"token": "token-two"}

    install.uninstall(conf_dir, bin_dir)
    assert sorted(path.name for path in conf_dir.iterdir()) == ["10-bridge.conf"]


def test_the_kubeconfig_setting_belongs_to_write_kubeconfig(
    node: tuple[Path, Path, Path], account: install.ServiceAccount
) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    with pytest.raises(ConfigError, match="sets kubernetes, which --write-kubeconfig owns"):
        install.install(conf_dir, bin_dir, plugin, {"kubernetes": {}}, account)


def test_write_kubeconfig_outside_a_pod_is_one_line_exit_2(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, plugin = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    arguments = ["--cni-conf-dir", str(conf_dir), "--cni-bin-dir", str(bin_dir), "--plugin", str(plugin)]
    result = run_cli(["cni", "install", *arguments, "--write-kubeconfig"], env={"KUBERNETES_SERVICE_HOST": ""})
    assert (result.code, result.stderr.count("\n")) == (2, 1)
    assert "--write-kubeconfig needs KUBERNETES_SERVICE_HOST" in result.stderr
    assert sorted(path.name for path in conf_dir.iterdir()) == ["10-bridge.conf"]


def test_a_onedir_build_is_installed_with_its_contents_switched_whole(node: tuple[Path, Path, Path]) -> None:
    conf_dir, bin_dir, _ = node
    (conf_dir / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    build = conf_dir.parent / "dist"
    (build / "istio-iptables-cni.d" / "lib").mkdir(parents=True)
    plugin = fake_cni_plugin(build / "istio-iptables-cni", "bootloader")
    (build / "istio-iptables-cni.d" / "lib" / "libpython.so").write_bytes(b"one")

    install.install(conf_dir, bin_dir, plugin, {})
    link = bin_dir / "istio-iptables-cni.d"
    assert (link / "lib" / "libpython.so").read_bytes() == b"one"
    first = link.resolve()
    assert link.is_symlink() and first.parent == bin_dir
    assert install.install(conf_dir, bin_dir, plugin, {}) == []

    (build / "istio-iptables-cni.d" / "lib" / "libpython.so").write_bytes(b"two")  # a new release
    install.install(conf_dir, bin_dir, plugin, {})
    assert (link / "lib" / "libpython.so").read_bytes() == b"two"
    assert link.resolve() != first and not first.exists()
    installed = sorted(path.name for path in bin_dir.iterdir())
    assert installed == sorted(["istio-iptables-cni", link.name, link.resolve().name])

    install.uninstall(conf_dir, bin_dir)
    assert list(bin_dir.iterdir()) == []
