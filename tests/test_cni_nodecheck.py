"""The installer refuses a node that cannot run the self-contained plugin, before any configuration names it:
a C library older than the build needs (read from the node's root, here fake node trees), or an installed
executable that does not answer VERSION. Either way the configuration is left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from istio_iptables.cni import install, nodecheck
from istio_iptables.errors import HostError
from tests.helpers import fake_cni_plugin, run_cli

CALICO = b'{"name": "k8s", "cniVersion": "1.0.0", "plugins": [{"type": "calico"}]}'


def _libc(version: str) -> bytes:
    """What matters of a libc.so.6: the banner ``gnu_get_libc_version`` and ``ldd --version`` print from."""
    banner = f"GNU C Library (GNU libc) stable release version {version}.\nCopyright (C) 2023 Free Software"
    return b"\x7fELF" + b"\0" * 64 + banner.encode() + b"\0" * 16


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A node root (its conf and bin dirs inside) and a onedir build that needs glibc 2.36."""
    root = tmp_path / "host"
    conf_dir, bin_dir = root / "etc/cni/net.d", root / "opt/cni/bin"
    conf_dir.mkdir(parents=True)
    bin_dir.mkdir(parents=True)
    (conf_dir / "10-calico.conflist").write_bytes(CALICO)
    build = tmp_path / "dist"
    (build / "istio-iptables-cni.d").mkdir(parents=True)
    (build / "istio-iptables-cni.d" / nodecheck.REQUIREMENTS_FILE).write_text('{"glibc": "2.36"}\n')
    return root, conf_dir, bin_dir, fake_cni_plugin(build / "istio-iptables-cni")


@pytest.mark.parametrize(
    ("place", "version"),
    [
        ("lib64/libc.so.6", "2.34"),  # RHEL 9, Amazon Linux 2023
        ("lib/x86_64-linux-gnu/libc.so.6", "2.31"),  # Debian 11, Ubuntu 20.04
        ("usr/lib64/libc.so.6", "2.26"),  # Amazon Linux 2
    ],
)
def test_an_older_node_glibc_is_refused_one_line_naming_both_and_nothing_changes(
    node: tuple[Path, Path, Path, Path], place: str, version: str
) -> None:
    root, conf_dir, bin_dir, plugin = node
    (root / place).parent.mkdir(parents=True, exist_ok=True)
    (root / place).write_bytes(_libc(version))
    arguments = ["--cni-conf-dir", "/etc/cni/net.d", "--cni-bin-dir", "/opt/cni/bin", "--plugin", str(plugin)]

    result = run_cli(["cni", "install", *arguments, "--node-root", str(root)])

    assert result.code == 1, result
    assert len(result.stderr.splitlines()) == 1
    assert "GNU C library 2.36 or newer" in result.stderr and f"the node has {version}" in result.stderr
    assert (conf_dir / "10-calico.conflist").read_bytes() == CALICO
    assert list(bin_dir.iterdir()) == []


def test_a_node_glibc_as_new_as_the_build_is_accepted_through_links(node: tuple[Path, Path, Path, Path]) -> None:
    root, conf_dir, bin_dir, plugin = node
    (root / "usr/lib64").mkdir(parents=True)
    (root / "usr/lib64/libc-2.39.so").write_bytes(_libc("2.39"))
    (root / "lib64").symlink_to("/usr/lib64")  # absolute: the node's own /usr/lib64, under the root here
    (root / "usr/lib64/libc.so.6").symlink_to("libc-2.39.so")

    assert nodecheck.node_glibc(root) == (2, 39)
    install.install(conf_dir, bin_dir, plugin, {}, root=root)
    assert b"istio-iptables-cni" in (conf_dir / "10-calico.conflist").read_bytes()


def test_a_node_without_glibc_is_refused(node: tuple[Path, Path, Path, Path]) -> None:
    root, conf_dir, bin_dir, plugin = node
    (root / "lib").mkdir()
    (root / "lib/ld-musl-x86_64.so.1").write_bytes(b"musl")
    with pytest.raises(HostError, match=r"needs GNU C library 2\.36 or newer and none was found under"):
        install.install(conf_dir, bin_dir, plugin, {}, root=root)
    assert (conf_dir / "10-calico.conflist").read_bytes() == CALICO


def test_a_build_that_states_no_requirement_needs_no_c_library(node: tuple[Path, Path, Path, Path]) -> None:
    root, conf_dir, bin_dir, plugin = node
    (plugin.with_name("istio-iptables-cni.d") / nodecheck.REQUIREMENTS_FILE).unlink()
    install.install(conf_dir, bin_dir, plugin, {}, root=root)
    assert b"istio-iptables-cni" in (conf_dir / "10-calico.conflist").read_bytes()


@pytest.mark.parametrize(
    ("script", "said"),
    [
        ("echo 'error while loading shared libraries: libz.so.1' >&2; exit 127", "libz.so.1"),
        ("echo 'not JSON'", "not JSON"),
        ('echo \'{"cniVersion": "1.0.0"}\'', "exit 0"),
    ],
)
def test_an_installed_plugin_that_does_not_answer_version_is_refused_before_the_configuration(
    node: tuple[Path, Path, Path, Path], script: str, said: str
) -> None:
    root, conf_dir, bin_dir, plugin = node
    (plugin.with_name("istio-iptables-cni.d") / nodecheck.REQUIREMENTS_FILE).unlink()
    plugin.write_text(f"#!/bin/sh\n{script}\n")
    with pytest.raises(HostError, match=rf"installed plugin .* does not answer VERSION .*{said}"):
        install.install(conf_dir, bin_dir, plugin, {}, root=root)
    assert (conf_dir / "10-calico.conflist").read_bytes() == CALICO


def test_an_installed_plugin_that_cannot_be_executed_is_refused(node: tuple[Path, Path, Path, Path]) -> None:
    root, conf_dir, bin_dir, plugin = node
    (plugin.with_name("istio-iptables-cni.d") / nodecheck.REQUIREMENTS_FILE).unlink()
    plugin.write_bytes(b"\x7fELF for another machine")
    with pytest.raises(HostError, match=r"installed plugin .* does not run: Exec format error"):
        install.install(conf_dir, bin_dir, plugin, {}, root=root)
    assert (conf_dir / "10-calico.conflist").read_bytes() == CALICO


def test_a_malformed_requirement_is_one_line(node: tuple[Path, Path, Path, Path]) -> None:
    root, conf_dir, bin_dir, plugin = node
    (plugin.with_name("istio-iptables-cni.d") / nodecheck.REQUIREMENTS_FILE).write_text(json.dumps({"glibc": "2"}))
    with pytest.raises(HostError, match=r"node-requirements.json: '2' is not a glibc version"):
        install.install(conf_dir, bin_dir, plugin, {}, root=root)
