"""The log lines Istio writes (zap's layout), for ``logsetup``: imported only with the first message logged."""

from __future__ import annotations

import logging
import time
import traceback

from . import logsetup
from .config import LogLevel, LogOptions

_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error"}


class IstioFormatter(logging.Formatter):
    """Istio's zap layout: ``<RFC 3339 UTC time>\\t<level>\\t<message>``, or one JSON object per line."""

    def __init__(self, options: LogOptions) -> None:
        super().__init__()
        self.options = options

    def format(self, record: logging.LogRecord) -> str:
        stamp = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.created % 1 * 1e6):06d}Z"
        )
        level = _LEVEL_NAMES.get(record.levelno, "fatal" if record.levelno >= logging.CRITICAL else "error")
        message = record.getMessage()
        if record.stack_info:
            message += "\n" + record.stack_info
        caller = f"{record.module}.{record.funcName}:{record.lineno}" if self.options.caller else ""
        if self.options.as_json:
            entry = {"time": stamp, "level": level, "scope": "default", "msg": message}
            if caller:
                entry["caller"] = caller
            import json  # noqa: PLC0415 (only JSON logs need it)

            return json.dumps(entry)
        return "\t".join(part for part in (stamp, level, caller, message) if part)


class StackAbove(logging.Filter):
    def __init__(self, level: LogLevel) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level and not record.stack_info:
            # The caller's stack, without the frames of logging and of the package's logger.
            frames = [frame for frame in traceback.extract_stack() if frame.filename not in _LOGGING_FILES]
            record.stack_info = "".join(traceback.format_list(frames))
        return True


_LOGGING_FILES = {logging.__file__, __file__, logsetup.__file__}
