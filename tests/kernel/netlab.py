"""A small network lab for kernel tests: a pod namespace, two peer namespaces, veth pairs, actors.

Topology (every namespace is new, its name carries this process's pid; nothing touches the namespace the
tests run in)::

    peer  eth0 198.18.0.1/24 2001:db8::1/64    ── veth ──  eth0 198.18.0.2/24 2001:db8::2/64    pod
    peer2 eth0 198.19.0.1/24 2001:db8:1::1/64  ── veth ──  eth1 198.19.0.2/24 2001:db8:1::2/64  pod

The pod's default routes point at ``peer``, which does not forward: nothing can leave the lab. The pod's
and the peer's addresses on ``eth0`` are those above unless a test gives others (``Addresses``), and the peer
may hold more (``peer_extra``), which the pod reaches through its default route. Processes
run inside a namespace as a given uid/gid (``ip netns exec NS setpriv ...``); all of them, the namespaces
and the lab's temporary folder are removed by :meth:`Lab.close`, which the ``lab`` fixture always calls.

:func:`apply_capture` is the one way tests program the capture rules into the pod.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The project's own entry point: the one installed in the environment running the tests (sys.prefix is the
# virtualenv even when sys.executable is a launcher shim).
ISTIO_IPTABLES = Path(sys.prefix, "bin", "istio-iptables")
PREFIX = "iitest"
VARIANTS = ("legacy", "nft", "native")
BACKEND_FLAGS = {
    "legacy": ["--force-iptables-binary", "legacy"],
    "nft": ["--force-iptables-binary", "nft"],
    "native": ["--native-nftables"],
    "libiptc": ["--backend", "libiptc"],
}
"""apply_capture's variants: the three of VARIANTS, and python-iptables on legacy tables (traffic tests)."""
"""How apply_capture programs the rules: iptables-legacy, iptables-nft, or native nftables (--native-nftables)."""

POD4, PEER4 = "198.18.0.2", "198.18.0.1"
POD4_B, PEER2_4 = "198.19.0.2", "198.19.0.1"
POD6, PEER6 = "2001:db8::2", "2001:db8::1"
POD6_B, PEER2_6 = "2001:db8:1::2", "2001:db8:1::1"
APP_UID = 1000
PROXY_UID = 1337


@dataclass(frozen=True)
class Addresses:
    """The pod's and the peer's addresses on the link ``eth0`` (/24 and /64), and extra addresses the peer
    holds (/32 and /128) beyond it."""

    pod4: str = POD4
    peer4: str = PEER4
    pod6: str = POD6
    peer6: str = PEER6
    peer_extra: tuple[str, ...] = ()


DEFAULT_ADDRESSES = Addresses()

# Every address a test may send to: the lab's documentation/benchmark ranges and the pod's loopback.
LAB_NETWORKS = tuple(
    ipaddress.ip_network(net) for net in ("198.18.0.0/15", "2001:db8::/32", "127.0.0.0/8", "::1/128", "::6/128")
)

WAIT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
_NAME = re.compile(rf"^{PREFIX}-(\d+)-\d+-(pod|peer|peer2|node\d*|pod\d+)$")
_FOLDER = re.compile(rf"^{PREFIX}-(\d+)-\d+-\w+$")
_counter = itertools.count()
_open_labs: set[Lab] = set()


class LabError(RuntimeError):
    pass


def missing_prerequisites(variant: str | None = None) -> str | None:
    """Why kernel tests cannot run here (None if they can)."""
    if os.geteuid() != 0:
        return "kernel tests need root (network namespaces, iptables)"
    tools = ["ip", "setpriv"]
    if variant == "native":
        tools.append("nft")
    elif variant == "libiptc":
        if importlib.util.find_spec("iptc") is None:
            return "python-iptables is not installed (pip install '.[libiptc]')"
        tools += ["iptables-legacy-save", "ip6tables-legacy-save"]
    elif variant is not None:
        tools += [f"{family}-{variant}-restore" for family in ("iptables", "ip6tables")]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"kernel tests need {', '.join(missing)} on PATH"
    if not ISTIO_IPTABLES.exists():
        return f"{ISTIO_IPTABLES} is not installed (pip install -e .)"
    return None


