"""The node agent: the plugin's handling, warm, behind a unix socket, for the thin client a runtime runs.

A pod's start pays the start of whatever executable the runtime runs for the plugin. A Python interpreter
(the self-contained bundle) costs tens of milliseconds before the first line of the plugin, and a captured
pod's imports as much again; the thin client (``cni-client/istio-iptables-cni.c``) costs about a
millisecond, and hands the request here. This process has imported everything the plugin's ADD, DEL and
CHECK import before it listens, and forks a child per request that runs the plugin's own ``main`` with the
request's ``CNI_*`` variables and standard input: the same code, the same answer, the same exit code, as the
bundle would give, in a process of its own (a crash or a hang of one request is that child's). Istio's
ambient CNI plugin hands its requests to its node agent the same way.

The client falls back to the bundle whenever this agent does not give it a complete answer, so a pod's
outcome never depends on the agent: only its speed does. The agent is single-threaded (forking a process
with threads copies locks held by threads that do not exist in the child): one loop over the listening
socket, the connections, the children's pidfds and a wake-up pipe for signals.

The exchange (integers 32-bit big-endian; the client holds the same constants):
  request  ``ICN1`` env_len stdin_len, then ``CNI_*`` variables as NUL-terminated KEY=VALUE, then stdin
  reply    ``ICN1`` exit_code stdout_len stderr_len, then the plugin's stdout, then its stderr
A request that is malformed, too big, or not whole within ``READ_TIMEOUT`` is refused (the connection is
closed without a reply, and the client runs the bundle); the next connection is served as if it had not been.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from pathlib import Path

from istio_iptables.errors import ConfigError, HostError
from istio_iptables.log import Log
from istio_iptables.records import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

MAGIC = b"ICN1"
REQUEST = struct.Struct(">4sII")
REPLY = struct.Struct(">4sIII")
MAX_ENV = 64 * 1024
MAX_STDIN = 4 * 1024 * 1024
MAX_OUTPUT = 4 * 1024 * 1024
"""The client's bounds: a request over them is refused, an answer over them would make it run the bundle."""
READ_TIMEOUT = 5.0
"""Seconds for a request to arrive whole, and for a reply to be taken, from the connection's start."""
MAX_CONNECTIONS = 64
"""Connections served at once; past that, new ones wait in the listening socket's backlog."""
SPARE_DELAY = 0.25
"""Seconds of quiet before the next spare worker is forked: the fork takes milliseconds of CPU, which the
runtime, finishing the pod just answered, should not have to share."""
KILL_GRACE = 2.0
"""Seconds between SIGTERM (the plugin rolls an apply back) and SIGKILL for a child past its time."""
WARM_MODULES = (
    "istio_iptables.cni.plugin",
    "istio_iptables.cni.kubeapi",
    "istio_iptables.capture.config",
    "istio_iptables.capture.plan",
    "istio_iptables.kube.capture",
    "istio_iptables.kube.settings",
    "istio_iptables.host.hostfacts",
    "istio_iptables.host.interrupts",
    "istio_iptables.logformat",
    "istio_iptables.host.locks",
    "istio_iptables.host.netlink",
    "istio_iptables.host.netns",
    "istio_iptables.host.routes",
    "istio_iptables.apply",
    "istio_iptables.explain.status",
    "istio_iptables.backends.ipset",
    "istio_iptables.backends.nft",
    "istio_iptables.backends.restore",
    "istio_iptables.render.iptables",
    "istio_iptables.render.nft",
    "istio_iptables.render.restore",
    "istio_iptables.state.changes",
    "istio_iptables.state.nft",
    "pyroute2",
    "pyroute2.netlink.exceptions",
    "encodings.ascii",
    "difflib",
    "traceback",
)
"""What the plugin's ADD, DEL and CHECK import on their way (tests/kernel/test_cni_agent.py checks the
list): imported once here, before the first fork, so that no request pays for them."""

log = Log(__name__)


@record
class AgentOptions:
    socket_path: Path
    request_timeout: float = 20.0
    """Seconds a request's child may run before it is stopped (below the client's 30 s, so that a slow
    plugin is answered with its own error rather than run twice)."""


