"""The ``istio-iptables`` command: wires flags to Config, Config and host facts to a Plan, the Plan to output.

Start-up time is a feature: an init container runs this on every pod's start-up path. A plain run (flags
only, the init container's case) is parsed here from ``config.SETTINGS`` without importing Typer, which
alone costs more than Istio's whole detection sequence; everything else (``--help``, subcommands, any
argument whose meaning is less than obvious) goes to the Typer application in ``app.py``, which parses the
same table the same way (tests hold the two equal). Each path imports only what it needs: a dry run never
loads the backends and an apply never loads the renderers it does not use.
"""

from __future__ import annotations

import os
import sys

from istio_iptables.capture.config import CLEAN_OPTIONS, OPTIONS, go_switches, plain_run, without_leading_word
from istio_iptables.cli import command
from istio_iptables.errors import PROG, IstioIptablesError
from istio_iptables.host import interrupts


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures, SIGINT and SIGTERM included, end with one line on stderr and
    their exit code."""
    _command(PROG, without_leading_word(sys.argv[1:] if argv is None else argv))


def clean_main(argv: list[str] | None = None) -> None:
    """``istio-clean-iptables``, as Istio 1.5 shipped it: the same flags, clean-up only."""
    _command(command.CLEAN_PROG, sys.argv[1:] if argv is None else argv)


def _command(prog: str, argv: list[str]) -> None:
    clean = prog == command.CLEAN_PROG
    interrupts.start()
    try:
        arguments = go_switches(argv)
        # A shell asking for completions runs the command with no arguments and a variable naming the
        # shell: Typer answers it, the plain run (an apply!) must not.
        completing = f"_{prog}_COMPLETE".replace("-", "_").upper() in os.environ
        given = None if completing else plain_run(arguments, CLEAN_OPTIONS if clean else OPTIONS)
        if given is None:
            from istio_iptables.cli.app import main as typer_main  # noqa: PLC0415

            code = typer_main(arguments, clean)
        else:
            command.run(command.configured({**given, "cleanup_only": True} if clean else given))
            code = 0
        interrupts.finish()
    except IstioIptablesError as error:
        interrupts.finish()
        print(f"{prog}: {error}", file=sys.stderr)
        code = error.exit_code
    sys.exit(code)
