"""``--run-validation``: prove the rules redirect, as Istio's validator does (reference section 6).

Listeners on the proxy's two ports (loopback) read the original destination of each connection with
SO_ORIGINAL_DST. A client owned by the proxy's UID connects to ``127.0.0.6:<probe port>`` (``[::6]`` for
IPv6): the loopback self-redirect rule sends it to the inbound listener, which sees the probe port as the
original destination. Without the rules the connection is refused and the client retries until the
timeout. Run as root, the client drops to the proxy's UID and GID in a child process, so the same check
works from the init container and, as in the CNI flow, as the proxy user with ``--skip-rule-apply``.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

from istio_iptables.capture.config import Config
from istio_iptables.capture.model import Family
from istio_iptables.errors import ValidationProbeError
from istio_iptables.log import Log

log = Log(__name__)

SO_ORIGINAL_DST = 80
LOOPBACK = {Family.V4: "127.0.0.1", Family.V6: "::1"}
PROBE_TARGET = {Family.V4: "127.0.0.6", Family.V6: "::6"}
RETRY_INTERVAL = 0.2


def validate(config: Config, families: tuple[Family, ...], uid: int, gid: int) -> None:
    for family in families:
        _validate_family(config, family, uid, gid)
        log.info("Validation passed, iptables rules established (%s)", family.label)


def _validate_family(config: Config, family: Family, uid: int, gid: int) -> None:
    listeners = _listen(family, (config.proxy_port, config.inbound_capture_port))
    deadline = time.monotonic() + config.probe_timeout
    try:
        while time.monotonic() < deadline:
            _probe(family, config.probe_port, uid, gid, deadline)
            ready, _, _ = select.select(listeners, [], [], min(RETRY_INTERVAL, max(0.0, deadline - time.monotonic())))
            for listener in ready:
                connection, _ = listener.accept()
                with connection:
                    if original_port(connection, family) == config.probe_port:
                        return
    finally:
        for listener in listeners:
            listener.close()
    raise ValidationProbeError(
        f"validation timeout after {config.probe_timeout:g} s: a connection from uid {uid} to "
        f"{PROBE_TARGET[family]}:{config.probe_port} was not redirected to {LOOPBACK[family]}:"
        f"{config.inbound_capture_port}. The capture rules are missing or wrong in this pod's network namespace "
        "(with istio-cni: the pod may have started before the CNI plugin was ready, and will be restarted)."
    )


def _listen(family: Family, ports: tuple[int, ...]) -> list[socket.socket]:
    listeners = []
    errors = []
    for port in dict.fromkeys(ports):
        listener = socket.socket(socket.AF_INET if family is Family.V4 else socket.AF_INET6, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            listener.bind((LOOPBACK[family], port))
            listener.listen(16)
            listeners.append(listener)
        except OSError as error:
            listener.close()
            errors.append(f"{LOOPBACK[family]}:{port}: {error.strerror}")
            log.warning("validation cannot listen on %s:%d: %s", LOOPBACK[family], port, error.strerror)
    if not listeners:
        raise ValidationProbeError("no listener available: " + "; ".join(errors))
    return listeners


def original_port(connection: socket.socket, family: Family) -> int:
    """The port the client dialled before REDIRECT rewrote it (SO_ORIGINAL_DST; IP6T_SO_ORIGINAL_DST)."""
    if family is Family.V4:
        raw = connection.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    else:
        raw = connection.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    return int(struct.unpack_from("!H", raw, 2)[0])


def _probe(family: Family, port: int, uid: int, gid: int, deadline: float) -> None:
    """One connection attempt from the proxy's UID; its failure is expected until the rules are in."""
    if os.geteuid() == uid:
        _connect(family, port, deadline)
        return
    child = os.fork()
    if child == 0:  # pragma: no cover (runs in the child)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            _connect(family, port, deadline)
        finally:
            os._exit(0)
    os.waitpid(child, 0)


def _connect(family: Family, port: int, deadline: float) -> None:
    with socket.socket(socket.AF_INET if family is Family.V4 else socket.AF_INET6, socket.SOCK_STREAM) as client:
        client.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
        try:
            client.bind((LOOPBACK[family], 0))
            client.connect((PROBE_TARGET[family], port))
        except OSError:
            pass