def run(options: AgentOptions) -> None:
    """Warm up, listen, serve until SIGTERM or SIGINT; the socket is removed on the way out."""
    warm_up()
    listening = listen(options.socket_path)
    try:
        Server(listening, options).serve()
    finally:
        listening.close()


def warm_up() -> None:
    for name in WARM_MODULES:
        importlib.import_module(name)
    from istio_iptables.kube.settings import known_keys  # noqa: PLC0415 (imported above)

    known_keys()  # read once here, not by every worker whose plugin settings hold values or a mesh config
    gc.collect()
    gc.freeze()  # what is here now is never collected: children share its pages instead of touching them


@record
class Listening:
    sock: socket.socket
    path: Path
    inode: int
    """The socket file's, to tell it from one another agent put at the same path since."""

    def close(self) -> None:
        """Stop listening and remove the socket file (once; unless it is another agent's by now)."""
        if self.sock.fileno() < 0:
            return
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            if self.path.lstat().st_ino == self.inode:
                self.path.unlink()


def listen(path: Path) -> Listening:
    """A listening socket at ``path``, mode 0600, in a directory only its owner can write; a stale socket of an
    agent that is gone is replaced, a live agent's is refused. Bound under a temporary name and renamed into
    place, so the path never names a socket that is not listening."""
    directory = path.parent
    try:
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        status = directory.stat()
    except OSError as error:
        raise ConfigError(f"invalid value for --socket: '{path}': {directory}: {error.strerror}") from None
    if status.st_uid != os.geteuid() or status.st_mode & 0o022:
        raise ConfigError(
            f"invalid value for --socket: '{path}': its directory {directory} must belong to this user and be "
            f"writable by it alone; it is uid {status.st_uid}'s, mode {stat.S_IMODE(status.st_mode):04o}"
        )
    _refuse_live_agent(path)
    temporary = directory / f".{path.name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        listener.bind(str(temporary))
        os.chmod(temporary, 0o600)
        listener.listen(MAX_CONNECTIONS)
        os.rename(temporary, path)
        inode = path.lstat().st_ino
    except OSError as error:
        listener.close()
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise HostError(f"cannot listen on {path}: {error.strerror}") from None
    finally:
        os.umask(previous)
    listener.setblocking(False)
    return Listening(listener, path, inode)


