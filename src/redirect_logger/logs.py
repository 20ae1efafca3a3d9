"""Logging set-up shared by both launch modes."""

from __future__ import annotations

import logging
import os


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
