"""The thin client (the plugin's executable, cni-client/) with the node agent (``cni agent``), run as a runtime
runs them (cnilab): through a live agent every answer is the plugin's own (stdout, exit code, stderr); with
no usable agent (no agent file, no socket, the agent killed in the middle of a request, the agent hung) the
client runs the self-contained plugin and the pod gets the same result.

The build is the one ``scripts/build-cni-plugin`` makes, copied as an installer copies it. Where a test must
show that an answer came from the agent, the copy's bundle is replaced by a script that fails loudly, so a
fallback could not pass for the agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from istio_iptables.cni import install
from tests.kernel import cnilab, test_cni
from tests.kernel.cnilab import INJECTED, CniError, CniLab, Runtime
from tests.kernel.test_cni import our_rules

pytestmark = pytest.mark.kernel

cni_lab, frozen_build = test_cni.cni_lab, test_cni.frozen_build  # the fixtures, here too

CLI = str(Path(sys.executable).with_name("istio-iptables"))
BUNDLE = f"{cnilab.PLUGIN_NAME}.d/{cnilab.PLUGIN_NAME}"
NO_BUNDLE = "#!/bin/sh\necho 'the bundle ran: the agent did not answer' >&2\nexit 97\n"
BAD_ANNOTATION = {**INJECTED, "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/33"}


class Agent:
    """``istio-iptables cni agent`` in the node namespace, as the DaemonSet's container runs it."""

    def __init__(self, lab: CniLab, node: str, directory: Path, *, path: str = "", timeout: str = "20") -> None:
        self.socket = directory / "agent.sock"
        environment = f"PATH={path}:{lab.env['PATH']}" if path else f"PATH={lab.env['PATH']}"
        argv = ["env", environment, CLI, "cni", "agent", "--socket", str(self.socket), "--request-timeout", timeout]
        self.actor = lab.spawn(node, argv, name=f"agent-{directory.name}")
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            assert self.actor.popen.poll() is None, self.actor.output()
            assert time.monotonic() < deadline, f"the agent did not listen within 30 s: {self.actor.output()}"
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        """The agent itself (``env`` execs it)."""
        return self.actor.popen.pid


def node_with_client(lab: CniLab, build: Path, name: str, *, bundle: bool = True) -> Runtime:
    """A node whose CNI bin dir holds the build (client and bundle); without ``bundle``, the bundle fails."""
    folder = lab.tmp / name
    folder.mkdir()
    executable = cnilab.copy_frozen_plugin(build, folder)
    if not bundle:
        stand_in = executable.parent / BUNDLE
        stand_in.unlink()
        stand_in.write_text(NO_BUNDLE)
        stand_in.chmod(0o755)
    return cnilab.make_runtime(lab, executable, {"iptables": "nft"}, name)


def point_to(runtime: Runtime, agent_socket: Path | str, timeout_ms: int | None = None) -> None:
    """The agent file as ``cni install --agent-socket`` writes it (a time limit line added for a test)."""
    client = (runtime.bin_dir / cnilab.PLUGIN_NAME).resolve()
    text = f"{agent_socket}\n" + (f"{timeout_ms}\n" if timeout_ms else "")
    (client.parent / install.AGENT_FILE).write_text(text)


@pytest.fixture
def served(cni_lab: CniLab, frozen_build: Path) -> Iterator[tuple[Runtime, Agent]]:
    runtime = node_with_client(cni_lab, frozen_build, "served", bundle=False)
    agent = Agent(cni_lab, runtime.node, cni_lab.tmp / "agent-served")
    point_to(runtime, agent.socket)
    yield runtime, agent


def test_through_the_agent_pods_are_captured_checked_and_cleaned_and_left_alone(
    served: tuple[Runtime, Agent],
) -> None:
    runtime, _ = served
    pod = runtime.new_pod(INJECTED)
    result = runtime.add(pod)
    assert result == runtime.log[-2].json(), "ADD's answer is the previous plugin's result"
    assert "-A ISTIO_OUTPUT" in our_rules(runtime, pod)
    assert runtime.ours(pod, "CHECK").returncode == 0
    runtime.lab.sh(pod.netns, ["iptables-nft", "-t", "nat", "-F", "ISTIO_OUTPUT"])
    drift = runtime.ours(pod, "CHECK")
    assert drift.returncode == 1
    assert drift.json()["code"] == 102, drift.stdout
    runtime.delete(pod)
    assert our_rules(runtime, pod) == ""
    alone = runtime.new_pod({})
    assert runtime.add(alone) == runtime.log[-2].json()
    assert our_rules(runtime, alone) == ""
    runtime.delete(alone)


