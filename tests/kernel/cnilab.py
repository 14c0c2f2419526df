"""A container runtime in miniature, for the CNI plugin's tests: the reference plugins and ours, run as
containerd and CRI-O run them (libcni's rules), on a "node" that is a network namespace of the test's own.

Topology (every namespace is new and carries this process's pid; nothing touches the test runner's)::

    node  cni0 198.18.64.1/24 (the bridge plugin's gateway)
     ├── veth ── pod1 eth0 198.18.64.x/24 (host-local), lo up (loopback)
     └── veth ── pod2 ...

What a runtime does, and :class:`Runtime` does the same:
- every plugin runs as the executable its ``type`` names in ``CNI_PATH``, here inside the node namespace
  (``ip netns exec NODE``), with ``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``,
  ``CNI_ARGS`` (``K8S_POD_NAMESPACE`` ...) and ``CNI_PATH`` in its environment;
- its stdin is its object in the list plus the list's ``cniVersion`` and ``name``, the previous plugin's
  result as ``prevResult``, and ``runtimeConfig`` holding the capability arguments it declares;
- ADD runs the list in order, DEL in reverse; CHECK and DEL get the cached result of the ADD as
  ``prevResult``; a failed ADD is followed by a DEL; loopback is a network of its own (containerd's).
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.kernel import netlab

REFERENCE_PLUGINS = Path("/usr/lib/cni")
PLUGIN_NAME = "istio-iptables-cni"
CONSOLE_PLUGIN = Path(sys.prefix, "bin", PLUGIN_NAME)
"""The plugin as pip installs it (the console script); the frozen build is tested on its own."""
ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
DNS_CAPABILITY = "dns"
CLUSTER_DNS = {"servers": ["198.18.96.10"], "searches": ["default.svc.cluster.local"], "options": ["ndots:5"]}
"""A pod's DNS config as a kubelet gives it for dnsPolicy ClusterFirst (the cluster DNS service's address)."""
SUBNET = "198.18.64.0/24"
SUBNET6 = "2001:db8:64::/64"
GATEWAY = "198.18.64.1"
CNI_VERSION = "1.0.0"
_pods = itertools.count(1)

# What `inject --set components.cni.enabled=true` writes on a pod (the default settings).
STATUS = json.dumps(
    {"initContainers": ["istio-validation"], "containers": None, "volumes": None, "imagePullSecrets": None},
    separators=(",", ":"),
)
INJECTED = {
    "sidecar.istio.io/status": STATUS,
    "sidecar.istio.io/interceptionMode": "REDIRECT",
    "traffic.sidecar.istio.io/includeOutboundIPRanges": "*",
    "traffic.sidecar.istio.io/includeInboundPorts": "*",
    "traffic.sidecar.istio.io/excludeInboundPorts": "15020",
}


def missing_prerequisites() -> str | None:
    reason = netlab.missing_prerequisites()
    if reason:
        return reason
    missing = [name for name in ("bridge", "host-local", "loopback") if not (REFERENCE_PLUGINS / name).exists()]
    if missing:
        return f"no reference CNI plugins {', '.join(missing)} in {REFERENCE_PLUGINS} (containernetworking-plugins)"
    if not CONSOLE_PLUGIN.exists():
        return f"{CONSOLE_PLUGIN} is not installed (pip install -e .)"
    return None


@dataclass
class PodSandbox:
    """One pod as the runtime knows it: its namespace, its Kubernetes identity, its cached ADD result."""

    netns: str
    namespace: str
    name: str
    annotations: Mapping[str, str] | None
    container_id: str
    result: dict[str, object] | None = None
    dns: Mapping[str, list[str]] | None = None
    """The pod's DNS config (``servers``, ``searches``, ``options``): what its resolv.conf holds."""

    def resolv_conf(self) -> str:
        """The resolv.conf a runtime writes into the pod's containers from its DNS config."""
        assert self.dns is not None, "the pod has no DNS config"
        lines = [f"nameserver {server}" for server in self.dns.get("servers", [])]
        lines += [
            f"{key} {' '.join(self.dns[name])}"
            for key, name in (("search", "searches"), ("options", "options"))
            if self.dns.get(name)
        ]
        return "\n".join(lines) + "\n"

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    @property
    def address(self) -> str:
        assert self.result is not None, "the pod has no ADD result"
        ips = self.result["ips"]
        assert isinstance(ips, list)
        return str(ips[0]["address"]).split("/")[0]


