"""A node of its own: containerd's CRI (Debian's containerd and runc) in a network namespace the test made,
with every piece of its state in one temporary directory (../shared/reference/kubelet-lab.md).

containerd runs as ``nsenter --net=/run/netns/NODE -- unshare --mount --propagation private -- sh inner.sh``:
its mount namespace is private, ``inner.sh`` puts a tmpfs on /run and an overlay on /var/lib (upper dir in
the temp dir) before exec'ing containerd, so the paths that the configuration cannot move (shims' sockets,
runc's default root, libcni's result cache, host-local's leases) land in the temp dir or vanish with the
namespace. The bridge plugin makes ``cni0`` and the pods' veths in the node namespace, never in the
namespace of the test runner.

Everything a node leaves is named by its tag ``iilab-<pid>-<n>``: the namespace, the temp dir
``/tmp/iilab-<pid>-<n>-node``, the cgroup parent of its pods ``/iilab-<pid>-<n>`` in every hierarchy.
:func:`teardown` removes all of it from the tag alone, so a node whose test process was killed is swept
by the next run (:func:`sweep_stale_nodes`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from istio_iptables.cni import cri

PREFIX = "iilab"
REFERENCE_PLUGINS = Path("/usr/lib/cni")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SUBNET = "198.18.96.0/24"
SUBNET6 = "2001:db8:96::/64"
NETWORK_NAME = "lab"
CONFLIST = "10-lab.conflist"
K8S_NAMESPACE = "k8s.io"
STOP_TIMEOUT = 20.0
CONTAINERD_STOP_TIMEOUT = 5.0
"""containerd sometimes takes long to shut down; its state is thrown away anyway, so it is then killed."""
_counter = itertools.count()
_NAME = re.compile(rf"^{PREFIX}-(\d+)-(\d+)$")


class NodeError(RuntimeError):
    pass


def missing_prerequisites() -> str | None:
    """Why no node can run here (None if one can)."""
    if os.geteuid() != 0:
        return "the kubelet lab needs root (network and mount namespaces, containerd)"
    tools = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "nsenter", "unshare", "ip", "gcc")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    missing += [
        f"{REFERENCE_PLUGINS}/{p}" for p in ("bridge", "host-local", "loopback") if not (REFERENCE_PLUGINS / p).exists()
    ]
    if missing:
        packages = "containerd runc containernetworking-plugins gcc"
        return f"the kubelet lab needs {', '.join(missing)} (apt-get install {packages})"
    if not (CGROUP_ROOT / "memory").is_dir() and not (CGROUP_ROOT / "cgroup.controllers").exists():
        return f"no cgroup hierarchy under {CGROUP_ROOT}"
    return None


@dataclass(frozen=True)
class Paths:
    """The node's files, all under one temp dir."""

    top: Path

    @property
    def config(self) -> Path:
        return self.top / "containerd.toml"

    @property
    def socket(self) -> Path:
        return self.top / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.top / "containerd.log"

    @property
    def node_root(self) -> Path:
        """The node's root file system as a pod mounting the host's ``/`` sees it (the CNI installer's
        ``--node-root``): the CNI dirs where a kubeadm node has them, and the node's C library."""
        return self.top / "node-root"

    @property
    def cni_bin(self) -> Path:
        return self.node_root / "opt" / "cni" / "bin"

    @property
    def cni_conf(self) -> Path:
        return self.node_root / "etc" / "cni" / "net.d"

    @property
    def pod_logs(self) -> Path:
        return self.top / "pod-logs"

    @property
    def volumes(self) -> Path:
        return self.top / "volumes"

    @property
    def varlib(self) -> Path:
        """The upper dir of the overlay on /var/lib in containerd's mount namespace."""
        return self.top / "var-lib"