def check_lab_address(address: str) -> None:
    """Refuse any destination outside the lab's ranges: a test must never send traffic elsewhere."""
    ip = ipaddress.ip_address(address)
    if not any(ip in net for net in LAB_NETWORKS):
        raise LabError(f"{address} is outside the lab's address ranges")


@dataclass(eq=False)
class Actor:
    """A process started inside a namespace; its stdout and stderr go to files in the lab folder."""

    name: str
    ns: str
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    listens: list[tuple[str, int]] = field(default_factory=list)  # (/proc/net file, port)
    events: Path | None = None

    def output(self) -> str:
        out = self.stdout.read_text(errors="replace") if self.stdout.exists() else ""
        err = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return f"[{self.name} in {self.ns}, exit {self.popen.poll()}]\nstdout: {out}\nstderr: {err}"


class Lab:
    """Namespaces, links and processes of one test. Use as a context manager or call close()."""

    def __init__(self, addresses: Addresses = DEFAULT_ADDRESSES) -> None:
        tag = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        self.addresses = addresses
        self.pod = f"{tag}-pod"
        self.peer = f"{tag}-peer"
        self.peer2 = f"{tag}-peer2"
        self.namespaces: list[str] = []  # those actually created, in order
        self.actors: list[Actor] = []
        self.applied: list[str] = []  # what apply_capture programmed, for failure reports
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
        self.tmp.chmod(0o755)
        # Our own xtables lock: never wait on (or hold) the lock of the host's iptables users.
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "PYTHONPATH": str(ROOT),
            "PYTHONDONTWRITEBYTECODE": "1",
            "XTABLES_LOCKFILE": str(self.tmp / "xtables.lock"),
            "LC_ALL": "C",
        }
        _open_labs.add(self)

    def __enter__(self) -> Lab:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- building --------------------------------------------------------------------------------------

    def setup(self) -> None:
        at = self.addresses
        for ns in (self.pod, self.peer, self.peer2):
            self._ip("netns", "add", ns)
            self.namespaces.append(ns)
        # Created from inside the pod, the other end moved straight into the peer: no interface ever
        # exists in the test runner's namespace.
        self._ip("-n", self.pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.peer)
        self._ip("-n", self.pod, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", self.peer2)
        self.batch(
            self.pod,
            "link set lo up",
            "link set eth0 up",
            "link set eth1 up",
            f"addr add {at.pod4}/24 dev eth0",
            f"addr add {at.pod6}/64 dev eth0 nodad",
            f"addr add {POD4_B}/24 dev eth1",
            f"addr add {POD6_B}/64 dev eth1 nodad",
            f"route add default via {at.peer4} dev eth0",
            f"route add ::/0 via {at.peer6} dev eth0",
        )
        self.batch(
            self.peer,
            "link set lo up",
            "link set eth0 up",
            f"addr add {at.peer4}/24 dev eth0",
            f"addr add {at.peer6}/64 dev eth0 nodad",
            *(f"addr add {extra}/128 dev eth0 nodad" for extra in at.peer_extra if ":" in extra),
            *(f"addr add {extra}/32 dev eth0" for extra in at.peer_extra if ":" not in extra),
        )
        self.batch(
            self.peer2,
            "link set lo up",
            "link set eth0 up",
            f"addr add {PEER2_4}/24 dev eth0",
            f"addr add {PEER2_6}/64 dev eth0 nodad",
        )

    def _ip(self, *args: str) -> None:
        self.check(["ip", *args])

    def batch(self, ns: str, *lines: str) -> None:
        """`ip -n NS -batch -`: several ip commands in one process, all inside ``ns``."""
        self._own(ns)
        self.check(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")

    def check(self, argv: Sequence[str], input: str | None = None) -> str:
        result = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def sh(self, ns: str, argv: Sequence[str], input: str | None = None) -> str:
        """Run a command as root inside ``ns``; its stdout, or LabError with its stderr."""
        self._own(ns)
        return self.check(["ip", "netns", "exec", ns, *argv], input=input)

    def _own(self, ns: str) -> None:
        if ns not in self.namespaces:
            raise LabError(f"{ns!r} is not a namespace of this lab")

    def netns_inode(self, ns: str) -> int:
        return os.stat(f"/run/netns/{ns}").st_ino

    # --- processes -------------------------------------------------------------------------------------

    def _command(self, ns: str, argv: Sequence[str], uid: int, gid: int | None, caps: Sequence[str]) -> list[str]:
        self._own(ns)
        command = ["ip", "netns", "exec", ns]
        if uid != 0 or caps:
            command += ["setpriv", f"--reuid={uid}", f"--regid={uid if gid is None else gid}", "--clear-groups"]
            if caps:
                wanted = ",".join(f"+{cap}" for cap in caps)
                command += [f"--inh-caps={wanted}", f"--ambient-caps={wanted}"]
        return command + list(argv)

    def spawn(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        name: str,
        uid: int = 0,
        gid: int | None = None,
        caps: Sequence[str] = (),
    ) -> Actor:
        """Start a long-running process inside ``ns`` as uid/gid (gid defaults to uid)."""
        stdout, stderr = self.tmp / f"{name}.out", self.tmp / f"{name}.err"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            popen = subprocess.Popen(
                self._command(ns, argv, uid, gid, caps),
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: killed as a whole, spared by Ctrl-C
            )
        actor = Actor(name, ns, popen, stdout, stderr)
        self.actors.append(actor)
        return actor

    def actor(
        self,
        ns: str,
        role: str,
        *args: str,
        name: str,
        uid: int = 0,
        gid: int | None = None,
        caps: Sequence[str] = (),
        listens: Iterable[tuple[str, int]] = (),
    ) -> Actor:
        """Start ``python -m tests.kernel.actors ROLE ARGS`` in ``ns``; ``listens`` is what wait_ready checks."""
        argv = [sys.executable, "-m", "tests.kernel.actors", role, *args, "--lifetime", "300"]
        actor = self.spawn(ns, argv, name=name, uid=uid, gid=gid, caps=caps)
        actor.listens = list(listens)
        return actor

    def echo(self, ns: str, name: str, ports: Sequence[int], uid: int = 0) -> Actor:
        return self.actor(
            ns,
            "echo",
            name,
            *map(str, ports),
            name=f"echo-{name}",
            uid=uid,
            listens=[(kind, port) for port in ports for kind in ("tcp", "tcp6")],
        )

    def proxy(self, tproxy: bool = False, transparent_ports: Sequence[int] = (), ns: str | None = None) -> Actor:
        """The sidecar stand-in in the pod (or in ``ns``), as the proxy UID (with CAP_NET_ADMIN for TPROXY, as
        Envoy)."""
        ns = ns or self.pod
        events = self.tmp / f"proxy-events-{ns}.jsonl"
        events.touch()
        os.chown(events, PROXY_UID, PROXY_UID)
        args = ["--events", str(events)] + (["--tproxy"] if tproxy else [])
        for port in transparent_ports:
            args += ["--transparent-port", str(port)]
        actor = self.actor(
            ns,
            "proxy",
            *args,
            name=f"proxy-{ns}",
            uid=PROXY_UID,
            caps=("net_admin",) if tproxy else (),
            listens=[(kind, port) for port in (15001, 15006) for kind in ("tcp", "tcp6")],
        )
        actor.events = events
        return actor

    def dns(self, ns: str, name: str, port: int, answer: str, *, uid: int = 0, binds: Sequence[str] = ()) -> Actor:
        kinds = []
        for address in binds or ("0.0.0.0", "::"):
            six = "6" if ":" in address else ""
            kinds += [(f"udp{six}", port), (f"tcp{six}", port)]
        bind_args = [arg for address in binds for arg in ("--bind", address)]
        return self.actor(
            ns,
            "dns",
            name,
            str(port),
            "--answer",
            answer,
            *bind_args,
            name=f"dns-{name}",
            uid=uid,
            listens=kinds,
        )

    def wait_ready(self, *actors: Actor, timeout: float = WAIT_TIMEOUT) -> None:
        """Poll until every actor listens on its ports, inside its own namespace; bounded by ``timeout``."""
        deadline = time.monotonic() + timeout
        for actor in actors:
            for kind, port in actor.listens:
                self.wait_listening(actor, kind, port, deadline)

    def wait_listening(self, actor: Actor, kind: str, port: int, deadline: float) -> None:
        """Wait until ``actor`` has a socket bound/listening on ``port`` in /proc/<pid>/net/<kind>.

        The pid's network namespace is checked too, so a listener of the host on the same port never
        counts before the process has entered its namespace.
        """
        want_inode = self.netns_inode(actor.ns)
        pid = actor.popen.pid
        while True:
            if actor.popen.poll() is not None:
                raise LabError(f"{actor.name} exited before listening on {kind}/{port}\n{actor.output()}")
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{pid}/ns/net").st_ino == want_inode and _bound(pid, kind, port):
                    return
            if time.monotonic() > deadline:
                raise LabError(f"{actor.name}: nothing on {kind}/{port} in time\n{actor.output()}")
            time.sleep(0.01)

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        uid: int = 0,
        gid: int | None = None,
        timeout: float = 15.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``ns`` as uid/gid and wait for it (bounded)."""
        return subprocess.run(
            self._command(ns, argv, uid, gid, ()),
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def try_client(
        self,
        host: str,
        port: int,
        *,
        data: str = "hello",
        ns: str | None = None,
        uid: int = APP_UID,
        gid: int | None = None,
        source: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """One TCP exchange with the ``client`` actor (from the pod, as the app, by default)."""
        check_lab_address(host)
        args = [host, str(port), "--data", data] + (["--source", source] if source else [])
        argv = [sys.executable, "-m", "tests.kernel.actors", "client", *args]
        return self.run(ns or self.pod, argv, uid=uid, gid=gid)

    def client(self, host: str, port: int, **kwargs: object) -> str:
        """One TCP exchange (from the pod as the app by default); the whole response."""
        result = self.try_client(host, port, **kwargs)  # type: ignore[arg-type]
        if result.returncode != 0:
            raise AssertionError(f"client to {host}:{port} failed: {result.stderr.strip()}")
        return result.stdout

    def dnsquery(
        self,
        server: str,
        name: str = "svc.example.test",
        *,
        tcp: bool = False,
        ns: str | None = None,
        uid: int = APP_UID,
    ) -> str:
        """One DNS A query (UDP, or TCP); the address in the answer."""
        check_lab_address(server)
        argv = [sys.executable, "-m", "tests.kernel.actors", "dnsquery", server, name] + (["--tcp"] if tcp else [])
        result = self.run(ns or self.pod, argv, uid=uid)
        if result.returncode != 0:
            proto = "tcp" if tcp else "udp"
            raise AssertionError(f"dns query to {server} ({proto}, uid {uid}) failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def events(self, proxy: Actor) -> list[dict[str, object]]:
        assert proxy.events is not None
        return [json.loads(line) for line in proxy.events.read_text().splitlines() if line.strip()]

    # --- reports and teardown --------------------------------------------------------------------------

    def report(self) -> str:
        """The pod's live rules, routes and every actor's output, for a failing test's log."""
        parts = ["--- applied ---", *self.applied]
        if self.pod in self.namespaces:
            for tool in ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save"):
                with contextlib.suppress(Exception):
                    parts += [f"--- {tool} -c (pod) ---", self.sh(self.pod, [tool, "-c"])]
            with contextlib.suppress(Exception):
                parts += ["--- nft list ruleset (pod) ---", self.sh(self.pod, ["nft", "list", "ruleset"])]
            for args in (["rule"], ["-6", "rule"], ["route", "show", "table", "all"]):
                with contextlib.suppress(Exception):
                    parts += [f"--- ip {' '.join(args)} (pod) ---", self.sh(self.pod, ["ip", *args])]
        parts += [actor.output() for actor in self.actors]
        return "\n".join(parts)

    def close(self) -> None:
        """Kill every process, delete every namespace and the folder; collect errors, raise at the end."""
        errors: list[str] = []
        for actor in self.actors:
            _stop(actor.popen)
        for ns in reversed(self.namespaces):
            try:
                _kill_namespace_pids(ns)
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=COMMAND_TIMEOUT, check=True)
            except (subprocess.SubprocessError, OSError) as error:
                errors.append(f"ip netns del {ns}: {error}")
        self.namespaces.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)
        _open_labs.discard(self)
        if errors:
            raise LabError("; ".join(errors))


