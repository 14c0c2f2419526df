"""A small typed client of a node's container runtime over the CRI (the gRPC API a kubelet speaks).

The node agent reads the pods of its node through it (sandboxes with their annotations, labels, state, and
the pause process that holds each pod's network namespace); the tests play the kubelet with it. Requests are
built from the frozen records below, so callers never handle protobuf messages. Needs the ``node`` extra
(grpcio, protobuf); the stubs are generated from the vendored ``cri_api/api.proto`` (scripts/regen-cri).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from istio_iptables.cni.cri_api import api_pb2 as api
from istio_iptables.cni.cri_api import api_pb2_grpc as api_grpc


class CriError(Exception):
    """The runtime refused a call: the call's name, the gRPC status and the runtime's own message."""

    def __init__(self, call: str, code: str, details: str) -> None:
        super().__init__(f"{call}: {code}: {details}")
        self.call = call
        self.code = code
        self.details = details


class SandboxState(enum.Enum):
    READY = api.SANDBOX_READY
    NOT_READY = api.SANDBOX_NOTREADY


class ContainerState(enum.Enum):
    CREATED = api.CONTAINER_CREATED
    RUNNING = api.CONTAINER_RUNNING
    EXITED = api.CONTAINER_EXITED
    UNKNOWN = api.CONTAINER_UNKNOWN


@dataclass(frozen=True)
class Sandbox:
    """A pod sandbox as ListPodSandbox reports it."""

    id: str
    name: str
    namespace: str
    uid: str
    state: SandboxState
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class SandboxStatus:
    """PodSandboxStatus(verbose): the pod's identity, its IPs and the pause process holding its namespaces.

    ``pid`` is 0 when the runtime did not say (a sandbox that is not ready has no process)."""

    sandbox: Sandbox
    ips: tuple[str, ...]
    pid: int
    netns_path: str

    @property
    def netns_of_pid(self) -> str:
        """The pod's network namespace as any mount namespace of the node sees it (the runtime's own bind
        mount, ``netns_path``, may be visible only inside the runtime's mount namespace)."""
        return f"/proc/{self.pid}/ns/net"


@dataclass(frozen=True)
class SandboxConfig:
    name: str
    namespace: str
    uid: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    hostname: str = ""
    log_directory: str = ""
    cgroup_parent: str = ""
    dns_servers: tuple[str, ...] = ()
    dns_searches: tuple[str, ...] = ()
    host_network: bool = False
    """The node's network namespace (``hostNetwork: true``): the runtime runs no CNI for the pod."""


@dataclass(frozen=True)
class Mount:
    container_path: str
    host_path: str
    readonly: bool = False


@dataclass(frozen=True)
class SecurityContext:
    """LinuxContainerSecurityContext, the fields a kubelet fills from a container's securityContext."""

    run_as_user: int | None = None
    run_as_group: int | None = None
    readonly_rootfs: bool = False
    no_new_privs: bool = False
    privileged: bool = False
    add_capabilities: tuple[str, ...] = ()
    drop_capabilities: tuple[str, ...] = ()
    seccomp_runtime_default: bool = False
    masked_paths: tuple[str, ...] = ()
    readonly_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerConfig:
    name: str
    image: str
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    mounts: tuple[Mount, ...] = ()
    log_path: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    security: SecurityContext = SecurityContext()


@dataclass(frozen=True)
class ContainerStatus:
    id: str
    name: str
    state: ContainerState
    exit_code: int
    reason: str
    message: str
    log_path: str
    pid: int


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


