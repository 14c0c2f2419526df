"""Repair: the node agent's capture of the pods that CNI mode missed (``istio-iptables cni repair``).

A pod whose network was set up while the plugin was not in the node's configuration (created before the
installer ran, or while it was replaced) has no capture; its ``istio-validation`` init container exits 126,
and the kubelet restarts only that container, never the pod's network: the pod stays in
Init:CrashLoopBackOff. The agent finds such pods through the node's container runtime (the CRI socket: the
sandboxes, their annotations, the pause process holding each pod's network namespace), reads each one's
capture from its annotations with the plugin's own function (:func:`plugin.capture_of`), and applies that
plan inside the pod's namespace: the next validation attempt passes and the pod starts. No cluster
credentials are needed for that.

What it reads and leaves: only the ready sandboxes of pods injected for CNI mode, outside the excluded
namespaces, are looked at, each once in its lifetime; a namespace that holds rules of ours (``status``'s
ownership reading) is never changed, whether in sync with the plan or not. Where the plan cannot be applied
(the namespace is gone, an annotation is invalid, the apply fails), the pod is deleted through the API server
so that its controller recreates it (the plugin, installed by then, captures the new one), but never a bare
pod or a pod of a Job with ``restartPolicy: Never`` unless asked: nothing would recreate the first, and a
deletion counts as a failed attempt of the second.
"""

from __future__ import annotations

import enum
import os
import threading
from collections import Counter

from istio_iptables.capture.config import Config
from istio_iptables.cni import cri, kubeapi
from istio_iptables.cni.plugin import PluginConfig, PodInfo, capture_of, pod_dns
from istio_iptables.errors import ApplyError, ConfigError, HostError
from istio_iptables.log import Log
from istio_iptables.records import record, replace

log = Log(__name__)

DEFAULT_CRI_SOCKET = "unix:///run/containerd/containerd.sock"
CRI_TIMEOUT = 10.0
OWN_NETNS = "/proc/thread-self/ns/net"


class Verdict(enum.Enum):
    """What became of a pod; every verdict is final for its sandbox but a failed API call (retried)."""

    REPAIRED = "captured in place"
    CAPTURED = "already captured"
    DRIFTED = "holds rules of ours that differ from its plan: left alone"
    DELETED = "deleted, for its controller to recreate it"
    NODE_NETWORK = "on the node's network: never ours to change"
    KEPT = "not repaired"


@record
class RepairOptions:
    plugin: PluginConfig
    """The plugin's settings (its ``--plugin-config``): the same defaults, excluded namespaces and iptables."""
    kubeconfig: str = ""
    """Credentials for the fallback; without them a pod that cannot be repaired in place is only reported."""
    delete_bare_pods: bool = False
    delete_job_pods: bool = False
    """Pods of a Job whose restart policy is ``Never``."""
    max_per_cycle: int = 10
    """Pods looked into (their namespace entered) per cycle; the others wait for the next cycle."""


def deletion_refusal(pod: kubeapi.Pod, options: RepairOptions) -> str | None:
    """Why the fallback must not delete ``pod``, or None when its deletion gets it recreated."""
    if not pod.owners and not options.delete_bare_pods:
        return "a bare pod (no ownerReferences): nothing would recreate it (--delete-bare-pods to delete anyway)"
    job = any(owner.kind == "Job" for owner in pod.owners)
    if job and pod.restart_policy == "Never" and not options.delete_job_pods:
        return (
            "a pod of a Job with restartPolicy Never: its deletion would count as a failed attempt "
            "(--delete-job-pods to delete anyway)"
        )
    return None


