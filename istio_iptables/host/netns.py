"""Entering the network namespace to work in, before any change to the system."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from istio_iptables.errors import ApplyError, ConfigError

NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000


def namespace_path(name_or_path: str) -> str:
    """A name is looked up under /var/run/netns (as ``ip netns`` names them); anything with a / is a path."""
    return name_or_path if "/" in name_or_path else os.path.join(NETNS_RUN_DIR, name_or_path)


def enter(name_or_path: str) -> None:
    """Move this process into the namespace; everything after (subprocesses, sockets) runs there.
    The namespace must exist: unlike pyroute2's default, we never create one by accident."""
    path = namespace_path(name_or_path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # The flag names something that is not there: bad input, whatever the command (exit 2).
        raise ConfigError(
            f"invalid value for --network-namespace: '{name_or_path}': no such network namespace ({path})"
        ) from None
    except OSError as error:
        raise ApplyError(f"cannot open network namespace {path}: {error.strerror}") from None
    try:
        _setns(descriptor, path)
    finally:
        os.close(descriptor)


def _setns(descriptor: int, path: str) -> None:
    import ctypes  # noqa: PLC0415

    # setns(2) straight from libc: os.setns exists only from Python 3.12, and pyroute2's takes 100 ms to import
    # (and runs ldconfig to find libc).
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(descriptor, CLONE_NEWNET) != 0:
        raise ApplyError(f"cannot enter network namespace {path}: {os.strerror(ctypes.get_errno())}")


@contextmanager
def returning() -> Iterator[None]:
    """Come back to this thread's network namespace when the block ends, however it ends: the node agent
    enters one pod's namespace after another, and talks to the runtime and the API server from its own.
    Failing to come back is not an error of one pod but the end of the agent (RuntimeError)."""
    home_path = "/proc/thread-self/ns/net"
    home = os.open(home_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield
    finally:
        try:
            _setns(home, home_path)
        except ApplyError as error:
            raise RuntimeError(str(error)) from None
        finally:
            os.close(home)


def current_id() -> int:
    """The inode of this process's network namespace: the same for every process working in it."""
    return os.stat("/proc/self/ns/net").st_ino


CAP_SYS_ADMIN = 21


def scratch_entry() -> Callable[[], None] | None:
    """Something that moves the process calling it (a child about to probe the kernel) into a new, empty
    network namespace, which goes when that process ends: probes of kernel features leave no table behind
    there, and the answer is the same (modules are the kernel's, not a namespace's). None when this process
    may not create a namespace (no CAP_SYS_ADMIN): then probes run in place."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            effective = next(line.split()[1] for line in status if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return None
    if not int(effective, 16) >> CAP_SYS_ADMIN & 1:
        return None
    import ctypes  # noqa: PLC0415 (only probes need it)

    libc = ctypes.CDLL(None, use_errno=True)

    def enter_scratch() -> None:
        libc.unshare(CLONE_NEWNET)  # refused (a seccomp filter), the probe runs in place: no worse than without

    return enter_scratch


def identity() -> int:
    """This process's network namespace as one number, the same for every process working in it however it
    got there (``ip netns exec``, ``--network-namespace``, a pod): device and inode of its nsfs file."""
    here = os.stat("/proc/self/ns/net")
    return here.st_dev << 32 | here.st_ino


INITIAL_NET_NAMESPACE = 0xEFFFFFF9
"""The inode of the machine's own network namespace since Linux 6.18 (a fixed number, as the initial PID
namespace has had since 3.8); any other namespace, and the initial one on older kernels, gets a number from
0xF0000000 up, so only the machine's own can have this one."""
INITIAL_PID_NAMESPACE = 0xEFFFFFFC


def host_namespace_doubt() -> str | None:
    """Why this process may be working in the machine's own network namespace; None when it is not.

    The machine's own namespace is the one of the machine's PID 1. A container has a PID namespace of its
    own, whose PID 1 is the container's (the tool itself, or the process that started it, e.g. ``docker run
    --network container:app``): its network is the container's, not the machine's. Only in the machine's
    PID namespace does ``/proc/1`` show the machine's init; if it cannot be read, the answer is a doubt: a
    guard must fail closed."""
    here = current_id()
    if here == INITIAL_NET_NAMESPACE:
        return "this is the machine's own network namespace"
    if os.stat("/proc/self/ns/pid").st_ino != INITIAL_PID_NAMESPACE:
        return None
    try:
        init = os.stat("/proc/1/ns/net").st_ino
    except OSError as error:
        return f"cannot read /proc/1/ns/net ({error.strerror}) to tell this namespace from the machine's own"
    return "this is the network namespace of the machine's PID 1" if init == here else None
