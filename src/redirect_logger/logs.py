"""Logging set-up shared by both launch modes."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import orjson

from .config import LoggingSettings

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TEXT = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
# A LogRecord's own attributes; any other is a field the caller passed with ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_handler: logging.Handler | None = None


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``ts`` (RFC 3339, UTC, ms),
    ``level``, ``logger``, ``message``, ``pid``, the record's ``extra`` fields,
    and ``traceback`` (or ``stack``) when it has one. Never raises for a field
    orjson cannot encode: such a field is written as its ``repr``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            fields["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        extra = {
            key: value
            for key, value in vars(record).items()
            if key not in _STANDARD and key not in fields
        }
        try:
            line = orjson.dumps({**fields, **extra}, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # orjson.JSONEncodeError: e.g. an object, an int past 64 bits
            line = orjson.dumps({**fields, **{key: repr(v) for key, v in extra.items()}})
        return line.decode()


def configure_logging(settings: LoggingSettings | None = None) -> None:
    """Log the ``redirect_logger`` loggers' records to stderr, in ``settings.format``
    at ``REDIRECT_LOGGER_LOG_LEVEL`` if that is set, else ``settings.level``
    (defaults: text, INFO). Called again (once the config is read), it
    switches the format and level in place; the handler is added once.

    Only the ``redirect_logger`` loggers: Hypercorn logs through its own handlers.
    """
    global _handler
    settings = LoggingSettings() if settings is None else settings
    ours = logging.getLogger("redirect_logger")
    if _handler is None:
        _handler = logging.StreamHandler()
        ours.addHandler(_handler)
        ours.propagate = False
    _handler.setFormatter(JsonFormatter() if settings.format == "json" else _TEXT)
    ours.setLevel(settings.level)
    level = os.environ.get("REDIRECT_LOGGER_LOG_LEVEL")
    if level is None:
        return
    if level.upper() not in _LEVELS:
        ours.log(  # a WARNING, or the level in force if that is higher: always shown
            max(logging.WARNING, ours.level),
            "REDIRECT_LOGGER_LOG_LEVEL=%r is not a level name; using %s",
            level,
            settings.level,
        )
        return
    ours.setLevel(level.upper())


class Throttle:
    """Lets a recurring condition through at most once per ``interval`` s per key,
    and counts what it held back meanwhile. Thread-safe."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: object) -> int | None:
        """None to hold this one back; else how many were held back since the last."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self._interval) < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)


class RateLimitedLog(Throttle):
    """Logs a recurring message at most once per ``interval`` s per key, with a
    count of the ones held back."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        super().__init__(interval)
        self._logger = logger

    def __call__(self, level: int, key: str, message: str) -> None:
        suppressed = self.allow(key)
        if suppressed is None:
            return
        if suppressed:
            message += f" (and {suppressed} more like it)"
        self._logger.log(level, "%s", message)
