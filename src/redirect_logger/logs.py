"""Logging set-up shared by both launch modes."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """Log to stderr at ``REDIRECT_LOGGER_LOG_LEVEL`` (default INFO), once."""
    root = logging.getLogger()
    if any(getattr(handler, "_redirect_logger", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")
    )
    handler._redirect_logger = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(os.environ.get("REDIRECT_LOGGER_LOG_LEVEL", "INFO").upper())
