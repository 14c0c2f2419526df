"""``python -m relay``: run the relay (``relay.server``) until SIGTERM or SIGINT."""

from __future__ import annotations

import sys

from relay.server import main

sys.exit(main())