@dataclass
class Invocation:
    plugin: str
    command: str
    stdin: dict[str, object]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, object]:
        parsed = json.loads(self.stdout)
        assert isinstance(parsed, dict)
        return parsed


class CniError(AssertionError):
    def __init__(self, invocation: Invocation) -> None:
        super().__init__(
            f"{invocation.plugin} {invocation.command} exited {invocation.returncode}\n"
            f"stdout: {invocation.stdout}\nstderr: {invocation.stderr}"
        )
        self.invocation = invocation


@dataclass
class Runtime:
    lab: netlab.Lab
    node: str
    bin_dir: Path
    plugin_config: dict[str, object]
    """Our plugin's object in the conflist (``type`` and the capability are added)."""
    pass_annotations: bool = True
    """Whether this runtime passes the pod-annotations capability (CRI-O and containerd do)."""
    pass_dns: bool = True
    """Whether this runtime passes the dns capability (containerd's CRI does)."""
    dual_stack: bool = False
    """Pods get an IPv6 address too (2001:db8:64::/64), so the capture covers both families."""
    path: str = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    """The PATH plugins run with (where ours finds iptables and nft)."""
    log: list[Invocation] = field(default_factory=list)
    wrapper: Sequence[str] = ()
    """A command prefix for every plugin run (e.g. :func:`without_python`)."""
    chained: bool = True
    """Whether our plugin is in the list (False: the cluster's network alone, a benchmark's baseline)."""
    version: str = CNI_VERSION
    """The lists' ``cniVersion``."""

    @property
    def conflist(self) -> dict[str, object]:
        capabilities = {ANNOTATIONS_CAPABILITY: True, DNS_CAPABILITY: True}
        ours = {"type": PLUGIN_NAME, "capabilities": capabilities, **self.plugin_config}
        bridge = {
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": SUBNET}]] + ([[{"subnet": SUBNET6}]] if self.dual_stack else []),
                "routes": [{"dst": "0.0.0.0/0"}] + ([{"dst": "::/0"}] if self.dual_stack else []),
                "dataDir": str(self.lab.tmp / f"host-local-{self.node}"),
            },
        }
        return {"cniVersion": self.version, "name": "lab-net", "plugins": [bridge, ours] if self.chained else [bridge]}

    # --- pods -----------------------------------------------------------------------------------------

    def new_pod(
        self,
        annotations: Mapping[str, str] | None = None,
        *,
        namespace: str = "default",
        dns: Mapping[str, list[str]] | None = CLUSTER_DNS,
    ) -> PodSandbox:
        number = next(_pods)
        netns = self.lab.pod.replace("-pod", f"-pod{number}")
        self.lab.check(["ip", "netns", "add", netns])
        self.lab.namespaces.append(netns)
        return PodSandbox(netns, namespace, f"app-{number}", annotations, f"sandbox{os.getpid()}x{number}", dns=dns)

    def remove_netns(self, pod: PodSandbox) -> None:
        """The runtime's last step: the pod's namespace goes."""
        netlab._kill_namespace_pids(pod.netns)
        self.lab.check(["ip", "netns", "del", pod.netns])
        self.lab.namespaces.remove(pod.netns)

    # --- the three operations, as libcni runs a list --------------------------------------------------

    def add(self, pod: PodSandbox, *, delete_on_failure: bool = True) -> dict[str, object]:
        """The list's ADD; when a plugin fails, the runtime's DEL follows (unless a test wants to see the
        state the failure itself left)."""
        loopback = {"cniVersion": self.version, "name": "cni-loopback", "type": "loopback"}
        self._checked(self.invoke(loopback, "ADD", pod, None, ifname="lo"))
        result: dict[str, object] | None = None
        for plugin in self._plugins():
            invocation = self.invoke(plugin, "ADD", pod, result)
            if invocation.returncode != 0:
                if delete_on_failure:
                    self.delete(pod, check=False)
                raise CniError(invocation)
            result = invocation.json()
        assert result is not None
        pod.result = result
        return result

    def check(self, pod: PodSandbox) -> list[Invocation]:
        return [self.invoke(plugin, "CHECK", pod, pod.result) for plugin in self._plugins()]

    def delete(self, pod: PodSandbox, *, check: bool = True, removing: bool = False) -> list[Invocation]:
        """The list's DEL: StopPodSandbox's, with the netns and the cached result; ``removing``:
        RemovePodSandbox's, which containerd sends again with ``CNI_NETNS`` empty and no ``prevResult``."""
        invocations = [
            self.invoke(plugin, "DEL", pod, None if removing else pod.result, netns="" if removing else None)
            for plugin in reversed(self._plugins())
        ]
        if check:
            for invocation in invocations:
                self._checked(invocation)
        return invocations

    def ours(self, pod: PodSandbox, command: str) -> Invocation:
        """Our plugin alone, as the runtime would run it in the list (CHECK, a repeated DEL...)."""
        return self.invoke(self._plugins()[-1], command, pod, pod.result)

    def _plugins(self) -> list[dict[str, object]]:
        plugins = self.conflist["plugins"]
        assert isinstance(plugins, list)
        return plugins

    def invoke(
        self,
        plugin: Mapping[str, object],
        command: str,
        pod: PodSandbox,
        previous: Mapping[str, object] | None,
        *,
        ifname: str = "eth0",
        netns: str | None = None,
    ) -> Invocation:
        stdin: dict[str, object] = {
            "cniVersion": self.version,
            "name": str(self.conflist["name"]) if plugin.get("type") != "loopback" else "cni-loopback",
            **{key: value for key, value in plugin.items() if key not in ("cniVersion", "name")},
        }
        if previous is not None:
            stdin["prevResult"] = previous
        runtime_config: dict[str, object] = {}
        capabilities = plugin.get("capabilities")
        declared = capabilities if isinstance(capabilities, Mapping) else {}
        if declared.get(ANNOTATIONS_CAPABILITY) and self.pass_annotations and pod.annotations is not None:
            runtime_config[ANNOTATIONS_CAPABILITY] = dict(pod.annotations)
        if declared.get(DNS_CAPABILITY) and self.pass_dns and pod.dns is not None:
            runtime_config[DNS_CAPABILITY] = dict(pod.dns)
        if runtime_config:
            stdin["runtimeConfig"] = runtime_config
        environment = {
            "PATH": self.path,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": pod.netns_path if netns is None else netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": str(self.bin_dir),
            "CNI_ARGS": (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                f"K8S_POD_INFRA_CONTAINER_ID={pod.container_id}"
            ),
        }
        executable = self.bin_dir / str(plugin["type"])
        result = subprocess.run(
            [*self.wrapper, "ip", "netns", "exec", self.node, str(executable)],
            input=json.dumps(stdin),
            capture_output=True,
            text=True,
            env=environment,
            timeout=90,
            check=False,
        )
        invocation = Invocation(str(plugin["type"]), command, stdin, result.returncode, result.stdout, result.stderr)
        self.log.append(invocation)
        return invocation

    @staticmethod
    def _checked(invocation: Invocation) -> Invocation:
        if invocation.returncode != 0:
            raise CniError(invocation)
        return invocation


