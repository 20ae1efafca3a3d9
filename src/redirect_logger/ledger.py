"""The ledger: every hit the request path hands over is counted exactly once.

``received = delivered + spilled + failed + dropped + shed + excluded + in_flight``

``replayed`` stands apart: records from the spill journal (this process's or
an earlier one's) that a replay got delivered. A spilled record stays counted
as spilled when it is later replayed. So does ``journaled``: records written
to the journal ahead of their answer (``records.durability``), which then
reach one of the outcomes above like any other.
"""

from __future__ import annotations

import threading

# The final outcomes: received = the sum of these + in_flight.
SETTLED = ("delivered", "spilled", "failed", "dropped", "shed", "excluded")
OUTCOMES = (
    "received",
    "delivered",
    "spilled",
    "failed",
    "dropped",
    "shed",
    "excluded",
    "replayed",
    "journaled",
)


class Ledger:
    """Per-process record counters; monotonically increasing.

    ``received`` is written by the Trio thread only; the others also from
    worker threads and librdkafka's callback thread, under a lock.
    """

    def __init__(self) -> None:
        self.received = 0
        self.shed = 0
        self.delivered = 0
        self.spilled = 0
        self.failed = 0
        self.dropped = 0
        self.replayed = 0
        self.excluded = 0  # from records.exclude_ips: redirected, not recorded
        self.journaled = 0  # written ahead of their answer (records.durability)
        self._lock = threading.Lock()

    def add_delivered(self, count: int = 1) -> None:
        with self._lock:
            self.delivered += count

    def add_spilled(self, count: int = 1) -> None:
        with self._lock:
            self.spilled += count

    def add_failed(self, count: int = 1) -> None:
        with self._lock:
            self.failed += count

    def add_shed(self, count: int = 1) -> None:
        with self._lock:
            self.shed += count

    def add_journaled(self, count: int = 1) -> None:
        with self._lock:
            self.journaled += count

    def add_dropped(self, count: int = 1) -> None:
        with self._lock:
            self.dropped += count

    def add_excluded(self, count: int = 1) -> None:
        with self._lock:
            self.excluded += count

    def add_replayed(self, count: int = 1) -> None:
        with self._lock:
            self.replayed += count

    def accounted(self) -> int:
        """Received records that have reached a final outcome."""
        return sum(getattr(self, outcome) for outcome in SETTLED)

    def snapshot(self, in_flight: int) -> dict[str, int]:
        counts = {outcome: getattr(self, outcome) for outcome in OUTCOMES}
        return {**counts, "in_flight": in_flight}
