"""What every test of the suite needs of the test process itself."""

from __future__ import annotations

import signal

# A run started in the background by a shell without job control (`pytest &` in a script) inherits SIGINT
# ignored, and an ignored signal stays ignored in every child it starts: the tests that stop a child with
# SIGINT would see it carry on. Handled here, SIGINT is back to its default in every child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
