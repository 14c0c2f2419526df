"""Detection of the libiptc backend: what it says when it cannot be used. No kernel: python-iptables, the
nft listing and the legacy tables are stand-ins here (python-iptables is never imported by the test runner;
the kernel tests in tests/kernel/test_libiptc.py use the real one, inside namespaces)."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from istio_iptables.backends import libiptc
from istio_iptables.capture.config import IptablesVariant
from istio_iptables.capture.model import Family
from istio_iptables.errors import ApplyError, MissingExtraError


class FakeIPTCError(Exception):
    pass


def fake_iptc(opens: bool) -> Any:
    class Table:
        def __init__(self, name: str, autocommit: bool = False) -> None:
            if not opens:
                raise FakeIPTCError(f"can't initialize {name}: Table does not exist (do you need to insmod?)")

        def refresh(self) -> None:
            pass

        def close(self) -> None:
            pass

    return SimpleNamespace(Table=Table, Table6=Table, IPTCError=FakeIPTCError)


def listing(stdout: str) -> Any:
    return lambda arguments, stdin, environment: subprocess.CompletedProcess(arguments, 0, stdout, "")


def test_without_python_iptables_the_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Any:
        raise ModuleNotFoundError("No module named 'iptc'", name="iptc")

    monkeypatch.setattr(libiptc, "_import_iptc", missing)
    monkeypatch.delenv("XTABLES_LIBDIR", raising=False)  # set on the way, undone after the test
    libiptc._iptc.cache_clear()  # an earlier test may have imported it for real
    with pytest.raises(
        MissingExtraError, match=r"^--backend libiptc needs the libiptc extra: pip install 'istio-iptables\[libiptc\]'$"
    ):
        libiptc.detect(Family.V4, {})


def test_rules_in_nf_tables_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libiptc, "_iptc", lambda: fake_iptc(opens=True))
    monkeypatch.setattr(libiptc, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(libiptc, "_run", listing("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j RETURN\nCOMMIT\n"))
    with pytest.raises(ApplyError) as refused:
        libiptc.detect(Family.V6, {})
    message = str(refused.value)
    assert "rules of this namespace are in nf_tables" in message and "ip6tables-nft-save" in message
    assert "the libiptc backend writes legacy tables only" in message


def test_unusable_legacy_tables_are_named_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libiptc, "_iptc", lambda: fake_iptc(opens=False))
    monkeypatch.setattr(libiptc, "which", lambda name: None)
    with pytest.raises(ApplyError) as refused:
        libiptc.detect(Family.V4, {})
    message = str(refused.value)
    assert "legacy x_tables (ip_tables)" in message and "cannot open the nat table" in message
    assert "--backend restore" in message


def test_empty_nft_tables_and_usable_legacy_tables_detect_legacy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(libiptc, "_iptc", lambda: fake_iptc(opens=True))
    monkeypatch.setattr(libiptc, "which", lambda name: f"/usr/sbin/{name}")
    monkeypatch.setattr(libiptc, "_run", listing("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"))
    monkeypatch.setattr(libiptc, "_save", lambda family, variant, environment: "*nat\nCOMMIT\n")
    found = libiptc.detect(Family.V4, {"XTABLES_LOCKFILE": "/tmp/x.lock"})
    assert isinstance(found, libiptc.Libiptc)
    assert (found.variant, found.saved, found.environment) == (
        IptablesVariant.LEGACY,
        "*nat\nCOMMIT\n",
        {"XTABLES_LOCKFILE": "/tmp/x.lock"},
    )
    with pytest.raises(ValueError, match="legacy tables only"):
        libiptc.Libiptc(Family.V4, IptablesVariant.NFT, "", {})


def test_the_test_runner_never_loads_python_iptables() -> None:
    """python-iptables acts on the namespace of the process that loads it: only processes inside test
    namespaces may."""
    assert "iptc" not in sys.modules


def test_library_names_are_read_from_one_ldconfig_listing_as_ctypes_reads_it() -> None:
    listing = (
        "4 libs found in cache `/etc/ld.so.cache'\n"
        "\tlibxtables.so.12 (libc6,x86-64) => /lib/x86_64-linux-gnu/libxtables.so.12\n"
        "\tlibip4tc.so.2 (libc6,x86-64) => /lib/x86_64-linux-gnu/libip4tc.so.2\n"
        "\tlibc.so.6 (libc6) => /lib/i386-linux-gnu/libc.so.6\n"
        "\tlibc.so.6 (libc6,x86-64, OS ABI: Linux 3.2.0) => /lib/x86_64-linux-gnu/libc.so.6\n"
        "\tlibcrypt.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcrypt.so.1\n"
    )
    found = libiptc._sonames(listing)
    if os.uname().machine == "x86_64":
        assert found == {
            "xtables": "libxtables.so.12",
            "ip4tc": "libip4tc.so.2",
            "c": "libc.so.6",
            "crypt": "libcrypt.so.1",
        }
    real = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    import ctypes.util  # noqa: PLC0415

    for name in ("c", "xtables", "ip4tc", "ip6tc"):
        assert libiptc._sonames(real).get(name) == ctypes.util.find_library(name), name
