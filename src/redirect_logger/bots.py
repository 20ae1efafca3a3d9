"""User-Agents read with uap-core's patterns: the ``bot`` flag of a record,
and the OS family that routes (routing.py) compare.

Each distinct agent is looked at once per process (``Agents``, a bounded LRU
cache shared by both), and only for what is asked of it: the device patterns
for the bot flag, the OS patterns for a route's ``os``.

A hit is a bot hit when its method is ``HEAD``, when it has no User-Agent
(or a blank one), or when uap-core's device patterns (the ``ua-parser-builtins``
package, matched by ua-parser's Rust resolver) name its agent's device
``Spider``. docs/records.md says why, and what is not flagged.
"""

from __future__ import annotations

import functools
import re
from operator import attrgetter

import ua_parser_rs
from ua_parser import load_lazy_builtins

# Agents whose verdict is kept (entries, least recently used dropped first).
# An agent is classified as recorded, at most 1024 characters (hits.FIELD_LIMITS),
# so the keys hold at most about 4 MiB of ASCII agents, 17 MiB of agents
# made of 4-byte characters (Python stores a string at its widest character).
CACHE_SIZE = 4096
SPIDER = "Spider"  # uap-core's device family of crawlers


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


# A device family a pattern takes from the agent: "$1", "Samsung $1", "$1$2".
_GROUP_REFERENCE = re.compile(r"\$\d")
# A family of group references apart (at least one space between two): any
# "Spider" it spells is one group's text, so the agent holds the word whole.
_WHOLE_GROUPS = re.compile(r"\s*\$\d(?:\s+\$\d)*\s*")


def _may_spell_spider(family: str | None) -> bool:
    """Whether a device pattern's family can come out ``Spider`` (stripped):
    it is, or it takes text from the agent that can make it so."""
    if family == SPIDER:
        return True
    if family is None or "$" not in family:
        return False
    shape = ".*".join(re.escape(part) for part in _GROUP_REFERENCE.split(family))
    padded = (f"{before}{SPIDER}{after}" for before in ("", " ") for after in ("", " "))
    return any(re.fullmatch(shape, text) for text in padded)


@functools.cache
def _maybe_spiders() -> ua_parser_rs.DeviceExtractor:
    """The device patterns that can name a device ``Spider`` but for those
    whose ``Spider`` would be a group's whole text (``"$1"``, ``"$1 $2"``): 50
    of uap-core's 633, in their order. An agent none of them matches, and
    without the word ``Spider``, is no spider (``Agent.spider``), found in a
    quarter of the time the whole list takes (0.6 against 2.7 µs)."""
    _, _, devices = load_lazy_builtins()
    fields = attrgetter("regex", "regex_flag", "family", "brand", "model")
    return ua_parser_rs.DeviceExtractor(
        row
        for row in map(fields, devices)
        if _may_spell_spider(row[2]) and not (row[2] and _WHOLE_GROUPS.fullmatch(row[2]))
    )


@functools.cache
def _oses() -> ua_parser_rs.OSExtractor:
    """uap-core's OS patterns, compiled once per process, as ua-parser's
    ``regex`` resolver builds them (only when some route has ``os``)."""
    _, oses, _ = load_lazy_builtins()
    fields = attrgetter("regex", "family", "major", "minor", "patch", "patch_minor")
    return ua_parser_rs.OSExtractor(map(fields, oses))


class Agent:
    """One User-Agent text; what is asked of it is worked out once."""

    __slots__ = ("_os", "_spider", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._spider: bool | None = None
        self._os: str | None = None

    @property
    def spider(self) -> bool:
        """Whether uap-core names the agent's device ``Spider``."""
        if self._spider is None:
            text = self.text
            # The first pattern that matches names the device (uap-core's
            # order): with no spider-naming one matching, it is no spider.
            if SPIDER not in text and _maybe_spiders().extract(text) is None:
                self._spider = False
            else:
                device = _devices().extract(text)
                self._spider = device is not None and device.family == SPIDER
        return self._spider

    @property
    def os(self) -> str:
        """uap-core's OS family of the agent (``"iOS"``, ``"Android"``);
        ``"Other"`` when no pattern matches, as ua-parser says."""
        if self._os is None:
            found = _oses().extract(self.text)
            self._os = "Other" if found is None else found.family
        return self._os


class Agents:
    """``Agent``s by text, in a bounded LRU cache: one per process, shared by
    the bot flag (in the workers) and the routes (on the request path), which
    run on the same thread."""

    def __init__(self, cache_size: int = CACHE_SIZE) -> None:
        self.get = functools.lru_cache(maxsize=cache_size)(Agent)

    @property
    def cached(self) -> int:
        """Agents in the cache now (at most its size)."""
        return self.get.cache_info().currsize


class BotDetector:
    """Bot verdicts for hits, from the agents' cache."""

    def __init__(self, cache_size: int = CACHE_SIZE, agents: Agents | None = None) -> None:
        _devices()  # compiled at start-up, not on the first hit
        _maybe_spiders()
        self._agents = agents or Agents(cache_size)

    def is_bot(self, method: str, agent: str | None) -> bool:
        """Whether a hit with this (upper-case) method and User-Agent text comes
        from a bot: ``HEAD``, no or a blank agent, or a crawler's agent."""
        if method == "HEAD" or agent is None or not agent.strip():
            return True
        return self._agents.get(agent).spider

    @property
    def cached(self) -> int:
        """Agents in the cache now (at most its size)."""
        return self._agents.cached


# A pattern's first group that names its family by plain alternatives:
# letters, digits, spaces, "|", "(?:", ")", "\b" and escaped characters.
_PLAIN_GROUP = re.compile(r"(?:[\w ^|]|\\.|\(\?:|\))*")


@functools.cache
def os_families() -> frozenset[str]:
    """The OS families uap-core's patterns can name: each pattern's family,
    or, for one taken from the agent ("$1"), the names its first group spells
    out when that group is plain alternatives (``(Windows|Android)``). For
    ``redirect-logger check``'s warning about an unknown name in ``os``."""
    _, oses, _ = load_lazy_builtins()
    families = {"Other"}
    for matcher in oses:
        family, regex = attrgetter("family", "regex")(matcher)
        if family and "$" not in family:
            families.add(family)
        elif family == "$1":
            group = _first_group(regex)
            if group is not None and _PLAIN_GROUP.fullmatch(group):
                families.update(_spelled(group))
    return frozenset(families)


def _first_group(pattern: str) -> str | None:
    """The text of ``pattern``'s first capturing group, without its brackets."""
    start = depth = 0
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if char == "(":
            if depth == 0 and start == 0 and not pattern.startswith("(?", index):
                start = index + 1
            if start:
                depth += 1
        elif char == ")" and start:
            depth -= 1
            if depth == 0:
                return pattern[start:index]
        index += 1
    return None


def _spelled(group: str) -> set[str]:
    """The texts a plain group matches: its alternatives, with one level of
    ``(?:a|b)`` expanded."""
    inner = re.search(r"\(\?:([^()]*)\)", group)
    if inner is not None:
        head, tail = group[: inner.start()], group[inner.end() :]
        names: set[str] = set()
        for choice in inner.group(1).split("|"):
            names |= _spelled(head + choice + tail)
        return names
    return {re.sub(r"\\b|\^", "", part).replace("\\", "") for part in group.split("|") if part}
