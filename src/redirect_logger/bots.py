"""The ``bot`` flag of a record: the request method and uap-core's patterns.

A hit is a bot hit when its method is ``HEAD``, when it has no User-Agent
(or a blank one), or when uap-core's device patterns (the ``ua-parser-builtins``
package, matched by ua-parser's Rust resolver) name its agent's device
``Spider``. docs/records.md says why, and what is not flagged.
"""

from __future__ import annotations

import functools
from operator import attrgetter

import ua_parser_rs
from ua_parser import load_lazy_builtins

# Agents whose verdict is kept (entries, least recently used dropped first).
# An agent is classified as recorded, at most 1024 characters (hits.FIELD_LIMITS),
# so the keys hold at most about 4 MiB of ASCII agents, 17 MiB of agents
# made of 4-byte characters (Python stores a string at its widest character).
CACHE_SIZE = 4096


@functools.cache
def _devices() -> ua_parser_rs.DeviceExtractor:
    """uap-core's device patterns, compiled once per process (~90 ms, ~25 MiB).

    This is what ua-parser's ``regex`` resolver builds for the device domain,
    called without its per-call result objects (2.1 instead of 3.6 µs per
    agent). Without ua-parser-rs it fails at start-up, rather than fall back
    to the pure-Python resolver (~100 times slower per agent)."""
    _, _, devices = load_lazy_builtins()
    fields = attrgetter("regex", "regex_flag", "family", "brand", "model")
    return ua_parser_rs.DeviceExtractor(map(fields, devices))


class BotDetector:
    """Bot verdicts for hits, cached per User-Agent text in a bounded LRU cache."""

    def __init__(self, cache_size: int = CACHE_SIZE) -> None:
        self._devices = _devices()
        self._spider = functools.lru_cache(maxsize=cache_size)(self._match)

    def _match(self, agent: str) -> bool:
        device = self._devices.extract(agent)
        return device is not None and device.family == "Spider"

    def is_bot(self, method: str, agent: str | None) -> bool:
        """Whether a hit with this (upper-case) method and User-Agent text comes
        from a bot: ``HEAD``, no or a blank agent, or a crawler's agent."""
        if method == "HEAD" or agent is None or not agent.strip():
            return True
        return self._spider(agent)

    @property
    def cached(self) -> int:
        """Agents whose verdict is in the cache now (at most its size)."""
        return self._spider.cache_info().currsize