def _bound(pid: int, kind: str, port: int) -> bool:
    listening = "0A" if kind.startswith("tcp") else "07"  # TCP_LISTEN, or UDP's unconnected "TCP_CLOSE"
    with open(f"/proc/{pid}/net/{kind}") as table:
        next(table)
        for line in table:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == listening:
                return True
    return False


def _stop(popen: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group (its id is the child's pid, which is ours until reaped), then SIGKILL."""
    if popen.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout=2)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=5)


def _kill_namespace_pids(ns: str) -> None:
    """Processes still inside one of our namespaces (only ours can be there): SIGKILL each by pid."""
    result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10, check=False)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def sweep_stale_namespaces() -> list[str]:
    """Delete lab namespaces (killing what still runs in them) and folders left by an earlier test process
    that no longer runs (killed with SIGKILL). Only names this module gives are considered."""
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False)
    removed = []
    for line in result.stdout.splitlines():
        name = line.split(" ", 1)[0]
        match = _NAME.match(name)
        if not match or int(match.group(1)) == os.getpid() or Path(f"/proc/{match.group(1)}").exists():
            continue
        _kill_namespace_pids(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)
        removed.append(name)
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*"):
        match = _FOLDER.match(folder.name)
        if match and int(match.group(1)) != os.getpid() and not Path(f"/proc/{match.group(1)}").exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