class Node:
    """containerd's CRI on a node namespace of its own. Use as a context manager; :meth:`close` always
    leaves nothing behind (sandboxes, processes, namespaces, mounts, cgroups, files)."""

    def __init__(self, subnets: tuple[str, ...] = (SUBNET,)) -> None:
        self.tag = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        self.netns = self.tag
        self.cgroup_parent = f"/{self.tag}"
        self.paths = Paths(Path(tempfile.gettempdir()) / f"{self.tag}-node")
        self.subnets = subnets
        self.process: subprocess.Popen[bytes] | None = None
        self._runtime: cri.Runtime | None = None

    # --- life cycle --------------------------------------------------------------------------------------

    def __enter__(self) -> Node:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        paths = self.paths
        paths.top.mkdir(mode=0o755)
        for folder in (
            paths.cni_bin,
            paths.cni_conf,
            paths.pod_logs,
            paths.volumes,
            paths.varlib / "upper",
            paths.varlib / "work",
        ):
            folder.mkdir(parents=True)
        for plugin in ("bridge", "host-local", "loopback"):
            (paths.cni_bin / plugin).symlink_to(REFERENCE_PLUGINS / plugin)
        # The installer checks the node's glibc in its root: this machine's is the lab node's.
        for libc in Path("/lib").glob("*-linux-gnu/libc.so.6"):
            (paths.node_root / libc.parent.relative_to("/")).mkdir(parents=True, exist_ok=True)
            shutil.copy2(libc.resolve(), paths.node_root / libc.relative_to("/"))
        self.write_conflist(bridge_conflist(self.subnets))
        paths.config.write_text(containerd_config(paths))
        inner = paths.top / "inner.sh"
        inner.write_text(INNER_SCRIPT)
        _run(["ip", "netns", "add", self.netns])
        self.in_node("ip", "link", "set", "lo", "up")
        with paths.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.netns}", "--", "unshare", "--mount", "--propagation", "private",
                 "--", "sh", str(inner), str(paths.top)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise NodeError(f"containerd exited {self.process.returncode}:\n{self.log_tail()}")
            if paths.socket.exists():
                try:
                    with cri.Runtime(str(paths.socket), timeout=5) as runtime:
                        runtime.version()
                    break
                except cri.CriError:
                    pass
            if time.monotonic() > deadline:
                raise NodeError(f"containerd did not answer on {paths.socket} within 30 s:\n{self.log_tail()}")
            time.sleep(0.1)
        self._runtime = cri.Runtime(str(paths.socket))

    def close(self) -> None:
        if self._runtime is not None:
            with contextlib.suppress(cri.CriError):
                remove_sandboxes(self._runtime)
            self._runtime.close()
            self._runtime = None
        teardown(self.tag, self.process)
        self.process = None

    # --- use ---------------------------------------------------------------------------------------------

    @property
    def host_paths(self) -> dict[str, Path]:
        """The node's directories that a pod's hostPath volume may name (as a node has them)."""
        return {"/": self.paths.node_root, "/etc/cni/net.d": self.paths.cni_conf, "/opt/cni/bin": self.paths.cni_bin}

    @property
    def gateway(self) -> str:
        """The node's address on its bridge (the bridge plugin's gateway: the subnet's first address)."""
        return self.gateways[0]

    @property
    def gateways(self) -> tuple[str, ...]:
        """The node's address on its bridge in each of its subnets (IPv4, then IPv6 when dual-stack)."""
        return tuple(str(next(ipaddress.ip_network(subnet).hosts())) for subnet in self.subnets)

    def use_subnets(self, subnets: tuple[str, ...]) -> None:
        """Give the pods created from now on addresses from ``subnets`` (the bridge network's ranges)."""
        self.write_conflist(bridge_conflist(subnets))
        self.subnets = subnets

    @property
    def runtime(self) -> cri.Runtime:
        if self._runtime is None:
            raise NodeError("the node is not running")
        return self._runtime

    def write_conflist(self, conflist: dict[str, object]) -> None:
        """Replace the node's network (containerd reloads its conf dir when a file changes)."""
        target = self.paths.cni_conf / CONFLIST
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(conflist, indent=2))
        temporary.rename(target)

    def ctr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this node's containerd, in the namespace of the CRI's images."""
        return _run(["ctr", "--address", str(self.paths.socket), "-n", K8S_NAMESPACE, *args], timeout=timeout)

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive))

    def images(self) -> set[str]:
        return set(self.ctr("images", "list", "-q").stdout.split())

    def joined(self) -> list[str]:
        """A command prefix that joins containerd's network and mount namespaces: where a node's DaemonSet
        pod with the host's network and the host's /var/run/netns (HostToContainer) sees the pods' network
        namespaces, which containerd mounts in its private mount namespace."""
        if self.process is None:
            raise NodeError("the node is not running")
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--mount=/proc/{self.process.pid}/ns/mnt", "--"]

    def in_node(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command in the node's network namespace (its bridge, the pods' veths)."""
        return _run(["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv], timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.paths.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no containerd log)"


def remove_sandboxes(runtime: cri.Runtime) -> None:
    """Stop and remove every sandbox, as a kubelet does for a deleted pod (CNI DEL runs twice)."""
    for sandbox in runtime.list_sandboxes():
        with contextlib.suppress(cri.CriError):
            runtime.stop_sandbox(sandbox.id)
        with contextlib.suppress(cri.CriError):
            runtime.remove_sandbox(sandbox.id)


def bridge_conflist(subnets: tuple[str, ...]) -> dict[str, object]:
    """The node's network: a bridge with host-local addresses from the test ranges, and portmap-free."""
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}] for subnet in subnets],
                    "routes": [{"dst": "0.0.0.0/0" if ":" not in subnet else "::/0"} for subnet in subnets],
                },
            }
        ],
    }


def containerd_config(paths: Paths) -> str:
    top = paths.top
    cri_plugin = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""\
version = 2
root = "{top}/root"
state = "{top}/state"
# Snapshotters this machine cannot run would only log errors. io.containerd.runtime.v1.linux stays
# enabled: the CRI plugin does not load without it.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{paths.socket}"
[ttrpc]
  address = "{paths.socket}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{top}/opt"
