"""Exclusive file locks with a bounded wait: our run lock (one byte of one shared file per namespace), and
the xtables lock libiptc must take (the whole file, as iptables takes it)."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from istio_iptables.errors import ApplyError


@contextmanager
def held(path: str, timeout: float, what: str, hint: str = "", byte: int | None = None) -> Iterator[None]:
    """Hold ``path`` locked while the block runs; give up after ``timeout`` seconds. The whole file (flock,
    what iptables takes), or with ``byte``, that one byte of it (a POSIX record lock): one file then serves
    any number of independent locks, so none piles up. ``what`` names the lock in errors, ``hint`` says what
    to do when it cannot be opened."""
    try:
        descriptor = os.open(path, (os.O_RDONLY if byte is None else os.O_RDWR) | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise ApplyError(f"cannot open {what} {path}: {error.strerror}{hint}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if byte is None:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
                break
            except (BlockingIOError, PermissionError):  # a record lock held elsewhere may say EACCES
                if time.monotonic() > deadline:
                    raise ApplyError(f"another run held {what} {path} for {timeout:.0f} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(descriptor)
