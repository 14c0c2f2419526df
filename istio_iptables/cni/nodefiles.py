"""Files on the node, written so that a runtime reading them, or a crash, sees the old bytes or the new ones
(istio#42046), and so that a link planted at a name of ours never makes us write where it points.

Every temporary name is a new random one, created exclusively in the directory it is renamed in (``mkstemp``:
O_CREAT | O_EXCL, which never follows a link); a rename replaces a link at the final name, never its target;
our own files are read with O_NOFOLLOW. Every failure of the file system is a HostError of one line.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import suppress
from pathlib import Path

from istio_iptables.errors import HostError

TEMPORARY_PREFIX = ".istio-iptables-cni."
TEMPORARY_SUFFIX = ".tmp"
"""No runtime reads a ``.tmp`` (libcni reads .conf, .conflist and .json)."""
MAX_LINKS = 40
"""Linux's own limit on the links followed in one lookup (ELOOP)."""


def failure(action: str, error: OSError) -> HostError:
    """One line: what was being done, the file the kernel named, and why."""
    where = f": {error.filename}" if error.filename and str(error.filename) not in action else ""
    return HostError(f"cannot {action}{where}: {error.strerror or error}")


def write_atomically(path: Path, content: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` (a link at that name included: the link, not its target) by ``content``: a new
    temporary file beside it, fsync, rename, fsync of the directory."""
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as error:
        raise failure(f"write {path}", error) from None
    try:
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
        with suppress(OSError):
            os.unlink(temporary)
        raise failure(f"write {path}", error) from None
    sync_dir(path.parent)


def write_config(path: Path, content: bytes, root: Path) -> None:
    """A configuration file written in place: through a link at its name, the link stays and its final target
    is replaced as atomically as a plain file (the temporary beside the target, renamed onto it)."""
    target = link_target(path, root) if path.is_symlink() else path
    mode = 0o644
    with suppress(OSError):
        mode = target.stat().st_mode & 0o7777
    write_atomically(target, content, mode)


def link_target(path: Path, root: Path) -> Path:
    """Where a chain of links at ``path`` ends, an absolute target taken as the node sees it (under ``root``,
    where the node's file system is mounted here)."""
    for _ in range(MAX_LINKS):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    raise HostError(f"cannot follow {path}: more than {MAX_LINKS} links")


def read_own(path: Path) -> bytes | None:
    """A file of ours, never through a link planted at its name (None then, as when it is missing: the next
    write replaces the link)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == 40:  # ELOOP: a link
            return None
        raise failure(f"read {path}", error) from None
    with os.fdopen(descriptor, "rb") as file:
        return file.read()


def remove(path: Path) -> bool:
    """Remove a file, link or tree of ours (a link itself, never what it points to); True when there was one."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as error:
        raise failure(f"remove {path}", error) from None
    return True


def copy_tree_atomically(source: Path, target: Path) -> None:
    """A copy of ``source`` that appears at ``target`` whole or not at all: copied into a new temporary
    directory beside it, then renamed."""
    try:
        temporary = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX, dir=target.parent))
    except OSError as error:
        raise failure(f"write {target}", error) from None
    try:
        shutil.copytree(source, temporary, symlinks=True, dirs_exist_ok=True)
        temporary.chmod(0o755)
        os.replace(temporary, target)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise failure(f"write {target}", error) from None
    sync_dir(target.parent)


def replace_with_link(link: Path, target_name: str) -> None:
    """Point ``link`` at ``target_name`` by renaming a new link over it."""
    temporary = link.with_name(f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}{TEMPORARY_SUFFIX}")
    try:
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)  # a copy made by hand, not by us
        os.symlink(target_name, temporary)  # fails, never follows, if the name is taken
        os.replace(temporary, link)
    except OSError as error:
        with suppress(OSError):
            os.unlink(temporary)
        raise failure(f"write {link}", error) from None
    sync_dir(link.parent)


def sync_dir(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        raise failure(f"sync {directory}", error) from None
