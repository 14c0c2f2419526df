"""The logging module's handlers for Istio's log lines, for ``log``: imported only when an option needs logging's
frames (the caller, stack traces)."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error"}


class IstioFormatter(logging.Formatter):
    """Istio's zap layout (``log.format_line``, given: this module imports nothing of the package, which
    imports it) for the logging module's records."""

    def __init__(self, format_line: Callable[[float, str, str, str, bool], str], as_json: bool, caller: bool) -> None:
        super().__init__()
        self.format_line = format_line
        self.as_json = as_json
        self.caller = caller

    def format(self, record: logging.LogRecord) -> str:
        level = _LEVEL_NAMES.get(record.levelno, "fatal" if record.levelno >= logging.CRITICAL else "error")
        message = record.getMessage()
        if record.stack_info:
            message += "\n" + record.stack_info
        caller = f"{record.module}.{record.funcName}:{record.lineno}" if self.caller else ""
        return self.format_line(record.created, level, message, caller, self.as_json)


class StackAbove(logging.Filter):
    def __init__(self, level: int, skipped: set[str]) -> None:
        super().__init__()
        self.level = level
        self.skipped = {logging.__file__, __file__, *skipped}
        """The files whose frames the stack leaves out: logging's and the package's logger's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level and not record.stack_info:
            # The caller's stack, without the frames of logging and of the package's logger.
            frames = [frame for frame in traceback.extract_stack() if frame.filename not in self.skipped]
            record.stack_info = "".join(traceback.format_list(frames))
        return True
