"""Logging as Istio's ``--log_output_level``, ``--log_as_json``, ``--log_target`` and ``--log_caller`` ask."""

from __future__ import annotations

import logging
import sys
import time
import traceback

from .config import LogLevel, LogOptions
from .errors import ConfigError

_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn", logging.ERROR: "error"}


class _IstioFormatter(logging.Formatter):
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


class _StackAbove(logging.Filter):
    def __init__(self, level: LogLevel) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level and not record.stack_info:
            record.stack_info = "".join(traceback.format_stack()[:-6])
        return True


def configure(options: LogOptions) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(options.level)
    formatter = _IstioFormatter(options)
    for target in options.targets:
        handler: logging.Handler
        if target in ("stderr", "stdout"):
            handler = logging.StreamHandler(sys.stderr if target == "stderr" else sys.stdout)
        else:
            try:
                handler = logging.FileHandler(target)
            except OSError as error:
                raise ConfigError(f"invalid value for --log_target: '{target}': {error.strerror}") from None
        handler.setFormatter(formatter)
        if options.stacktrace_level < LogLevel.NONE:
            handler.addFilter(_StackAbove(options.stacktrace_level))
        root.addHandler(handler)