class Runtime:
    """A connection to the runtime's CRI socket (``unix:///run/containerd/containerd.sock`` on a node)."""

    def __init__(self, address: str, timeout: float = 60.0) -> None:
        target = address if "://" in address else f"unix://{address}"
        self._channel = grpc.insecure_channel(target)
        self._runtime = api_grpc.RuntimeServiceStub(self._channel)
        self._images = api_grpc.ImageServiceStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> Runtime:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, name: str, request: Any, service: Any = None) -> Any:
        method = getattr(service or self._runtime, name)
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            code = error.code().name if hasattr(error, "code") else "UNKNOWN"
            details = error.details() if hasattr(error, "details") else str(error)
            raise CriError(name, code, details or "") from None

    def version(self) -> str:
        """The runtime's name and version, e.g. ``containerd 1.6.20``."""
        response = self._call("Version", api.VersionRequest())
        return f"{response.runtime_name} {response.runtime_version}"

    # --- sandboxes ---------------------------------------------------------------------------------------

    def list_sandboxes(self, state: SandboxState | None = None) -> list[Sandbox]:
        request = api.ListPodSandboxRequest()
        if state is not None:
            request.filter.state.state = state.value
        return [_sandbox(item) for item in self._call("ListPodSandbox", request).items]

    def sandbox_status(self, sandbox_id: str) -> SandboxStatus:
        response = self._call("PodSandboxStatus", api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True))
        status = response.status
        network = status.network
        ips = tuple(ip for ip in (network.ip, *(extra.ip for extra in network.additional_ips)) if ip)
        # The verbose info is the runtime's own JSON; containerd puts the pause pid and the netns path there.
        info = json.loads(response.info.get("info", "{}") or "{}")
        netns = info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", [])
        netns_path = next((item.get("path", "") for item in netns if item.get("type") == "network"), "")
        sandbox = Sandbox(
            id=status.id,
            name=status.metadata.name,
            namespace=status.metadata.namespace,
            uid=status.metadata.uid,
            state=SandboxState(status.state),
            labels=dict(status.labels),
            annotations=dict(status.annotations),
        )
        return SandboxStatus(sandbox=sandbox, ips=ips, pid=int(info.get("pid", 0)), netns_path=netns_path)

    def run_sandbox(self, config: SandboxConfig) -> str:
        """RunPodSandbox: the runtime makes the pod's namespaces and runs the node's CNI chain (ADD)."""
        response = self._call("RunPodSandbox", api.RunPodSandboxRequest(config=_sandbox_config(config)))
        return str(response.pod_sandbox_id)

    def stop_sandbox(self, sandbox_id: str) -> None:
        self._call("StopPodSandbox", api.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))

    def remove_sandbox(self, sandbox_id: str) -> None:
        self._call("RemovePodSandbox", api.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))

    # --- containers --------------------------------------------------------------------------------------

    def create_container(self, sandbox_id: str, sandbox: SandboxConfig, config: ContainerConfig) -> str:
        request = api.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=_container_config(config), sandbox_config=_sandbox_config(sandbox)
        )
        return str(self._call("CreateContainer", request).container_id)

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", api.StartContainerRequest(container_id=container_id))

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        self._call("StopContainer", api.StopContainerRequest(container_id=container_id, timeout=timeout))

    def remove_container(self, container_id: str) -> None:
        self._call("RemoveContainer", api.RemoveContainerRequest(container_id=container_id))

    def container_status(self, container_id: str) -> ContainerStatus:
        response = self._call("ContainerStatus", api.ContainerStatusRequest(container_id=container_id, verbose=True))
        status = response.status
        info = json.loads(response.info.get("info", "{}") or "{}")
        return ContainerStatus(
            id=status.id,
            name=status.metadata.name,
            state=ContainerState(status.state),
            exit_code=status.exit_code,
            reason=status.reason,
            message=status.message,
            log_path=status.log_path,
            pid=int(info.get("pid", 0)),
        )

    def list_containers(self, sandbox_id: str = "") -> list[ContainerStatus]:
        request = api.ListContainersRequest()
        if sandbox_id:
            request.filter.pod_sandbox_id = sandbox_id
        return [self.container_status(item.id) for item in self._call("ListContainers", request).containers]

    def exec_sync(self, container_id: str, argv: Sequence[str], timeout: int = 30) -> ExecResult:
        """A command in a running container, with its user and security context; its output as text."""
        request = api.ExecSyncRequest(container_id=container_id, cmd=list(argv), timeout=timeout)
        response = self._call("ExecSync", request)
        stdout: bytes = response.stdout
        stderr: bytes = response.stderr
        return ExecResult(response.exit_code, stdout.decode(errors="replace"), stderr.decode(errors="replace"))

    # --- images ------------------------------------------------------------------------------------------

    def image_present(self, image: str) -> bool:
        return bool(self._image(image).id)

    def image_user(self, image: str) -> tuple[int | None, str]:
        """The image's USER: its uid when numeric, else None and the name ("" when the image sets none)."""
        found = self._image(image)
        return (found.uid.value if found.HasField("uid") else None), found.username

    def _image(self, image: str) -> Any:
        request = api.ImageStatusRequest(image=api.ImageSpec(image=image))
        return self._call("ImageStatus", request, self._images).image


