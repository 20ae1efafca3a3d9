"""Group commit: what requests under ``records.durability = "journal"`` or
``"kafka"`` await before they answer.

A ``Commit`` gathers the hits admitted while it is open. The intake tags each
durable hit with the open commit; a worker closes it when it closes a batch,
so one commit usually holds one batch's hits, and its requests await one
event together: never a task or a thread of their own. The workers settle
each hit once its record is durable (journaled, or acknowledged by Kafka),
or once it cannot be made so; the event is set when every hit of a closed
commit is settled.
"""

from __future__ import annotations

from collections import Counter

import trio


class Commit:
    """The hits of one group commit, and the event their requests await.

    Used on the Trio thread only.
    """

    __slots__ = ("_done", "_open", "_pending", "undurable", "used")

    def __init__(self) -> None:
        self.used = False  # some hit has joined
        self._pending = 0  # hits joined and not settled yet
        self._open = True
        self._done = trio.Event()
        # ids of hits whose record is not durable, each as often as it is so
        # (a client-made id may be on several hits: collect.id_field)
        self.undurable: Counter[str] = Counter()

    def join(self, count: int = 1) -> None:
        """``count`` hits are being admitted under this commit."""
        self._pending += count
        self.used = True

    def settle(self, hit_id: str, durable: bool) -> None:
        """One joined hit's record is durable, or can never be made so."""
        if not durable:
            self.undurable[hit_id] += 1
        self._pending -= 1
        if not self._pending and not self._open:
            self._done.set()

    def leave(self, count: int) -> None:
        """``count`` joined hits were not taken into the channel: nothing to await."""
        self._pending -= count
        if not self._pending and not self._open:
            self._done.set()

    def close(self) -> None:
        """No more hits join; the event is set once the joined ones are settled."""
        self._open = False
        if not self._pending:
            self._done.set()

    def lost(self, hit_id: str) -> bool:
        """Whether a hit of this id is not durable; each such hit is told once."""
        if self.undurable[hit_id] > 0:
            self.undurable[hit_id] -= 1
            return True
        return False

    async def wait(self) -> None:
        """Until every hit of the closed commit is settled. Cancellation leaves
        the commit as it is: the hit is still recorded."""
        await self._done.wait()
