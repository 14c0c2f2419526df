"""An exclusive file lock with a bounded wait: our run lock, and the xtables lock libiptc must take."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ApplyError


@contextmanager
def held(path: str, timeout: float, what: str, hint: str = "") -> Iterator[None]:
    """Hold ``path`` locked (flock, exclusive) while the block runs; give up after ``timeout`` seconds.
    ``what`` names the lock in errors, ``hint`` says what to do when it cannot be opened."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise ApplyError(f"cannot open {what} {path}: {error.strerror}{hint}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ApplyError(f"another run held {what} {path} for {timeout:.0f} s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(descriptor)