def make_runtime(lab: netlab.Lab, plugin: Path, plugin_config: dict[str, object], node: str = "node") -> Runtime:
    """The node namespace (lo up) and a CNI bin dir holding the reference plugins and ``plugin``; ``node``
    tells the nodes of one lab apart (node, node1, ...)."""
    bin_dir = lab.tmp / f"cni-bin-{node}"
    node = lab.pod.replace("-pod", f"-{node}")
    lab.check(["ip", "netns", "add", node])
    lab.namespaces.append(node)
    lab.check(["ip", "-n", node, "link", "set", "lo", "up"])
    bin_dir.mkdir()
    for name in ("bridge", "host-local", "loopback"):
        (bin_dir / name).symlink_to(REFERENCE_PLUGINS / name)
    (bin_dir / PLUGIN_NAME).symlink_to(plugin)
    return Runtime(lab, node, bin_dir, plugin_config)


def without_python() -> list[str]:
    """A command prefix that runs its command in a private mount namespace where no Python is left: every
    interpreter on PATH is /dev/null, and the standard libraries, the interpreters' installations, the
    virtualenv and this project's source are empty folders. (A node, as far as the plugin can tell.)"""
    folders = {sys.base_prefix, sys.prefix, str(netlab.ROOT)}
    folders |= {*glob.glob("/usr/lib/python3*"), *glob.glob("/usr/local/lib/python3*")}
    folders = {folder for folder in folders if os.path.isdir(folder)}
    # A folder inside another hidden one is hidden with it (and cannot be mounted on once that is).
    outer = sorted(folder for folder in folders if not any(folder.startswith(other + "/") for other in folders))
    interpreters = set()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        for path in glob.glob(os.path.join(directory, "python*")):
            real = os.path.realpath(path)
            if os.path.isfile(real) and not any(real.startswith(folder + "/") for folder in outer):
                interpreters.add(real)
    script = ["set -e"]
    script += [f"mount -t tmpfs -o size=1m none {shlex.quote(folder)}" for folder in outer]
    script += [f"mount --bind /dev/null {shlex.quote(path)}" for path in sorted(interpreters)]
    script.append('exec "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script), "sh"]


def assert_python_hidden(wrapper: Sequence[str]) -> None:
    """The hiding of :func:`without_python` is real: no interpreter runs, no standard library or project
    file is there."""
    probe = "python3 -c pass || python -c pass || exit 0; exit 1"
    hidden = subprocess.run([*wrapper, "sh", "-c", probe], capture_output=True, timeout=30, check=False)
    assert hidden.returncode == 0, "a Python interpreter still runs under without_python()"
    for path in (Path(sys.base_prefix, "lib"), netlab.ROOT / "istio_iptables", Path(sys.prefix, "bin")):
        listed = subprocess.run([*wrapper, "ls", "-A", str(path)], capture_output=True, timeout=30, check=False)
        assert listed.stdout == b"", f"{path} is still visible under without_python()"


def frozen_build() -> Path:
    """The self-contained plugin's folder as ``scripts/build-cni-plugin`` makes it (scripts/test runs it
    first), built again here when any source file is newer than the build."""
    build = netlab.ROOT / "dist" / PLUGIN_NAME
    executable = build / PLUGIN_NAME
    package = netlab.ROOT / "istio_iptables"
    sources = [*package.rglob("*.py"), *package.rglob("*.json"), netlab.ROOT / "scripts" / "build-cni-plugin"]
    sources += (netlab.ROOT / "cni-client").glob("*.c")
    if not executable.exists() or executable.stat().st_mtime < max(path.stat().st_mtime for path in sources):
        built = subprocess.run(
            [str(netlab.ROOT / "scripts" / "build-cni-plugin")],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env={**os.environ, "PYTHON": sys.executable},
        )
        assert built.returncode == 0, built.stderr[-3000:]
    return build


def copy_frozen_plugin(build: Path, folder: Path) -> Path:
    """The self-contained build (executable and its folder) copied where ``without_python`` leaves it
    visible, as an installer copies it onto a node; the executable's path."""
    target = folder / "frozen"
    shutil.copytree(build, target, symlinks=True)
    return target / PLUGIN_NAME


class CniLab(netlab.Lab):
    """A lab without the fixed pod and peers: the runtime adds the node and the pods."""

    def setup(self) -> None:
        pass