@atexit.register
def _close_open_labs() -> None:
    for lab in list(_open_labs):
        with contextlib.suppress(Exception):
            lab.close()


# --- rules ---------------------------------------------------------------------------------------------


def apply_capture(lab: Lab, args: Sequence[str], variant: str, *, ipv6: bool | None = False) -> str:
    """Program the capture of istio-iptables ``args`` inside ``lab.pod`` with the ``variant`` iptables.

    Contract (kept when the body becomes ``istio-iptables --network-namespace POD ...``):
    - ``args``: istio-iptables flags exactly as an init container passes them (e.g. ``-p 15001 -z 15006
      -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020``), without --dry-run, --ipv6/--no-ipv6,
      --network-namespace or the binary choice, which this function adds.
    - ``variant``: ``"legacy"`` or ``"nft"``: which iptables binaries program the rules (``--force-iptables-binary``);
      ``"native"``: native nftables tables instead (``--native-nftables``).
    - ``ipv6``: also program IPv6 (``--ipv6``), else ``--no-ipv6``; None passes neither (detection decides).
    - Afterwards the pod has the IPv4 rules (and IPv6 ones if ``ipv6``); if the mode is TPROXY and -b is not
      empty, ``ip rule add fwmark <-t> lookup <-r>`` and ``ip route add local default dev lo table <-r>``
      (and -6); with ``ipv6``, ``::6/128`` on the pod's ``lo`` (REDIRECT and TPROXY, as Istio does).
    - It touches nothing outside ``lab.pod``. Raises LabError when anything fails; returns the run's stderr.
    """
    if variant not in BACKEND_FLAGS:
        raise ValueError(f"variant {variant!r} is not one of {list(BACKEND_FLAGS)}")
    lab._own(lab.pod)
    if lab.netns_inode(lab.pod) == os.stat("/proc/self/ns/net").st_ino:
        raise LabError("refusing to program the test runner's own namespace")
    argv = [str(ISTIO_IPTABLES), "--network-namespace", lab.pod, *BACKEND_FLAGS[variant], *args]
    if ipv6 is not None:
        argv.append("--ipv6" if ipv6 else "--no-ipv6")
    env = {**os.environ, "XTABLES_LOCKFILE": lab.env["XTABLES_LOCKFILE"]}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, env=env, check=False)
    lab.applied.append(" ".join(argv) + "\n" + result.stderr)
    if result.returncode != 0:
        raise LabError(f"{argv} exited {result.returncode}: {result.stderr.strip()}")
    return result.stderr