def test_the_agents_answers_are_the_bundles_byte_for_byte(
    cni_lab: CniLab,
    frozen_build: Path,
    served: tuple[Runtime, Agent],
) -> None:
    """An error passes through whole: exit code, the error object on stdout, the one line on stderr."""
    runtime, _ = served
    bundled = node_with_client(cni_lab, frozen_build, "bundled")
    answers = []
    for node in (runtime, bundled):
        pod = node.new_pod(BAD_ANNOTATION)
        with pytest.raises(CniError) as failure:
            node.add(pod, delete_on_failure=False)
        refused = failure.value.invocation
        version = node.invoke({"type": cnilab.PLUGIN_NAME}, "VERSION", pod, None)
        answers.append((refused.returncode, refused.stdout, refused.stderr, version.returncode, version.stdout))
    assert answers[0] == answers[1]
    code, stdout, stderr, *_ = answers[0]
    assert code == 1
    assert json.loads(stdout)["code"] == 100
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges" in stdout
    assert stderr.startswith("istio-iptables-cni: ") and "10.0.0.0/33" in stderr


def test_a_request_over_the_agents_bound_goes_to_the_bundle_and_the_agent_serves_on(
    served: tuple[Runtime, Agent],
) -> None:
    """Over 4 MB of input the client does not send it (the agent would refuse it): it runs the bundle, here
    the stand-in, with the whole input."""
    runtime, agent = served
    pod = runtime.new_pod(INJECTED)
    big = runtime.invoke({"type": cnilab.PLUGIN_NAME, "padding": "x" * (5 * 1024 * 1024)}, "VERSION", pod, None)
    assert (big.returncode, big.stderr) == (97, "the bundle ran: the agent did not answer\n")
    assert runtime.invoke({"type": cnilab.PLUGIN_NAME}, "VERSION", pod, None).returncode == 0
    assert agent.actor.popen.poll() is None


@pytest.mark.parametrize("agent_file", ["none", "no-socket", "not-a-socket", "empty"])
def test_without_a_usable_agent_the_client_runs_the_bundle(
    cni_lab: CniLab,
    frozen_build: Path,
    agent_file: str,
) -> None:
    runtime = node_with_client(cni_lab, frozen_build, f"fallback-{agent_file}")
    if agent_file == "no-socket":
        point_to(runtime, cni_lab.tmp / "nowhere" / "agent.sock")
    elif agent_file == "not-a-socket":
        (cni_lab.tmp / "plain-file").write_text("")
        point_to(runtime, cni_lab.tmp / "plain-file")
    elif agent_file == "empty":
        point_to(runtime, "")
    pod = runtime.new_pod(INJECTED)
    runtime.add(pod)
    assert "-A ISTIO_OUTPUT" in our_rules(runtime, pod)
    runtime.delete(pod)
    assert our_rules(runtime, pod) == ""


def test_an_agent_killed_in_the_middle_of_a_request_leaves_the_bundle_to_answer(
    cni_lab: CniLab,
    frozen_build: Path,
) -> None:
    """The agent's apply is held up (its iptables-nft-restore waits), the agent is killed: the client's
    connection ends without a reply, and the bundle applies the same rules."""
    runtime = node_with_client(cni_lab, frozen_build, "killed")
    spy, started = cni_lab.tmp / "slow", cni_lab.tmp / "restore-started"
    spy.mkdir()
    real = subprocess.run(["sh", "-c", "command -v iptables-nft-restore"], capture_output=True, text=True, check=True)
    (spy / "iptables-nft-restore").write_text(f'#!/bin/sh\ntouch {started}\nsleep 2\nexec {real.stdout.strip()} "$@"\n')
    (spy / "iptables-nft-restore").chmod(0o755)
    agent = Agent(cni_lab, runtime.node, cni_lab.tmp / "agent-killed", path=str(spy))
    point_to(runtime, agent.socket)
    reference = node_with_client(cni_lab, frozen_build, "reference")
    expected_pod = reference.new_pod(INJECTED)
    reference.add(expected_pod)

    pod = runtime.new_pod(INJECTED)
    with ThreadPoolExecutor(1) as pool:
        adding = pool.submit(runtime.add, pod)
        _wait_for(started.exists, "the agent's worker to reach the apply")
        os.kill(agent.pid, signal.SIGKILL)
        result = adding.result(timeout=90)
    assert result == runtime.log[-2].json()
    assert _rules(runtime, pod) == _rules(reference, expected_pod)


