"""The ledger: every hit the request path hands over is counted exactly once.

``received = delivered + failed + dropped + shed + in_flight``
"""

from __future__ import annotations

import threading


class Ledger:
    """Per-process record counters; monotonically increasing.

    ``received``, ``dropped`` and ``shed`` are written by the Trio thread only;
    ``delivered`` and ``failed`` also from librdkafka's callback thread, under a lock.
    """

    def __init__(self) -> None:
        self.received = 0
        self.dropped = 0
        self.shed = 0
        self.delivered = 0
        self.failed = 0
        self._lock = threading.Lock()

    def add_delivered(self, count: int = 1) -> None:
        with self._lock:
            self.delivered += count

    def add_failed(self, count: int = 1) -> None:
        with self._lock:
            self.failed += count

    def snapshot(self, in_flight: int) -> dict[str, int]:
        return {
            "received": self.received,
            "delivered": self.delivered,
            "failed": self.failed,
            "dropped": self.dropped,
            "shed": self.shed,
            "in_flight": in_flight,
        }