def log_lines(path: str) -> Iterator[tuple[str, str]]:
    """A container's log file in the CRI format (``TIME STREAM TAG TEXT``, TAG ``P`` for a partial line) as
    (stream, line) pairs, partial lines joined."""
    pending = ""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            parts = line.rstrip("\n").split(" ", 3)
            if len(parts) < 4:
                continue
            _, stream, tag, text = parts
            pending += text
            if tag != "P":
                yield stream, pending
                pending = ""


def _sandbox(item: Any) -> Sandbox:
    return Sandbox(
        id=item.id,
        name=item.metadata.name,
        namespace=item.metadata.namespace,
        uid=item.metadata.uid,
        state=SandboxState(item.state),
        labels=dict(item.labels),
        annotations=dict(item.annotations),
    )


def _sandbox_config(config: SandboxConfig) -> Any:
    message = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=config.name, namespace=config.namespace, uid=config.uid),
        # A pod on the node's network has the node's UTS namespace, hence its hostname (as the kubelet does).
        hostname="" if config.host_network else config.hostname or config.name,
        log_directory=config.log_directory,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
    )
    if config.dns_servers or config.dns_searches:
        message.dns_config.servers.extend(config.dns_servers)
        message.dns_config.searches.extend(config.dns_searches)
    message.linux.cgroup_parent = config.cgroup_parent
    options = message.linux.security_context.namespace_options
    options.network = api.NODE if config.host_network else api.POD
    options.pid = api.CONTAINER
    options.ipc = api.POD
    return message


def _container_config(config: ContainerConfig) -> Any:
    message = api.ContainerConfig(
        metadata=api.ContainerMetadata(name=config.name),
        image=api.ImageSpec(image=config.image),
        command=list(config.command),
        args=list(config.args),
        working_dir=config.working_dir,
        # The value is bytes in containerd 1.6's CRI (and in the vendored proto); the text is UTF-8.
        envs=[api.KeyValue(key=key, value=value.encode()) for key, value in config.env.items()],
        mounts=[_mount(mount) for mount in config.mounts],
        log_path=config.log_path,
        labels=dict(config.labels),
        annotations=dict(config.annotations),
    )
    _security(message.linux.security_context, config.security)
    return message


def _mount(mount: Mount) -> Any:
    return api.Mount(container_path=mount.container_path, host_path=mount.host_path, readonly=mount.readonly)


def _security(message: Any, context: SecurityContext) -> None:
    if context.run_as_user is not None:
        message.run_as_user.value = context.run_as_user
    if context.run_as_group is not None:
        message.run_as_group.value = context.run_as_group
    message.readonly_rootfs = context.readonly_rootfs
    message.no_new_privs = context.no_new_privs
    message.privileged = context.privileged
    message.capabilities.add_capabilities.extend(context.add_capabilities)
    message.capabilities.drop_capabilities.extend(context.drop_capabilities)
    message.masked_paths.extend(context.masked_paths)
    message.readonly_paths.extend(context.readonly_paths)
    # containerd 1.6 reads the typed profile and falls back to the deprecated path: both say the same.
    if context.seccomp_runtime_default:
        message.seccomp.profile_type = api.SecurityProfile.RuntimeDefault
        message.seccomp_profile_path = "runtime/default"
    else:
        message.seccomp.profile_type = api.SecurityProfile.Unconfined
        message.seccomp_profile_path = "unconfined"