class Repairer:
    """One node's repair, cycle after cycle, over one runtime connection."""

    def __init__(self, runtime: cri.Runtime, options: RepairOptions) -> None:
        self.runtime = runtime
        self.options = options
        self.judged: set[str] = set()
        """Sandboxes whose verdict is final (or that are none of ours): never looked into again."""
        self.totals: Counter[Verdict] = Counter()

    def cycle(self) -> Counter[Verdict]:
        """Look into the ready sandboxes not judged yet, at most ``max_per_cycle`` of ours; this cycle's count."""
        sandboxes = self.runtime.list_sandboxes(cri.SandboxState.READY)
        self.judged &= {sandbox.id for sandbox in sandboxes}
        counts: Counter[Verdict] = Counter()
        looked = 0
        for sandbox in sandboxes:
            if sandbox.id in self.judged:
                continue
            try:
                config = self._capture(sandbox)
            except ConfigError as error:  # an annotation asks for a capture that cannot be built
                self._settle(sandbox, self._fallback(sandbox, str(error)), counts)
                continue
            if config is None:
                self.judged.add(sandbox.id)  # none of ours
                continue
            if looked == self.options.max_per_cycle:
                log.debug("more pods to look into: left for the next cycle")
                break
            looked += 1
            self._settle(sandbox, self._repair(sandbox, config), counts)
        return counts

    def _capture(self, sandbox: cri.Sandbox) -> Config | None:
        """The pod's capture as the plugin reads it from its annotations (the namespace is filled in later);
        None when the plugin would leave the pod alone."""
        if self.options.plugin.excludes(sandbox.namespace):
            return None
        info = PodInfo(sandbox.annotations, sandbox.labels)
        return capture_of(sandbox.namespace, sandbox.name, info, "", self.options.plugin)

    def _repair(self, sandbox: cri.Sandbox, config: Config) -> Verdict | None:
        try:
            netns, dns_servers = self._netns(sandbox)
        except HostError as error:  # the agent's lack (its privileges) or the runtime's, not the pod's: no fallback
            log.warning(f"pod {_name(sandbox)}: {error}; trying again next cycle")
            return None
        if netns is None:
            return self._fallback(sandbox, "its network namespace is gone")
        if _identity(netns) == _identity(OWN_NETNS):
            return Verdict.NODE_NETWORK
        from istio_iptables.apply import apply, apply_native  # noqa: PLC0415
        from istio_iptables.explain.status import status  # noqa: PLC0415
        from istio_iptables.host import netns as namespaces  # noqa: PLC0415
        from istio_iptables.host.hostfacts import enter  # noqa: PLC0415

        # The DNS servers as the plugin has them from the runtime's dns capability: the pod's, not the node's.
        config = pod_dns(replace(config, network_namespace=netns), None if dns_servers is None else list(dns_servers))
        try:
            with namespaces.returning():
                _, plan = enter(config, changes_system=False)
                report = status(config, plan)
                if report.in_sync:
                    return Verdict.CAPTURED
                if report.holds_ours:
                    return Verdict.DRIFTED
                (apply_native if config.native_nftables else apply)(config, plan)
        except (ApplyError, HostError, ConfigError) as error:
            return self._fallback(sandbox, str(error))
        return Verdict.REPAIRED

    def _netns(self, sandbox: cri.Sandbox) -> tuple[str | None, tuple[str, ...] | None]:
        """The pod's network namespace as this process sees it: the runtime's bind mount where it is visible
        here, else through the pause process (``hostPID``); None when neither is there. HostError when one is
        there but this process may not open it, or when the runtime did not answer. With it, the nameservers
        of the pod's DNS config, as the runtime gives them (None when it does not)."""
        try:
            status = self.runtime.sandbox_status(sandbox.id)
        except cri.CriError as error:  # removed since it was listed, or the runtime is busy: look again
            raise HostError(f"the runtime did not give its status: {error}") from None
        paths = [status.netns_path] if status.netns_path else []
        paths += [status.netns_of_pid] if status.pid else []
        return next((path for path in paths if _identity(path) is not None), None), status.dns_servers

    def _fallback(self, sandbox: cri.Sandbox, reason: str) -> Verdict | None:
        """Delete the pod through the API server, if allowed: its controller recreates it, and the plugin
        captures the new one. None when the API server did not answer (tried again next cycle)."""
        name = _name(sandbox)
        kubeconfig = self.options.kubeconfig
        if not kubeconfig:
            log.warning(f"pod {name}: cannot be captured in place ({reason}), and no --kubeconfig to delete it with")
            return Verdict.KEPT
        try:
            pod = kubeapi.get_pod(kubeconfig, sandbox.namespace, sandbox.name)
            if pod.uid != sandbox.uid:
                log.info(f"pod {name}: the API server has another pod of that name: this one is gone, left alone")
                return Verdict.KEPT
            refusal = deletion_refusal(pod, self.options)
            if refusal is not None:
                log.warning(f"pod {name}: cannot be captured in place ({reason}); not deleted: {refusal}")
                return Verdict.KEPT
            if not kubeapi.delete_pod(kubeconfig, sandbox.namespace, sandbox.name, sandbox.uid):
                return Verdict.KEPT  # deleted by someone else meanwhile
        except kubeapi.KubeError as error:
            log.warning(f"pod {name}: cannot be captured in place ({reason}), and {error}; trying again")
            return None
        log.info(f"pod {name}: cannot be captured in place ({reason})")
        return Verdict.DELETED

    def _settle(self, sandbox: cri.Sandbox, verdict: Verdict | None, counts: Counter[Verdict]) -> None:
        if verdict is None:
            return
        self.judged.add(sandbox.id)
        counts[verdict] += 1
        self.totals[verdict] += 1
        message = f"pod {_name(sandbox)}: {verdict.value}"
        if verdict in (Verdict.REPAIRED, Verdict.DELETED):
            log.info(f"{message} ({counts[verdict]} this cycle, {self.totals[verdict]} since start)")
        elif verdict is Verdict.DRIFTED:
            log.warning(message)
        else:
            log.debug(message)


def run(address: str, options: RepairOptions, *, interval: float, stop: threading.Event, once: bool = False) -> None:
    """Repair cycles every ``interval`` seconds until ``stop`` is set (one cycle with ``once``)."""
    with cri.Runtime(address, timeout=CRI_TIMEOUT) as runtime:
        repairer = Repairer(runtime, options)
        while True:
            try:
                repairer.cycle()
            except cri.CriError as error:
                if once:
                    raise HostError(f"the container runtime at {address}: {error}") from None
                log.warning(f"the container runtime at {address}: {error}; trying again in {interval:g} s")
            if once or stop.wait(interval):
                return


def _name(sandbox: cri.Sandbox) -> str:
    return f"{sandbox.namespace}/{sandbox.name}"


def _identity(path: str) -> tuple[int, int] | None:
    """The namespace a path holds, or None when it holds none: a runtime's bind mount seen from another mount
    namespace is the empty file under it, which only the namespace file system (nsfs) tells apart. HostError
    when the path is there but this process may not look: a pause process of another user, or with
    capabilities this one lacks, needs CAP_SYS_PTRACE."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError as error:
        raise HostError(f"cannot open {path}: {error.strerror} (the repair needs CAP_SYS_PTRACE)") from None
    return (found.st_dev, found.st_ino) if found.st_dev == os.stat(OWN_NETNS).st_dev else None