def test_a_hung_agent_is_given_up_after_the_time_limit_and_the_bundle_answers(
    cni_lab: CniLab,
    frozen_build: Path,
) -> None:
    runtime = node_with_client(cni_lab, frozen_build, "hung")
    agent = Agent(cni_lab, runtime.node, cni_lab.tmp / "agent-hung")
    point_to(runtime, agent.socket, timeout_ms=1500)
    os.kill(agent.pid, signal.SIGSTOP)  # accepts nothing, answers nothing; connections wait in its backlog
    try:
        pod = runtime.new_pod(INJECTED)
        runtime.add(pod)
        assert "-A ISTIO_OUTPUT" in our_rules(runtime, pod)
    finally:
        os.kill(agent.pid, signal.SIGKILL)  # not SIGCONT: it would run the ADD it holds, after the test


def test_a_request_past_the_agents_time_is_stopped_and_answered_as_a_failure(
    cni_lab: CniLab, frozen_build: Path
) -> None:
    """A plugin run that hangs in the agent is the agent's to end: the client gets a complete answer (an
    error), not a second run of the plugin racing the first."""
    runtime = node_with_client(cni_lab, frozen_build, "late", bundle=False)
    spy = cni_lab.tmp / "hanging"
    spy.mkdir()
    (spy / "iptables-nft-restore").write_text("#!/bin/sh\nexec sleep 4\n")
    (spy / "iptables-nft-restore").chmod(0o755)
    agent = Agent(cni_lab, runtime.node, cni_lab.tmp / "agent-late", path=str(spy), timeout="1")
    point_to(runtime, agent.socket)
    pod = runtime.new_pod(INJECTED)
    with pytest.raises(CniError) as failure:
        runtime.add(pod, delete_on_failure=False)
    refused = failure.value.invocation
    assert refused.returncode != 0
    assert "the plugin did not answer within 1 s: stopped" in refused.stderr
    assert "the bundle ran" not in refused.stderr
    assert agent.actor.popen.poll() is None  # and the agent serves on
    assert runtime.invoke({"type": cnilab.PLUGIN_NAME}, "VERSION", pod, None).returncode == 0


def test_the_agent_has_imported_everything_a_captured_pods_add_check_and_del_import(cni_lab: CniLab) -> None:
    """WARM_MODULES is complete: after warm_up, the plugin's ADD, CHECK and DEL of a captured pod (iptables
    and native nftables) import no module, so no request pays for an import."""
    runtime = cnilab.make_runtime(cni_lab, cnilab.CONSOLE_PLUGIN, {"iptables": "nft"}, "warm")
    runtime.chained = False  # the bridge alone: pods with addresses, and no rules yet
    pods = [runtime.new_pod(INJECTED) for _ in range(2)]
    for pod in pods:
        runtime.add(pod)
    script = f"""
import json, sys
from istio_iptables.cni import agent, plugin, protocol
agent.warm_up()
before = set(sys.modules)
for netns, config in zip({[pod.netns_path for pod in pods]!r}, [{{"iptables": "nft"}},
                         {{"values": {{"global": {{"nativeNftables": True}}}}}}]):
    stdin = {{"cniVersion": "1.0.0", "name": "k8s", "type": "istio-iptables-cni", **config,
              "runtimeConfig": {{"{cnilab.ANNOTATIONS_CAPABILITY}": {json.dumps(INJECTED)}}},
              "prevResult": {{"cniVersion": "1.0.0"}}}}
    for command in ("ADD", "CHECK", "DEL"):
        env = {{"CNI_COMMAND": command, "CNI_CONTAINERID": "c", "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
                "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"}}
        plugin.handle(protocol.read_request(env, json.dumps(stdin).encode()))
print(json.dumps(sorted(set(sys.modules) - before)))
"""
    # A UTF-8 locale, as the agent's container has: the lab's C locale would load the ascii codec up front.
    imported = cni_lab.sh(runtime.node, ["env", "LC_ALL=C.UTF-8", sys.executable, "-c", script])
    assert json.loads(imported.splitlines()[-1]) == []


def _rules(runtime: Runtime, pod: cnilab.PodSandbox) -> list[str]:
    """The pod's nat rules, as iptables-nft-save lists them (without counters and comments of time)."""
    saved = runtime.lab.sh(pod.netns, ["iptables-nft-save", "-t", "nat"])
    return [line for line in saved.splitlines() if line.startswith(("-A", ":ISTIO"))]


def _wait_for(condition: object, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.02)
