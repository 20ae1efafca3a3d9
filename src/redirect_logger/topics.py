"""Whether the topics the service writes to exist (issue 14).

A topic that does not exist makes every record for it fail with an unknown
topic error: the records are journaled (spilled) as in an outage, and wait
there. ``TopicWatch`` says which topics are missing, for ``/readyz``, the
``redirect_logger_topic_missing`` gauge and the log. It checks at start, after
a rule reload, whenever librdkafka reports an unknown topic, and every
``RECHECK`` s while a topic is missing, so that a topic created later is seen
without a restart.

The check runs in a thread (``KafkaSink.topic_names``): one metadata request
for all topics, which never makes a broker create one; then, only if the
producer would ask a broker to auto-create its topics (librdkafka's default
``allow.auto.create.topics``), a request naming each absent topic, as its
first record would: a topic the broker auto-creates is not reported missing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection

import trio

from .logs import RateLimitedLog

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 5.0  # s one metadata request may take
RECHECK = 3.0  # s between checks while a topic is missing
_MIN_GAP = 1.0  # s at least between two checks that reports of unknown topics ask for
_LOOK = 0.2  # s between looks at those reports

# Given the topics wanted, the names of the topics that exist, or None when
# no broker answered in time (inconclusive). Runs in a thread; waits at most
# the given s.
Lookup = Callable[[list[str], float], Collection[str] | None]


class TopicWatch:
    """The topics among ``topics()`` that a broker said do not exist.

    ``suspect()`` may be called from any thread; the rest runs on the Trio thread.
    """

    def __init__(self, topics: Callable[[], list[str]], lookup: Lookup) -> None:
        self._topics = topics
        self._lookup = lookup
        self.missing: tuple[str, ...] = ()  # none known missing until a check says so
        self._due = threading.Event()  # a check is asked for
        self._log = RateLimitedLog(log)
        self._limiter = trio.CapacityLimiter(1)

    def suspect(self) -> None:
        """Ask for a check soon: librdkafka reported an unknown topic, or the
        rules changed. Thread-safe."""
        self._due.set()

    def gauge(self) -> dict[str, int]:
        """1 for each topic the config writes to that is missing, else 0."""
        missing = self.missing
        return {topic: int(topic in missing) for topic in self._topics()}

    def reason(self) -> str | None:
        """``/readyz``'s reason naming the missing topics, or None."""
        missing = self.missing
        if not missing:
            return None
        return f"missing topic{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"

    async def check(self) -> None:
        """Ask a broker which topics exist (in a thread, at most ``CHECK_TIMEOUT``
        s) and update ``missing``. An inconclusive answer (no broker answered)
        changes nothing. A missing topic is logged as an error, at most every
        10 s per set of missing topics. Cancelled, the thread is left to end
        on its own, within its timeout."""
        topics = self._topics()
        found = await trio.to_thread.run_sync(
            self._lookup, topics, CHECK_TIMEOUT, limiter=self._limiter, abandon_on_cancel=True
        )
        if found is None:
            log.debug("topic check inconclusive: no broker answered within %s s", CHECK_TIMEOUT)
            return
        missing = tuple(topic for topic in topics if topic not in found)
        if missing:
            names = ", ".join(missing)
            self._log(
                logging.ERROR,
                f"missing {names}",
                f"topic(s) missing: {names}: their records are journaled (spilled) "
                "until the topic exists; /readyz answers 503",
            )
        elif self.missing:
            log.info("topic(s) exist now: %s", ", ".join(self.missing))
        self.missing = missing

    async def run(self) -> None:
        """Check at once, then whenever ``suspect()`` asks (at most every
        ``_MIN_GAP`` s) and every ``RECHECK`` s while a topic is missing.
        Never returns; cancel it."""
        await self.check()
        last = trio.current_time()
        while True:
            await trio.sleep(_LOOK)
            now = trio.current_time()
            asked = self._due.is_set() and now - last >= _MIN_GAP
            if asked or (self.missing and now - last >= RECHECK):
                self._due.clear()
                await self.check()
                last = trio.current_time()
