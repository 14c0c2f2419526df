"""The console commands ``istio-iptables``, ``istio-clean-iptables`` and the CNI plugin ``istio-iptables-cni``.

An init container's run is mostly start-up and exit, so a one-shot run does not collect garbage: each module
loaded would otherwise set off collections that find nothing to free (the objects made are acyclic records,
strings and tables that live until exit), and exit would scan every object once more. The collector stays off,
and what is left is frozen before the interpreter tears down. The commands that keep running (the webhook, the
CNI installer's --watch, the node agent and repair) keep the collector: without it their memory grows with
every request, so they turn it back on once their modules are loaded (``app.py``). Only the console commands
do this; the library, and tests that call ``cli.main``, keep the collector as they found it.
"""

from __future__ import annotations

import gc
import io
import sys
from collections.abc import Callable

gc.disable()

# Each command imports its modules here, with the collector off (the point), and only its own: the CNI
# plugin's run never loads the CLI's, nor the CLI's the plugin's.


def main() -> None:
    _interruptible()
    from istio_iptables.cli import fast as cli  # noqa: PLC0415

    _print_as_read()
    _without_collection(cli.main)


def clean_main() -> None:
    _interruptible()
    from istio_iptables.cli import fast as cli  # noqa: PLC0415

    _print_as_read()
    _without_collection(cli.clean_main)


def cni_main() -> None:
    # The plugin installs the handlers itself once it is to change something: most pods it leaves alone,
    # answering before the signal module (and enum with it) would even be loaded.
    from istio_iptables.cni import plugin  # noqa: PLC0415

    _without_collection(plugin.main)


def _interruptible() -> None:
    """Before the rest is imported: from here on SIGINT and SIGTERM end the process with one line, no traceback."""
    from istio_iptables.host import interrupts  # noqa: PLC0415

    interrupts.install()


def _print_as_read() -> None:
    """What the kernel lists may hold any bytes (a foreign rule's comment, read losslessly): written out as
    read, whatever the locale, rather than failing on them."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="surrogateescape")


def _without_collection(command: Callable[[], None]) -> None:
    try:
        command()
    finally:
        gc.freeze()
