"""The ``inject`` command end to end in-process: files and stdin in, YAML out, bad input refused with one
line and exit 2, nothing written; and the main command taking Istio's injector argv as it is."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from istio_iptables.capture import config as argv
from istio_iptables.capture.config import load
from istio_iptables.kube.capture import init_args, load_settings
from tests.helpers import run_cli

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  template:
    metadata:
      annotations: {traffic.sidecar.istio.io/includeInboundPorts: "8080"}
    spec:
      containers: [{name: web, image: web:1}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
"""


def _init(document: dict[str, object]) -> dict[str, object]:
    return document["spec"]["template"]["spec"]["initContainers"][0]  # type: ignore[index, no-any-return]


def test_inject_a_file_to_stdout(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(DEPLOYMENT)
    result = run_cli(
        ["inject", "--capture-only", "-f", str(source), "--set", "values.global.proxy.excludeIPRanges=10.0.0.0/8"]
    )
    assert result.code == 0, result.stderr
    deployment, service = yaml.safe_load_all(result.stdout)
    args = _init(deployment)["args"]
    assert args[args.index("-b") + 1] == "8080"
    assert args[args.index("-x") + 1] == "10.0.0.0/8"
    assert service == yaml.safe_load(DEPLOYMENT.split("---\n")[1])


def test_inject_stdin_to_a_file_with_an_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(DEPLOYMENT))
    output = tmp_path / "out.yaml"
    result = run_cli(
        ["inject", "--capture-only", "-f", "-", "-o", str(output), "--image", "registry.example/istio-iptables:1"]
    )
    assert result.code == 0, result.stderr
    assert result.stdout == ""
    deployment = next(yaml.safe_load_all(output.read_text()))
    assert _init(deployment)["image"] == "registry.example/istio-iptables:1"


def test_values_and_mesh_config_files_or_their_configmaps(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(DEPLOYMENT)
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"global": {"proxy": {"statusPort": 0}, "imagePullPolicy": "IfNotPresent"}}))
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "istio"},
                "data": {"mesh": "defaultConfig:\n  interceptionMode: TPROXY\n"},
            }
        )
    )
    result = run_cli(
        ["inject", "--capture-only", "-f", str(source), "--values", str(values), "--mesh-config", str(mesh)]
    )
    assert result.code == 0, result.stderr
    container = _init(next(yaml.safe_load_all(result.stdout)))
    assert container["imagePullPolicy"] == "IfNotPresent"
    args = container["args"]
    assert args[args.index("-d") + 1] == "15090,15021"
    assert args[args.index("-m") + 1] == "TPROXY"


@pytest.mark.parametrize(
    ("content", "extra", "named"),
    [
        ("kind: [unclosed", [], "not valid YAML"),
        (DEPLOYMENT.replace('"8080"', '"eighty"'), [], "annotation 'traffic.sidecar.istio.io/includeInboundPorts'"),
        (DEPLOYMENT, ["--set", "values.global.proxy.statusPort=x"], "setting values.global.proxy.statusPort"),
        (DEPLOYMENT, ["--set", "nonsense"], "--set"),
        (DEPLOYMENT, ["--values", "/nonexistent/values.yaml"], "--values"),
        (DEPLOYMENT, ["--image", "two words"], "--image"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, content: str, extra: list[str], named: str
) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(content)
    output = tmp_path / "out.yaml"
    result = run_cli(["inject", "--capture-only", "-f", str(source), "-o", str(output), *extra])
    assert result.code == 2
    assert named in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not output.exists()
    assert list(tmp_path.iterdir()) == [source]


def test_a_refused_workload_names_it(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(DEPLOYMENT.replace('"8080"', '"-1"'))
    result = run_cli(["inject", "--capture-only", "-f", str(source)])
    assert result.code == 2
    assert result.stderr.startswith("istio-iptables: Deployment shop/web: ")


def test_a_missing_file_is_named() -> None:
    result = run_cli(["inject", "--capture-only", "-f", "/nonexistent/app.yaml"])
    assert (result.code, result.stderr.strip()) == (
        2,
        "istio-iptables: invalid value for -f/--filename: '/nonexistent/app.yaml': No such file or directory",
    )


def test_the_capture_environment_does_not_concern_inject(tmp_path: Path) -> None:
    source = tmp_path / "app.yaml"
    source.write_text(DEPLOYMENT)
    result = run_cli(["inject", "--capture-only", "-f", str(source)], env={"INBOUND_CAPTURE_PORT": "not-a-port"})
    assert result.code == 0, result.stderr


# ---- the main command takes Istio's injector argv as it is ---------------------------------------------

ISTIO_ARGV = init_args({}, load_settings())


def test_the_leading_word_changes_nothing() -> None:
    with_word = run_cli([*ISTIO_ARGV, "--dry-run"])
    without = run_cli([*ISTIO_ARGV[1:], "--dry-run"])
    assert with_word.code == without.code == 0, with_word.stderr
    assert with_word.stdout == without.stdout
    assert "-A ISTIO_OUTPUT" in with_word.stdout


@pytest.mark.parametrize(
    "flags",
    [
        ["--run-validation", "--skip-rule-apply"],
        ["--force-apply"],
        ["--native-nftables"],
        ["--log_as_json"],
        ["--log_output_level=default:debug"],
    ],
)
def test_every_flag_the_injector_may_pass_takes_the_fast_path(flags: list[str]) -> None:
    arguments = argv.without_leading_word([*ISTIO_ARGV, *flags])
    given = argv.plain_run(arguments)
    assert given is not None
    load(given, {})


def test_the_injectors_argv_runs_without_typer_or_yaml() -> None:
    probe = (
        "import sys; from istio_iptables.cli import fast as cli\n"
        f"try: cli.main({[*ISTIO_ARGV, '--native-nftables', '--log_as_json', '--dry-run']!r})\n"
        "except SystemExit as exit_: assert exit_.code == 0, exit_.code\n"
        "loaded = {'typer', 'yaml', 'istio_iptables.kube', 'istio_iptables.cli.app'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "table inet" in done.stdout or "add table" in done.stdout


def test_the_word_alone_is_not_a_subcommand_error() -> None:
    result = run_cli(["istio-iptables", "--help"])
    assert result.code == 0
    assert "inject" in result.stdout