[{cri_plugin}]
  sandbox_image = "{PAUSE_IMAGE}"
  # Without CAP_SYS_RESOURCE (these machines) runc cannot lower oom_score_adj below the caller's.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri_plugin}.cni]
    bin_dir = "{paths.cni_bin}"
    conf_dir = "{paths.cni_conf}"
    max_conf_num = 1
  [{cri_plugin}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri_plugin}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri_plugin}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{top}/runc"
"""


PAUSE_IMAGE = "lab.local/pause:1"

# Argument: the node's temp dir. The mount namespace is private (unshare --propagation private): nothing
# mounted here is seen by the machine, and all of it goes when containerd and its shims are gone.
INNER_SCRIPT = """\
set -eu
top=$1
mount -t tmpfs -o mode=0755 tmpfs /run
# containerd's root (content store, unpacked images) in memory: removing tens of thousands of files from
# disk took longer than the whole session's pods, and the files go with the mount namespace.
mkdir -p "$top/root"
mount -t tmpfs -o mode=0711 tmpfs "$top/root"
mount -t overlay overlay -o "lowerdir=/var/lib,upperdir=$top/var-lib/upper,workdir=$top/var-lib/work" /var/lib
exec containerd --config "$top/containerd.toml"
"""


# --- clean-up ----------------------------------------------------------------------------------------------


def teardown(tag: str, process: subprocess.Popen[bytes] | None = None) -> None:
    """Remove everything of node ``tag``: containerd, its shims and every process in its pods' cgroups, the
    cgroups, the namespace and the temp dir. Works from the tag alone (a killed run's node included)."""
    top = Path(tempfile.gettempdir()) / f"{tag}-node"
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=CONTAINERD_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    # Whatever outlived containerd: its shims (named by the socket path in their argv), processes in the
    # node's namespace, and the containers in the pods' cgroups.
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        remaining = node_processes(tag)
        if not remaining:
            break
        for pid in remaining:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise NodeError(f"node {tag}: processes {sorted(remaining)} survive SIGKILL")
        time.sleep(0.05)
    for directory in cgroups(tag):
        _rmdir_tree(directory)
    subprocess.run(["ip", "netns", "del", tag], capture_output=True, timeout=10, check=False)
    shutil.rmtree(top, ignore_errors=True)


def node_processes(tag: str) -> set[int]:
    """Every live process of node ``tag``: by its temp dir in argv, its network namespace, its cgroups."""
    top = f"{Path(tempfile.gettempdir())}/{tag}-node"
    netns = Path(f"/run/netns/{tag}")
    netns_id = _inode(netns) if netns.exists() else None
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes()
            in_netns = netns_id is not None and _inode(entry / "ns" / "net") == netns_id
        except OSError:
            continue
        if top.encode() in argv or in_netns:
            found.add(int(entry.name))
    for directory in cgroups(tag):
        for procs in directory.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                found.update(int(pid) for pid in procs.read_text().split())
    return found


def cgroups(tag: str) -> list[Path]:
    """The node's cgroup parent in each hierarchy where it exists (v1 controllers, or the v2 tree)."""
    found = [hierarchy / tag for hierarchy in CGROUP_ROOT.iterdir() if (hierarchy / tag).is_dir()]
    return found


def leftovers(tag: str) -> list[str]:
    """What of node ``tag`` is still on the machine (empty after a clean teardown)."""
    found = [f"process {pid}" for pid in sorted(node_processes(tag))]
    found += [f"cgroup {path}" for path in cgroups(tag)]
    if Path(f"/run/netns/{tag}").exists():
        found.append(f"network namespace {tag}")
    top = Path(tempfile.gettempdir()) / f"{tag}-node"
    if top.exists():
        found.append(f"directory {top}")
    found += [
        f"mount {line.split()[4]}" for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(top) in line
    ]
    return found


def sweep_stale_nodes() -> list[str]:
    """Tear down nodes left by test processes that no longer run (killed with SIGKILL)."""
    tags = set()
    for name in os.listdir("/run/netns") if Path("/run/netns").is_dir() else ():
        tags.add(name)
    tags.update(path.name.removesuffix("-node") for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*-node"))
    tags.update(
        path.name for hierarchy in CGROUP_ROOT.iterdir() if hierarchy.is_dir() for path in hierarchy.glob(f"{PREFIX}-*")
    )
    swept = []
    for tag in sorted(tags):
        match = _NAME.match(tag)
        if match and int(match.group(1)) != os.getpid() and not Path(f"/proc/{match.group(1)}").exists():
            teardown(tag)
            swept.append(tag)
    return swept


def _rmdir_tree(directory: Path) -> None:
    # Children first: a cgroup can be removed only when it has neither processes nor children.
    for child in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _rmdir(child)
    _rmdir(directory)


def _rmdir(directory: Path) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            # A killed process leaves its cgroup a moment after it is reaped.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _inode(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise NodeError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
        )
    return result