def _refuse_live_agent(path: Path) -> None:
    try:
        status = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode):
        raise ConfigError(f"invalid value for --socket: '{path}': exists and is not a socket (left alone)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as error:
        if error.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise HostError(f"cannot tell whether an agent listens on {path}: {error.strerror}") from None
        return  # a socket nobody listens on: an agent that is gone left it
    finally:
        probe.close()
    raise HostError(f"another agent is listening on {path}")


class Connection:
    """One client: its request as it arrives, then its worker, then its reply as it leaves."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = bytearray()
        self.worker: Worker | None = None
        self.reply = b""
        self.sent = 0


class Worker:
    """A forked child, waiting for one request (the spare) or running it. Forking a process of this size
    takes milliseconds: the spare is forked once the agent has been quiet for SPARE_DELAY, so a request waits
    for a fork only when requests come in a burst."""

    def __init__(self, pid: int, channel: socket.socket) -> None:
        self.pid = pid
        self.channel = channel
        """Our end of a SOCK_SEQPACKET pair: the request goes down it, the exit code comes back."""
        self.output = (-1, -1)
        self.connection: Connection | None = None
        self.deadline = 0.0
        self.kill_at = 0.0


class Server:
    def __init__(self, listening: Listening, options: AgentOptions) -> None:
        self.listening = listening
        self.listener = listening.sock
        self.accepting = True
        """Whether the listener is in the selector (not while MAX_CONNECTIONS are served, nor once stopping)."""
        self.options = options
        self.selector = selectors.DefaultSelector()
        self.connections: set[Connection] = set()
        self.spare: Worker | None = None
        self.spare_due = 0.0
        """When to fork the next spare (SPARE_DELAY after the last connection ended)."""
        self.exiting: set[int] = set()
        """Children that answered (or were stopped) and are not reaped yet."""
        self.stopping = False
        self.wakeup_read, self.wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def serve(self) -> None:
        previous = {number: signal.signal(number, self._on_signal) for number in (signal.SIGTERM, signal.SIGINT)}
        signal.set_wakeup_fd(self.wakeup_write)
        self.selector.register(self.wakeup_read, selectors.EVENT_READ, "wakeup")
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        log.info(f"istio-iptables-cni agent: listening on {self.options.socket_path}")
        try:
            while not (self.stopping and not self.connections):
                self._turn()
        finally:
            signal.set_wakeup_fd(-1)
            for number, handler in previous.items():
                signal.signal(number, handler)
            for connection in list(self.connections):
                self._close(connection)
            if self.spare is not None:
                self._end_worker(self.spare)
            self._reap(block=True)
            self.selector.close()
            os.close(self.wakeup_read)
            os.close(self.wakeup_write)
        log.info("istio-iptables-cni agent: stopped")

    def _on_signal(self, number: int, frame: object) -> None:
        self.stopping = True

    def _turn(self) -> None:
        now = time.monotonic()
        waits = [connection.deadline for connection in self.connections if connection.worker is None]
        waits += [worker.kill_at or worker.deadline for worker in self._running()]
        if self.spare is None and not self.connections:
            waits.append(self.spare_due)
        timeout = max(0.0, min([*waits, now + 1.0]) - now)
        for key, _ in self.selector.select(timeout):
            if key.data == "wakeup":
                with contextlib.suppress(BlockingIOError):
                    os.read(self.wakeup_read, 512)
            elif key.data == "listener":
                self._accept()
            elif isinstance(key.data, Worker):
                self._worker_done(key.data)
            elif key.data.reply:
                self._write(key.data)
            else:
                self._read(key.data)
        if self.stopping and self.listener.fileno() >= 0:
            if self.accepting:
                self.selector.unregister(self.listener)
            self.accepting = False
            self.listening.close()
            log.info("istio-iptables-cni agent: stopping: no new requests, finishing those under way")
        self._enforce_deadlines(time.monotonic())
        self._reap(block=False)
        if self.spare is None and not self.stopping and not self.connections and time.monotonic() >= self.spare_due:
            self.spare = self._fork_worker()

    def _running(self) -> list[Worker]:
        return [connection.worker for connection in self.connections if connection.worker is not None]

    def _accept(self) -> None:
        while len(self.connections) < MAX_CONNECTIONS:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            connection = Connection(sock, time.monotonic() + READ_TIMEOUT)
            self.connections.add(connection)
            self.selector.register(sock, selectors.EVENT_READ, connection)
        # Full: the rest wait in the backlog until a connection ends (their clients' own time limits apply).
        self.selector.unregister(self.listener)
        self.accepting = False

    def _read(self, connection: Connection) -> None:
        try:
            chunk = connection.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._refuse(connection, "closed before its request was whole")
            return
        connection.received += chunk
        request = parse_request(connection.received)
        if isinstance(request, str):
            self._refuse(connection, request)
        elif request is not None:
            hidden = hidden_namespace(request[0])
            if hidden:
                # Not the plugin's to fail: the client runs the bundle, which sees the node's file system.
                log.info(
                    f"istio-iptables-cni agent: network namespace {hidden} is not visible here: left to the client"
                )
                self._close(connection)
                return
            self.selector.unregister(connection.sock)
            self._start(connection, *request)

    def _refuse(self, connection: Connection, reason: str) -> None:
        if connection.received:  # a client that connects and goes (a probe, a liveness check) is no news
            log.warning(f"istio-iptables-cni agent: request refused: {reason}")
        self._close(connection)

    def _fork_worker(self) -> Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would write this process's buffered lines again
        pid = os.fork()
        if pid == 0:
            run_worker(theirs)
        theirs.close()
        return Worker(pid, ours)

    def _start(self, connection: Connection, environment: bytes, stdin: bytes) -> None:
        stdin_fd = os.memfd_create("cni-stdin")
        os.write(stdin_fd, stdin)  # a memfd takes it whole
        try:
            worker = self._hand_over(environment, stdin_fd)
        finally:
            os.close(stdin_fd)
        if worker is None:
            self._close(connection)  # the client runs the bundle
            return
        connection.worker, worker.connection = worker, connection
        worker.deadline = time.monotonic() + self.options.request_timeout
        self.selector.register(worker.channel, selectors.EVENT_READ, worker)

    def _hand_over(self, environment: bytes, stdin_fd: int) -> Worker | None:
        """The request to the spare; to a new worker when the spare has died (killed by an OOM, say)."""
        for _ in range(2):
            worker, self.spare = self.spare or self._fork_worker(), None
            worker.output = (os.memfd_create("cni-stdout"), os.memfd_create("cni-stderr"))
            os.lseek(stdin_fd, 0, os.SEEK_SET)
            try:
                socket.send_fds(worker.channel, [environment], [stdin_fd, *worker.output])
                return worker
            except OSError as error:
                log.warning(f"istio-iptables-cni agent: cannot hand a request to a worker: {error.strerror}")
                self._end_worker(worker)
        return None

    def _worker_done(self, worker: Worker) -> None:
        """The worker's exit code came (or its end of the channel closed: it died, or was stopped)."""
        try:
            message = worker.channel.recv(16)
        except OSError:
            message = b""
        self.selector.unregister(worker.channel)
        if len(message) == 4:
            code = struct.unpack(">I", message)[0]
        else:
            _, status = os.waitpid(worker.pid, 0)
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code
            worker.pid = 0
        connection, (out_fd, err_fd) = worker.connection, worker.output
        worker.output = (-1, -1)
        stdout, stderr = _contents(out_fd), _contents(err_fd)
        if worker.kill_at:
            late = f"istio-iptables-cni agent: the plugin did not answer within {self.options.request_timeout:g} s"
            stderr += f"{late}: stopped\n".encode()
        self._end_worker(worker)
        assert connection is not None
        connection.worker = None
        connection.reply = reply_bytes(code, stdout, stderr)
        connection.deadline = time.monotonic() + READ_TIMEOUT
        self.selector.register(connection.sock, selectors.EVENT_WRITE, connection)
        self._write(connection)

    def _end_worker(self, worker: Worker) -> None:
        """Its channel closed (a spare exits on that), its files closed; reaped later, off any reply's path."""
        worker.channel.close()
        for descriptor in worker.output:
            if descriptor >= 0:
                os.close(descriptor)
        worker.output = (-1, -1)
        if worker.pid:
            self.exiting.add(worker.pid)
            worker.pid = 0

    def _reap(self, *, block: bool) -> None:
        for pid in list(self.exiting):
            if os.waitpid(pid, 0 if block else os.WNOHANG)[0] == pid:
                self.exiting.discard(pid)

    def _write(self, connection: Connection) -> None:
        try:
            connection.sent += connection.sock.send(connection.reply[connection.sent :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(connection)  # the client is gone: it runs the bundle, or its runtime gave up
            return
        if connection.sent == len(connection.reply):
            self._close(connection)

    def _enforce_deadlines(self, now: float) -> None:
        for connection in list(self.connections):
            worker = connection.worker
            if worker is None:
                if now >= connection.deadline:
                    late = "reply not taken" if connection.reply else "request not whole"
                    self._refuse(connection, f"{late} within {READ_TIMEOUT:g} s")
            elif worker.kill_at and now >= worker.kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            elif not worker.kill_at and now >= worker.deadline:
                log.warning(
                    f"istio-iptables-cni agent: a request ran past {self.options.request_timeout:g} s: stopping it"
                )
                worker.kill_at = now + KILL_GRACE
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGTERM)

    def _close(self, connection: Connection) -> None:
        worker = connection.worker
        if worker is not None:  # only on the way out: a worker still running is stopped, not waited for
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(worker.channel)
            self._end_worker(worker)
            connection.worker = None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(connection.sock)
        connection.sock.close()
        self.connections.discard(connection)
        self.spare_due = time.monotonic() + SPARE_DELAY
        if not self.accepting and not self.stopping:
            self.selector.register(self.listener, selectors.EVENT_READ, "listener")
            self.accepting = True


def parse_request(received: bytes | bytearray) -> tuple[bytes, bytes] | str | None:
    """The request's variables (as sent, checked) and stdin once it is whole; None while it is not; a reason to
    refuse it."""
    if len(received) < REQUEST.size:
        return None if MAGIC.startswith(bytes(received[:4])) else "not this agent's protocol"
    magic, env_len, stdin_len = REQUEST.unpack_from(received)
    if magic != MAGIC:
        return "not this agent's protocol"
    if env_len > MAX_ENV or stdin_len > MAX_STDIN:
        return f"too big ({env_len} bytes of environment, {stdin_len} of input)"
    end = REQUEST.size + env_len + stdin_len
    if len(received) < end:
        return None
    if len(received) > end:
        return "bytes after the request"
    environment = bytes(received[REQUEST.size : REQUEST.size + env_len])
    if environment and not environment.endswith(b"\0"):
        return "an environment entry without its NUL"
    for entry in environment.split(b"\0")[:-1]:
        key, equals, _ = entry.partition(b"=")
        if not equals or not key.startswith(b"CNI_"):
            return "an environment entry that is not CNI_*=VALUE"
    return environment, bytes(received[REQUEST.size + env_len : end])


def hidden_namespace(environment: bytes) -> str:
    """The request's ``CNI_NETNS`` when it names a path this agent cannot see (a runtime that passes
    ``/proc/PID/ns/net`` to an agent without the host's PIDs, a mount missing): the agent would fail a
    request the plugin on the node serves. Empty when there is none, or it is visible."""
    for entry in environment.split(b"\0"):
        if entry.startswith(b"CNI_NETNS="):
            path = os.fsdecode(entry.removeprefix(b"CNI_NETNS="))
            return path if path and not os.path.exists(path) else ""
    return ""


def reply_bytes(code: int, stdout: bytes, stderr: bytes) -> bytes:
    stdout, stderr = stdout[:MAX_OUTPUT], stderr[:MAX_OUTPUT]
    return REPLY.pack(MAGIC, code, len(stdout), len(stderr)) + stdout + stderr


def _contents(descriptor: int) -> bytes:
    try:
        return os.pread(descriptor, MAX_OUTPUT, 0)
    finally:
        os.close(descriptor)


def run_worker(channel: socket.socket) -> NoReturn:
    """The forked child: waits for one request, runs the plugin's ``main`` on it as the bundle runs it, sends
    its exit code back (its output is in the files it was handed); never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL)  # the plugin installs its own before it changes anything
        gc.disable()  # a one-shot run, as the console entry runs it
        for descriptor in [int(name) for name in os.listdir("/proc/self/fd")]:
            if descriptor > 2 and descriptor != channel.fileno():  # the listener, clients, other workers' channels
                with contextlib.suppress(OSError):
                    os.close(descriptor)
        message, descriptors, _, _ = socket.recv_fds(channel, MAX_ENV, 3)
        if len(descriptors) != 3:
            os._exit(0)  # the agent closed the channel: a spare not needed any more
        for target, source in enumerate(descriptors):
            os.dup2(source, target)
            os.close(source)
        for key in [key for key in os.environ if key.startswith("CNI_")]:
            del os.environ[key]
        for entry in message.split(b"\0")[:-1]:
            name, _, value = entry.partition(b"=")
            os.environb[name] = value
        from istio_iptables.cni import plugin  # noqa: PLC0415 (imported already: warm_up)

        plugin.main()
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:  # a defect: the client still gets an answer, its stderr the traceback
        import traceback  # noqa: PLC0415

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            channel.send(struct.pack(">I", code & 0xFF))  # the answer is complete: the agent replies now
        os._exit(code)
