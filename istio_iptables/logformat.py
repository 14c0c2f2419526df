"""The log lines Istio writes (zap's layout), for ``logsetup``: imported only with the first message logged."""

from __future__ import annotations

import logging
import traceback

from . import logsetup
from .config import LogLevel, LogOptions

_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error"}


class IstioFormatter(logging.Formatter):
    """Istio's zap layout (``logsetup.format_line``) for the logging module's records."""

    def __init__(self, options: LogOptions) -> None:
        super().__init__()
        self.options = options

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVEL_NAMES.get(record.levelno, "fatal" if record.levelno >= logging.CRITICAL else "error")
        message = record.getMessage()
        if record.stack_info:
            message += "\n" + record.stack_info
        caller = f"{record.module}.{record.funcName}:{record.lineno}" if self.options.caller else ""
        return logsetup.format_line(record.created, level, message, caller, self.options.as_json)


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
