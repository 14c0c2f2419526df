"""Playing the kubelet: a pod spec (the Kubernetes Pod shape, or a workload's pod template) run on the lab's
node over the CRI, mapped field by field as a kubelet maps it.

RunPodSandbox with the pod's name, namespace, uid, labels and annotations (the CNI chain runs there), then
the init containers in order, each run to completion with its exit code checked (a native sidecar, an init
container with ``restartPolicy: Always``, is started and left running), then the containers. Each gets its
image, command, args (``$(VAR)`` expanded), env (values and the ``fieldRef``s a kubelet resolves), emptyDir
mounts (a directory in the node's temp dir; a volume without a source is one, as the API server's defaulting
makes it), ``configMap`` (data given to ``run_pod``), ``downwardAPI`` and projected ``serviceAccountToken``
volumes, and its security context (the pod's merged in) as the kubelet's
``convertToRuntimeSecurityContext`` gives it, with the kubelet's default masked and read-only paths and its
``runAsNonRoot`` check against the image's user.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import math
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from istio_iptables.cni import cri
from istio_iptables.kube.quantity import quantity_value
from tests.lab.node import Node

# kubelet's defaults (k8s.io/kubernetes pkg/securitycontext/util.go) for a container that is not privileged.
DEFAULT_MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# The kubernetes Service's environment, which a kubelet gives every container (enableServiceLinks aside).
# Its address is a test address that nothing routes: no test connects to it.
KUBERNETES_SERVICE_HOST = "198.19.255.1"
SERVICE_ENV = {
    "KUBERNETES_SERVICE_HOST": KUBERNETES_SERVICE_HOST,
    "KUBERNETES_SERVICE_PORT": "443",
    "KUBERNETES_SERVICE_PORT_HTTPS": "443",
    "KUBERNETES_PORT": f"tcp://{KUBERNETES_SERVICE_HOST}:443",
    "KUBERNETES_PORT_443_TCP": f"tcp://{KUBERNETES_SERVICE_HOST}:443",
    "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
    "KUBERNETES_PORT_443_TCP_PORT": "443",
    "KUBERNETES_PORT_443_TCP_ADDR": KUBERNETES_SERVICE_HOST,
}
INIT_TIMEOUT = 120.0
_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class PodError(AssertionError):
    """The pod could not be run as its spec says (the kubelet would report the same as an event)."""


@dataclass
class Pod:
    """A pod running on the lab's node: its sandbox, its containers by name, its namespace."""

    node: Node
    spec: Mapping[str, Any]
    sandbox_id: str
    config: cri.SandboxConfig
    containers: dict[str, str] = field(default_factory=dict)
    failed_init: str | None = None
    """The init container that exited non-zero (the kubelet shows Init:Error); later ones were not run."""
    volumes: dict[str, str] = field(default_factory=dict)
    """Each volume's directory on the node, for the containers started later (:meth:`Kubelet.restart_init`)."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def status(self) -> cri.SandboxStatus:
        return self.node.runtime.sandbox_status(self.sandbox_id)

    @property
    def pid(self) -> int:
        """The pause process, which holds the pod's namespaces."""
        return self.status.pid

    @property
    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @property
    def ip(self) -> str:
        return self.status.ips[0]

    def container(self, name: str) -> cri.ContainerStatus:
        if name not in self.containers:
            raise PodError(f"pod {self.name} has no container {name} (it has {', '.join(self.containers)})")
        return self.node.runtime.container_status(self.containers[name])

    def exit_code(self, name: str) -> int:
        status = self.container(name)
        if status.state != cri.ContainerState.EXITED:
            raise PodError(f"container {name} of pod {self.name} has not exited: {status.state.name}")
        return status.exit_code

    def wait(self, name: str, timeout: float = INIT_TIMEOUT) -> cri.ContainerStatus:
        """The container's status once it has exited (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.container(name)
            if status.state == cri.ContainerState.EXITED:
                return status
            if time.monotonic() > deadline:
                raise PodError(f"container {name} of pod {self.name} still {status.state.name} after {timeout:g} s")
            time.sleep(0.05)

    def logs(self, name: str) -> str:
        """The container's output, stdout and stderr interleaved as the runtime logged them."""
        path = self.container(name).log_path
        return "".join(line + "\n" for _, line in cri.log_lines(path))

    def exec(self, name: str, argv: Sequence[str], timeout: int = 30) -> cri.ExecResult:
        """A command in a running container (ExecSync), with the container's user and security context."""
        return self.node.runtime.exec_sync(self.containers[name], argv, timeout=timeout)

    def in_netns(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command of this machine (as root) in the pod's network namespace, e.g. iptables-save."""
        result = subprocess.run(
            ["nsenter", f"--net={self.netns}", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise PodError(f"{' '.join(argv)} in pod {self.name} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def remove(self) -> None:
        """Delete the pod as a kubelet does: containers stopped, sandbox stopped then removed (CNI DEL twice)."""
        runtime = self.node.runtime
        for container_id in self.containers.values():
            with contextlib.suppress(cri.CriError):
                runtime.stop_container(container_id, timeout=0)
        with contextlib.suppress(cri.CriError):
            runtime.stop_sandbox(self.sandbox_id)
        runtime.remove_sandbox(self.sandbox_id)
        shutil.rmtree(self.node.paths.volumes / self.config.uid, ignore_errors=True)


class Kubelet:
    """Runs pod specs on ``node``; every pod it ran is removed by :meth:`remove_all`."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.pods: list[Pod] = []

    def run_pod(
        self,
        document: Mapping[str, Any] | str,
        *,
        check: bool = True,
        name: str | None = None,
        config_maps: Mapping[str, Mapping[str, str]] | None = None,
    ) -> Pod:
        """Run a pod spec (a Pod, or a Deployment-like document's pod template; YAML text or a mapping).
        With ``check``, an init container that exits non-zero raises :class:`PodError` (its logs included);
        otherwise the pod is returned with ``failed_init`` set, as a kubelet leaves it in Init:Error.
        ``config_maps`` holds the data of the ConfigMaps that ``configMap`` volumes name."""
        pod_doc = pod_document(yaml.safe_load(document) if isinstance(document, str) else document)
        metadata = pod_doc.get("metadata") or {}
        spec = pod_doc.get("spec") or {}
        uid = str(uuid.uuid4())
        pod_name = name or metadata.get("name") or f"{metadata.get('generateName', 'pod-')}{uid[:5]}"
        namespace = metadata.get("namespace", "default")
        labels = {str(k): str(v) for k, v in (metadata.get("labels") or {}).items()}
        config = cri.SandboxConfig(
            name=pod_name,
            namespace=namespace,
            uid=uid,
            labels={
                **labels,
                "io.kubernetes.pod.name": pod_name,
                "io.kubernetes.pod.namespace": namespace,
                "io.kubernetes.pod.uid": uid,
            },
            annotations={str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()},
            hostname=pod_name,
            log_directory=str(self.node.paths.pod_logs / f"{namespace}_{pod_name}_{uid}"),
            cgroup_parent=f"{self.node.cgroup_parent}/pod{uid}",
            host_network=bool(spec.get("hostNetwork", False)),
        )
        volumes = self._volumes(pod_doc, uid, config_maps or {})
        try:
            sandbox_id = self.node.runtime.run_sandbox(config)
        except cri.CriError:
            # A failed ADD fails RunPodSandbox; containerd has removed the sandbox, the volumes are ours.
            shutil.rmtree(self.node.paths.volumes / uid, ignore_errors=True)
            raise
        pod = Pod(self.node, pod_doc, sandbox_id, config, volumes=volumes)
        self.pods.append(pod)
        try:
            self._run_containers(pod, spec.get("initContainers") or [], check)
        except BaseException:
            if check:
                self.remove(pod)
            raise
        return pod

    def restart_init(self, pod: Pod, *, check: bool = True) -> Pod:
        """What a kubelet does after an init container failed (Init:CrashLoopBackOff): that container again, a
        new attempt in the same sandbox (the pod's network is not set up again), and when it succeeds the
        init containers after it and the containers. ``check`` as for :meth:`run_pod`."""
        if pod.failed_init is None:
            raise PodError(f"pod {pod.name} has no failed init container to restart")
        init = list((pod.spec.get("spec") or {}).get("initContainers") or [])
        failed = next(index for index, container in enumerate(init) if container["name"] == pod.failed_init)
        # The failed attempt goes first: the lab's containers carry no attempt number, so the new one takes
        # its name (a kubelet would keep it as attempt 0 and create attempt 1).
        self.node.runtime.remove_container(pod.containers.pop(pod.failed_init))
        pod.failed_init = None
        self._run_containers(pod, init[failed:], check)
        return pod

    def _run_containers(self, pod: Pod, init: Sequence[Mapping[str, Any]], check: bool) -> None:
        """The init containers ``init`` in order, each run to completion, then the pod's containers."""
        for container in init:
            self._start(pod, container, pod.volumes)
            if container.get("restartPolicy") == "Always":
                continue  # a native sidecar: started, and it keeps running beside the containers
            status = pod.wait(container["name"])
            if status.exit_code != 0:
                pod.failed_init = container["name"]
                if check:
                    raise PodError(
                        f"init container {container['name']} of pod {pod.name} exited {status.exit_code} "
                        f"({status.reason}):\n{pod.logs(container['name'])}"
                    )
                return
        for container in (pod.spec.get("spec") or {}).get("containers") or []:
            self._start(pod, container, pod.volumes)

    def remove(self, pod: Pod) -> None:
        if pod in self.pods:
            self.pods.remove(pod)
        pod.remove()

    def remove_all(self) -> None:
        errors = []
        for pod in list(self.pods):
            try:
                self.remove(pod)
            except cri.CriError as error:
                errors.append(str(error))
        if errors:
            raise PodError("; ".join(errors))

    # --- the kubelet's mapping ---------------------------------------------------------------------------

    def _volumes(
        self, pod: Mapping[str, Any], uid: str, config_maps: Mapping[str, Mapping[str, str]]
    ) -> dict[str, str]:
        """Each volume's directory on the node: an emptyDir, a ConfigMap's, the downward API's or a projected
        token's files in the node's temp dir, a hostPath the node maps (its CNI dirs)."""
        paths = {}
        metadata = pod.get("metadata") or {}
        spec = pod.get("spec") or {}
        for volume in spec.get("volumes") or []:
            name = volume["name"]
            directory = self.node.paths.volumes / uid / name
            if "emptyDir" in volume or set(volume) == {"name"}:
                directory.mkdir(parents=True)
                directory.chmod(0o777)  # the kubelet's mode for an emptyDir
            elif "configMap" in volume:
                source = volume["configMap"]["name"]
                directory.mkdir(parents=True)
                if source in config_maps:
                    for key, value in config_maps[source].items():
                        (directory / key).write_text(value)
                elif not volume["configMap"].get("optional", False):
                    raise PodError(f"volume {name}: ConfigMap {source} was not given to the lab's kubelet")
            elif "downwardAPI" in volume:
                directory.mkdir(parents=True)
                for item in volume["downwardAPI"].get("items") or []:
                    path = (item.get("fieldRef") or {}).get("fieldPath")
                    (directory / item["path"]).write_text(downward_file(name, path, metadata, uid))
            elif "projected" in volume:
                directory.mkdir(parents=True)
                for source in volume["projected"].get("sources") or []:
                    if set(source) != {"serviceAccountToken"}:
                        raise PodError(
                            f"volume {name}: the lab projects serviceAccountToken alone, not {sorted(source)}"
                        )
                    token = source["serviceAccountToken"]
                    account = spec.get("serviceAccountName", "default")
                    subject = f"system:serviceaccount:{metadata.get('namespace', 'default')}:{account}"
                    (directory / token["path"]).write_text(lab_token(token.get("audience", ""), subject))
            elif "hostPath" in volume:
                host_path = volume["hostPath"]["path"]
                if host_path not in self.node.host_paths:
                    raise PodError(
                        f"volume {name}: hostPath {host_path} is none of the node's {sorted(self.node.host_paths)}"
                    )
                directory = self.node.host_paths[host_path]
            else:
                kinds = sorted(set(volume) - {"name"})
                raise PodError(f"volume {name}: the lab supports emptyDir, configMap and hostPath, not {kinds}")
            paths[name] = str(directory)
        return paths

    def _start(self, pod: Pod, container: Mapping[str, Any], volumes: Mapping[str, str]) -> None:
        runtime = self.node.runtime
        name = container["name"]
        image = container["image"]
        if not runtime.image_present(image):
            raise PodError(f"container {name}: image {image} is not on the lab's node ({sorted(self.node.images())})")
        pod_context = (pod.spec.get("spec") or {}).get("securityContext") or {}
        security = security_context(container.get("securityContext") or {}, pod_context)
        check_run_as_non_root(name, container.get("securityContext") or {}, pod_context, runtime.image_user(image))
        env = {**SERVICE_ENV, **resolve_env(container, pod)}
        mounts = []
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                raise PodError(f"container {name}: volumeMount {mount['name']} names no volume of the pod")
            mounts.append(cri.Mount(mount["mountPath"], volumes[mount["name"]], bool(mount.get("readOnly", False))))
        config = cri.ContainerConfig(
            name=name,
            image=image,
            command=tuple(expand(str(word), env) for word in container.get("command") or []),
            args=tuple(expand(str(word), env) for word in container.get("args") or []),
            env=env,
            working_dir=container.get("workingDir", ""),
            mounts=tuple(mounts),
            log_path=f"{name}/0.log",
            labels={
                "io.kubernetes.container.name": name,
                **{k: v for k, v in pod.config.labels.items() if k.startswith("io.kubernetes.pod.")},
            },
            security=security,
        )
        container_id = runtime.create_container(pod.sandbox_id, pod.config, config)
        pod.containers[name] = container_id
        runtime.start_container(container_id)


def pod_document(document: Any) -> dict[str, Any]:
    """The Pod of a document: a Pod itself, or the pod template of a Deployment-like workload (its name
    becomes the pod's generateName, as a ReplicaSet's does)."""
    if not isinstance(document, Mapping):
        raise PodError(f"a pod spec must be a mapping, not {type(document).__name__}")
    if document.get("kind", "Pod") == "Pod":
        return copy.deepcopy(dict(document))
    template = (document.get("spec") or {}).get("template")
    if not isinstance(template, Mapping):
        raise PodError(f"{document.get('kind')} has no spec.template")
    pod = copy.deepcopy(dict(template))
    metadata = pod.setdefault("metadata", {})
    metadata.setdefault("generateName", f"{(document.get('metadata') or {}).get('name', 'pod')}-")
    metadata.setdefault("namespace", (document.get("metadata") or {}).get("namespace", "default"))
    return {"apiVersion": "v1", "kind": "Pod", **pod}


def security_context(container: Mapping[str, Any], pod: Mapping[str, Any]) -> cri.SecurityContext:
    """kubelet's determineEffectiveSecurityContext + convertToRuntimeSecurityContext."""
    merged = {
        **{k: pod[k] for k in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile") if k in pod},
        **container,
    }
    capabilities = merged.get("capabilities") or {}
    privileged = bool(merged.get("privileged", False))
    seccomp = (merged.get("seccompProfile") or {}).get("type", "Unconfined")
    if seccomp not in ("RuntimeDefault", "Unconfined"):
        raise PodError(f"seccompProfile.type {seccomp}: the lab supports RuntimeDefault and Unconfined")
    unmasked = privileged or merged.get("procMount") == "Unmasked"
    return cri.SecurityContext(
        run_as_user=_int(merged.get("runAsUser")),
        run_as_group=_int(merged.get("runAsGroup")),
        readonly_rootfs=bool(merged.get("readOnlyRootFilesystem", False)),
        # Only an explicit false sets no_new_privs (the kubelet's AddNoNewPrivileges).
        no_new_privs=merged.get("allowPrivilegeEscalation") is False,
        privileged=privileged,
        add_capabilities=tuple(capabilities.get("add") or ()),
        drop_capabilities=tuple(capabilities.get("drop") or ()),
        seccomp_runtime_default=seccomp == "RuntimeDefault",
        masked_paths=() if unmasked else DEFAULT_MASKED_PATHS,
        readonly_paths=() if unmasked else DEFAULT_READONLY_PATHS,
    )


def check_run_as_non_root(
    name: str, container: Mapping[str, Any], pod: Mapping[str, Any], image_user: tuple[int | None, str]
) -> None:
    """kubelet's verifyRunAsNonRoot: the messages are the kubelet's (CreateContainerConfigError)."""
    non_root = container.get("runAsNonRoot", pod.get("runAsNonRoot"))
    if not non_root:
        return
    user = _int(container.get("runAsUser", pod.get("runAsUser")))
    if user is not None:
        if user == 0:
            raise PodError(f"container {name}: container's runAsUser breaks non-root policy")
        return
    uid, username = image_user
    if uid is None and username:
        raise PodError(f"container {name}: container has runAsNonRoot and image has non-numeric user ({username})")
    if not uid:
        raise PodError(f"container {name}: container has runAsNonRoot and image will run as root")


def resolve_env(container: Mapping[str, Any], pod: Pod) -> dict[str, str]:
    """The container's env values in order (a value may use earlier ones as ``$(NAME)``), ``fieldRef``s and
    ``resourceFieldRef``s resolved."""
    resolved: dict[str, str] = {}
    metadata = pod.spec.get("metadata") or {}
    for item in container.get("env") or []:
        if "value" in item:
            resolved[item["name"]] = expand(str(item["value"]), resolved)
            continue
        source = item.get("valueFrom") or {}
        if "resourceFieldRef" in source:
            resolved[item["name"]] = resource_value(item["name"], source["resourceFieldRef"], container)
            continue
        path = (source.get("fieldRef") or {}).get("fieldPath")
        if path is None:
            raise PodError(f"env {item.get('name')}: the lab resolves value, fieldRef and resourceFieldRef only")
        fields = {
            "metadata.name": pod.config.name,
            "metadata.namespace": pod.config.namespace,
            "metadata.uid": pod.config.uid,
            "spec.nodeName": pod.node.tag,
            "spec.serviceAccountName": (pod.spec.get("spec") or {}).get("serviceAccountName", "default"),
            "status.podIP": pod.ip,
            "status.podIPs": ",".join(pod.status.ips),
            "status.hostIP": pod.node.gateway,
        }
        labelled = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if labelled:
            value = (metadata.get(labelled.group(1)) or {}).get(labelled.group(2), "")
        elif path in fields:
            value = fields[path]
        else:
            raise PodError(f"env {item.get('name')}: fieldRef {path} is not one the lab resolves")
        resolved[item["name"]] = str(value)
    return resolved


def resource_value(name: str, reference: Mapping[str, Any], container: Mapping[str, Any]) -> str:
    """kubelet's ExtractContainerResourceValue for a limit or request the container sets: the amount over the
    divisor, rounded up (without a limit a kubelet gives the node's allocatable, which the lab has none of)."""
    part, _, kind = str(reference["resource"]).partition(".")
    amount = ((container.get("resources") or {}).get(part) or {}).get(kind)
    if amount is None:
        raise PodError(f"env {name}: resourceFieldRef {reference['resource']}: the container sets none")
    divisor = quantity_value(str(reference.get("divisor", "1")))
    return str(math.ceil(quantity_value(str(amount)) / divisor))


def downward_file(volume: str, path: str | None, metadata: Mapping[str, Any], uid: str) -> str:
    """A downwardAPI volume's file as the kubelet writes it: labels and annotations as sorted ``key="value"``
    lines (Go's %q: JSON's quoting for the text these carry)."""
    if path in ("metadata.labels", "metadata.annotations"):
        entries = metadata.get(path.removeprefix("metadata.")) or {}
        return "\n".join(f"{key}={json.dumps(str(entries[key]))}" for key in sorted(entries))
    fields = {"metadata.name": metadata.get("name", ""), "metadata.namespace": metadata.get("namespace", "default")}
    if path == "metadata.uid":
        return uid
    if path not in fields:
        raise PodError(f"volume {volume}: downwardAPI fieldRef {path} is not one the lab writes")
    return str(fields[path])


def lab_token(audience: str, subject: str) -> str:
    """A projected service account token: there is no API server to issue one, so the lab writes a JWT of the
    claims a kubelet's TokenRequest would carry, unsigned (``alg: none``); nothing in the lab verifies it."""

    def part(claims: Mapping[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()

    issued = int(time.time())
    claims = {"aud": [audience], "sub": subject, "iat": issued, "exp": issued + 3600, "iss": "iilab"}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: defined names replaced, ``$$`` an escaped ``$``, others kept."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, text)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)
