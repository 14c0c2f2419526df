"""Shared test helpers: the CLI run in-process with a controlled environment, and golden comparison."""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest

from istio_iptables.capture.config import SETTINGS, Config
from istio_iptables.cli import command
from istio_iptables.cli import fast as cli

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SETTING_ENVVARS = {name for setting in SETTINGS for name in setting.envvars}


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while inside, so that a killed test run still tears its fixtures down
    (namespaces, processes, nodes)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ without any of our settings' variables, plus ``env``; restored afterwards."""
    saved = dict(os.environ)
    try:
        for name in SETTING_ENVVARS:
            os.environ.pop(name, None)
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_cli(
    args: list[str], env: Mapping[str, str] | None = None, main: Callable[[list[str]], None] = cli.main
) -> Result:
    """``main`` (``istio-iptables``'s by default) run in-process: its exit code and output."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with environment(env or {}), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return Result(code, stdout.getvalue(), stderr.getvalue())


def canonical_lines(lines: list[str]) -> list[str]:
    """Lines with IPv6 addresses in canonical form, so ``::127.0.0.53/128`` equals ``::7f00:35/128``."""
    return [" ".join(_canonical(token) for token in line.split(" ")) for line in lines if line.strip()]


def _canonical(token: str) -> str:
    if ":" not in token:
        return token
    try:
        return str(ipaddress.ip_interface(token))
    except ValueError:
        return token


def record_runs(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Configs that reach ``command.run`` without --dry-run: recorded, never applied (a dry run runs)."""
    calls: list[Config] = []
    real_run = command.run

    def safe_run(config: Config) -> None:
        if config.dry_run:
            real_run(config)
        else:
            calls.append(config)

    monkeypatch.setattr(command, "run", safe_run)
    return calls


def kubernetes_validate(path: Path) -> str:
    """``kubernetes-validate --strict`` of a manifest file (skipping the test without it): its report, after
    asserting that every document passed."""
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def fake_cni_plugin(path: Path, message: str = "") -> Path:
    """An executable that answers CNI VERSION as the plugin does (install runs the installed copy before any
    configuration names it); ``message`` makes every copy distinct."""
    answer = '{"cniVersion": "1.0.0", "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}'
    path.write_text(f"#!/bin/sh\n# {message}\necho '{answer}'\n")
    path.chmod(0o755)
    return path
