"""Logging set-up shared by both launch modes."""

from __future__ import annotations

import logging
import os
import threading
import time


def configure_logging() -> None:
    """Log our records to stderr at ``REDIRECT_LOGGER_LOG_LEVEL`` (default INFO), once.

    Only the ``redirect_logger`` loggers: Hypercorn logs through its own handlers.
    """
    ours = logging.getLogger("redirect_logger")
    if ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    )
    ours.addHandler(handler)
    ours.propagate = False
    level = os.environ.get("REDIRECT_LOGGER_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        ours.setLevel(logging.INFO)
        ours.warning("REDIRECT_LOGGER_LOG_LEVEL=%r is not a level name; using INFO", level)
        return
    ours.setLevel(level)


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
