"""The CRI client's pure parts: records to messages (as containerd 1.6 reads them) and the CRI log format."""

from __future__ import annotations

from pathlib import Path

from istio_iptables.cni import cri
from istio_iptables.cni.cri import _container_config, _sandbox_config
from istio_iptables.cni.cri_api import api_pb2 as api


def test_env_values_are_bytes_as_containerd_1_6_reads_them() -> None:
    message = _container_config(cri.ContainerConfig(name="app", image="app:1", env={"GREETING": "grüß"}))
    (pair,) = message.envs
    assert (pair.key, pair.value) == ("GREETING", "grüß".encode())


def test_the_security_context_maps_field_by_field() -> None:
    security = cri.SecurityContext(
        run_as_user=1337,
        run_as_group=1337,
        readonly_rootfs=True,
        no_new_privs=True,
        add_capabilities=("NET_ADMIN",),
        drop_capabilities=("ALL",),
        seccomp_runtime_default=True,
        masked_paths=("/proc/kcore",),
        readonly_paths=("/proc/sys",),
    )
    context = _container_config(cri.ContainerConfig(name="a", image="a:1", security=security)).linux.security_context
    assert (context.run_as_user.value, context.run_as_group.value) == (1337, 1337)
    assert context.readonly_rootfs and context.no_new_privs and not context.privileged
    assert list(context.capabilities.add_capabilities) == ["NET_ADMIN"]
    assert list(context.capabilities.drop_capabilities) == ["ALL"]
    assert context.seccomp.profile_type == api.SecurityProfile.RuntimeDefault
    assert context.seccomp_profile_path == "runtime/default"
    assert (list(context.masked_paths), list(context.readonly_paths)) == (["/proc/kcore"], ["/proc/sys"])
    # Root is not asked for when no user is given: the image's USER applies.
    unset = _container_config(cri.ContainerConfig(name="a", image="a:1")).linux.security_context
    assert not unset.HasField("run_as_user")
    assert unset.seccomp.profile_type == api.SecurityProfile.Unconfined


def test_a_host_network_sandbox_shares_the_nodes_network_and_hostname() -> None:
    pod = _sandbox_config(cri.SandboxConfig(name="p", namespace="n", uid="u"))
    host = _sandbox_config(cri.SandboxConfig(name="p", namespace="n", uid="u", host_network=True))
    assert (pod.linux.security_context.namespace_options.network, pod.hostname) == (api.POD, "p")
    assert (host.linux.security_context.namespace_options.network, host.hostname) == (api.NODE, "")


def test_log_lines_join_partial_lines_and_keep_the_stream(tmp_path: Path) -> None:
    log = tmp_path / "0.log"
    log.write_text(
        "2026-01-01T00:00:00.000000001Z stdout P hello \n"
        "2026-01-01T00:00:00.000000002Z stdout F world\n"
        "2026-01-01T00:00:00.000000003Z stderr F a  spaced  line\n"
    )
    assert list(cri.log_lines(str(log))) == [("stdout", "hello world"), ("stderr", "a  spaced  line")]
