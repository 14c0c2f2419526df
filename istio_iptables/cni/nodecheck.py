"""Whether the node can run the self-contained plugin, checked before any configuration names it: a plugin
that cannot start fails every pod's network set-up on the node.

The build states what it needs: scripts/build-cni-plugin reads the highest ``GLIBC_x.y`` symbol version its
executable and libraries require (``objdump -T``) and writes it into the bundle (``REQUIREMENTS_FILE``). The
node's C library is read where the node keeps it, under the node's root as mounted here (the installer's own
container has a C library of its own, which says nothing of the node's). Then the installed executable is run
as a runtime runs it, with ``CNI_COMMAND=VERSION``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from istio_iptables.cni import nodefiles
from istio_iptables.errors import HostError

REQUIREMENTS_FILE = "node-requirements.json"
"""In the bundle's contents directory: ``{"glibc": "2.36"}``, written by scripts/build-cni-plugin."""
C_LIBRARY_PLACES = (
    "lib/x86_64-linux-gnu",
    "lib/aarch64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "lib64",
    "usr/lib64",
    "lib",
    "usr/lib",
)
"""Where distributions keep ``libc.so.6``: Debian and Ubuntu by architecture, RHEL, Amazon Linux, COS and
Flatcar in lib64, Arch and others in lib."""
_GLIBC_BANNER = re.compile(rb"GNU C Library [^\n\0]*?version (\d+)\.(\d+)")
VERSION_TIMEOUT = 30.0


def required_glibc(contents: Path) -> tuple[int, int] | None:
    """The glibc the build needs, as the build stated it; None when the bundle states nothing (a build
    without a contents directory, such as a static executable)."""
    path = contents / REQUIREMENTS_FILE
    try:
        document = json.loads(path.read_bytes())
        return _version(str(document["glibc"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise HostError(f"cannot read {path}: {error}") from None


def node_glibc(root: Path) -> tuple[int, int] | None:
    """The version of the node's GNU C library, from the banner in its ``libc.so.6``; None when the node
    has none where distributions keep it (musl, or no C library at all)."""
    for place in C_LIBRARY_PLACES:
        candidate = root / place / "libc.so.6"
        if not os.path.lexists(candidate):
            continue
        try:
            content = nodefiles.link_target(candidate, root).read_bytes()
        except OSError:
            continue
        match = _GLIBC_BANNER.search(content)
        if match:
            return int(match.group(1)), int(match.group(2))
    return None


def check_c_library(contents: Path, root: Path) -> None:
    """Refuse, naming what is missing, when the node's glibc is older than the build's."""
    needed = required_glibc(contents)
    if needed is None:
        return
    found = node_glibc(root)
    wanted = f"{needed[0]}.{needed[1]}"
    if found is None:
        raise HostError(
            f"the node cannot run the plugin: it needs GNU C library {wanted} or newer and "
            f"none was found under {root} ({', '.join(C_LIBRARY_PLACES)}); nothing installed"
        )
    if found < needed:
        raise HostError(
            f"the node cannot run the plugin: it needs GNU C library {wanted} or newer, "
            f"the node has {found[0]}.{found[1]}; nothing installed"
        )


def check_runs(executable: Path) -> None:
    """Run the installed plugin as a runtime would for VERSION; refuse with its first line of error when it
    does not answer with the versions it supports."""
    try:
        answer = subprocess.run(
            [str(executable)],
            input=b'{"cniVersion": "1.0.0"}',
            capture_output=True,
            env={"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
            timeout=VERSION_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise HostError(f"the installed plugin {executable} does not run: {_reason(error)}") from None
    if answer.returncode != 0 or not _lists_versions(answer.stdout):
        said = (answer.stderr or answer.stdout).decode(errors="replace").strip().splitlines()
        raise HostError(
            f"the installed plugin {executable} does not answer VERSION (exit {answer.returncode}"
            + (f": {said[0][:200]}" if said else "")
            + "); the configuration is left without it"
        )


def _lists_versions(output: bytes) -> bool:
    try:
        document = json.loads(output)
    except ValueError:
        return False
    return isinstance(document, dict) and isinstance(document.get("supportedVersions"), list)


def _reason(error: OSError | subprocess.TimeoutExpired) -> str:
    if isinstance(error, subprocess.TimeoutExpired):
        return f"no answer to VERSION within {VERSION_TIMEOUT:g} s"
    return error.strerror or str(error)


def _version(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"'{text}' is not a glibc version (MAJOR.MINOR)")
    return int(match.group(1)), int(match.group(2))
