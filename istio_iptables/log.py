"""Logging as Istio's ``--log_output_level``, ``--log_as_json``, ``--log_target`` and ``--log_caller`` ask.

The package logs through ``Log`` (``log = Log(__name__)``). Importing logging costs 5 ms, a sixth of an
init container's run, and an apply at the default level logs two lines (what changed, and the time): so
``configure`` checks the targets and keeps the options, and a message that passes the level is written
here, in Istio's layout, without the logging module. Only options that need logging's frames (the caller,
stack traces) make the first message that passes import it and install the handlers. When logging is
loaded already (a library user, the tests), ``configure`` installs them at once.
"""

from __future__ import annotations

import enum
import sys
import time

from istio_iptables.errors import ConfigError
from istio_iptables.records import record


class LogLevel(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARN = 30
    ERROR = 40
    FATAL = 50
    NONE = 100


@record
class LogOptions:
    level: LogLevel = LogLevel.INFO
    as_json: bool = False
    targets: tuple[str, ...] = ("stderr",)
    caller: bool = False
    stacktrace_level: LogLevel = LogLevel.NONE


def format_line(created: float, level: str, message: str, caller: str, as_json: bool) -> str:
    """Istio's zap layout: ``<RFC 3339 UTC time>\\t<level>\\t[<caller>\\t]<message>``, or one JSON object."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1e6):06d}Z"
    if as_json:
        import json  # noqa: PLC0415 (only JSON logs need it)

        entry = {"time": stamp, "level": level, "scope": "default", "msg": message}
        if caller:
            entry["caller"] = caller
        return json.dumps(entry)
    return "\t".join(part for part in (stamp, level, caller, message) if part)


class Log:
    """A module's logger: ``logging.Logger``'s ``debug``, ``info``, ``warning`` and ``error``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, message: str, *args: object) -> None:
        _emit(self.name, LogLevel.DEBUG, message, args)

    def info(self, message: str, *args: object) -> None:
        _emit(self.name, LogLevel.INFO, message, args)

    def warning(self, message: str, *args: object) -> None:
        _emit(self.name, LogLevel.WARN, message, args)

    def error(self, message: str, *args: object) -> None:
        _emit(self.name, LogLevel.ERROR, message, args)


def logs(level: LogLevel) -> bool:
    """Whether a message at ``level`` would be written: to skip composing what nobody reads."""
    if _pending:
        return level >= _pending[0].level
    import logging  # noqa: PLC0415 (loaded already: the options' handlers are installed)

    return logging.getLogger().isEnabledFor(level)


_pending: list[LogOptions] = []
"""The options configured, while no message has passed their level (so their handlers are not installed)."""


def configure(options: LogOptions) -> None:
    for target in options.targets:
        if target not in ("stderr", "stdout"):
            try:
                open(target, "a", encoding="utf-8").close()
            except OSError as error:
                raise ConfigError(f"invalid value for --log_target: '{target}': {error.strerror}") from None
    _pending[:] = [options]
    if "logging" in sys.modules:
        _install(_pending.pop())


def _emit(name: str, level: LogLevel, message: str, args: tuple[object, ...]) -> None:
    if _pending:
        options = _pending[0]
        if level < options.level:
            return
        if not options.caller and options.stacktrace_level is LogLevel.NONE:
            # Nothing that needs the logging module's frames: write the line here, without importing it
            # (5 ms, a sixth of an init container's apply, which logs what it changed at the default level).
            text = format_line(
                time.time(), level.name.lower(), message % args if args else message, "", options.as_json
            )
            for target in options.targets:
                _write(target, text + "\n")
            return
        _install(_pending.pop())
    import logging  # noqa: PLC0415 (the point of this module)

    # stacklevel: the caller is whoever called Log.info, not this function.
    logging.getLogger(name).log(level, message, *args, stacklevel=3)


def _write(target: str, text: str) -> None:
    if target in ("stderr", "stdout"):
        (sys.stderr if target == "stderr" else sys.stdout).write(text)
    else:
        with open(target, "a", encoding="utf-8") as file:
            file.write(text)


def _install(options: LogOptions) -> None:
    import logging  # noqa: PLC0415

    from istio_iptables.logformat import IstioFormatter, StackAbove  # noqa: PLC0415

    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(options.level)
    formatter = IstioFormatter(format_line, as_json=options.as_json, caller=options.caller)
    for target in options.targets:
        handler: logging.Handler
        if target in ("stderr", "stdout"):
            handler = logging.StreamHandler(sys.stderr if target == "stderr" else sys.stdout)
        else:
            handler = logging.FileHandler(target, encoding="utf-8")
        handler.setFormatter(formatter)
        if options.stacktrace_level < LogLevel.NONE:
            handler.addFilter(StackAbove(options.stacktrace_level, skipped={__file__}))
        root.addHandler(handler)
