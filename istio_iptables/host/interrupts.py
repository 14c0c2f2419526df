"""SIGINT and SIGTERM stop a run cleanly, never in the middle of a change to the namespace.

The console program installs the handlers before it imports anything else (``install``). Then a signal:
- before the run has started: nothing can have been done, the program exits at once with one line;
- during the run, outside a change: the run stops with ``StoppedBySignalError`` (one line, exit 130 for
  SIGINT, 143 for SIGTERM), unwinding as any error does (a lock is let go, a read's child process killed);
- inside a change (``held``: from taking the namespace's lock to letting go of it): it waits for the change to
  end, applied, or rolled back after a failure, and stops the run then; ``checkpoint`` stops it early where
  nothing has been changed yet;
- once the run has its result (``finish``): it is blocked, so the result and its exit code stand.
So an interrupted run leaves the namespace as it was or as planned, never a mix, and prints no traceback.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from istio_iptables.errors import PROG, IstioIptablesError, StoppedBySignalError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Process:
    """What the handler must know about this process: the one mutable state of this module."""

    installed = False
    running = False
    depth = 0
    """How many ``held`` blocks are open."""
    pending: signal.Signals | None = None
    """The signal that arrived in a ``held`` block, to act on when it closes."""
    changed = False
    """Whether a ``held`` block has completed: the namespace then holds what the run made of it."""


_process = _Process()


def install() -> None:
    """The console program's handlers, for the life of the process (a library caller keeps its own). A signal
    the parent ignores (a shell's background job, nohup) stays ignored."""
    for number in _SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:
            signal.signal(number, _on_signal)
    _process.installed = True


def start() -> None:
    """The run begins: from now on a signal unwinds it as an error."""
    _process.running, _process.changed, _process.pending = True, False, None


def finish() -> None:
    """The run has its result: a later signal must not change it, or interrupt the line that reports it."""
    _process.running = False
    if _process.installed:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


@contextmanager
def held() -> Iterator[None]:
    """A change to the namespace: a signal arriving inside waits until the block ends."""
    _process.depth += 1
    failure: IstioIptablesError | None = None
    try:
        yield
        _process.changed = True
    except IstioIptablesError as error:
        failure = error
        raise
    finally:
        _process.depth -= 1
        if not _process.depth and _process.pending:
            raise _stop(str(failure) if failure else "the change in progress was completed first")


def checkpoint() -> None:
    """Stop now if a signal came while nothing has been changed yet (the next step is the first change)."""
    if _process.pending:
        raise _stop("nothing was changed")


def _on_signal(number: int, frame: FrameType | None) -> None:
    received = signal.Signals(number)
    if _process.depth:
        _process.pending = _process.pending or received
    elif _process.running:
        _process.pending = received
        raise _stop("the change was already complete" if _process.changed else "nothing was changed")
    else:  # before the run: nothing done, nothing to unwind; os.write, as print may be mid-write
        os.write(2, f"{PROG}: stopped by {received.name}: nothing was changed\n".encode())
        os._exit(128 + number)


def _stop(detail: str) -> StoppedBySignalError:
    """The error for the pending signal, which it consumes."""
    number = _process.pending or signal.SIGINT
    _process.pending = None
    return StoppedBySignalError(number.name, number.value, detail)
