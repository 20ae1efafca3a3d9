"""Answers that wait for their record: ``records.durability`` "journal" and "kafka".

- "journal": a worker writes its batch ahead to the journal (one write, and
  one fsync under ``spill.fsync = "always"``), settles the hits' group
  commits (commit.py), then produces the batch tagged with its
  ``Placement``: each delivery report settles its record in the journal.
- "kafka": a worker produces its batch tagged with a ``Flight``; the
  delivery reports settle the flight record by record, and its hits are
  answered once every record is acknowledged or journaled. At
  ``records.ack_timeout`` (at once while no broker is reachable) the
  pipeline journals what is still unacknowledged (``Flight.journal_rest``).

A hit whose record can be neither acknowledged nor journaled is answered by
``records.when_full`` and counted so (``Unrecorded``): never as if durable.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence

import trio
from confluent_kafka import Message

from .hits import Encoded, Hit, record_id
from .ledger import Ledger
from .logs import RateLimitedLog
from .spill import PartialWrite, Placement, Spill

log = logging.getLogger(__name__)


class Unrecorded:
    """Counts the hits whose answers could wait for no durable record: shed
    (answered 503) under ``when_full = "shed"``, dropped (answered as usual)
    under the other policies; logs an error at most every 10 s. Thread-safe.

    Also counts the records given up that way while librdkafka still holds
    them: they stay out of ``in_flight`` (their outcome is counted already),
    and whatever their delivery reports say is not counted again.
    """

    def __init__(self, ledger: Ledger, when_full: str) -> None:
        self._ledger = ledger
        self._shed = when_full == "shed"
        self._log = RateLimitedLog(log)
        self._lock = threading.Lock()
        self.given_up = 0  # records counted here that librdkafka has not reported yet

    def __call__(self, count: int, reason: str) -> None:
        if not count:
            return
        if self._shed:
            self._ledger.add_shed(count)
            answered = "answered 503 and counted shed"
        else:
            self._ledger.add_dropped(count)
            answered = "answered without a durable record and counted dropped"
        self._log(
            logging.ERROR,
            reason,
            f"{count} hits {answered}: their records could be neither acknowledged "
            f"nor journaled ({reason})",
        )

    def give_up(self, count: int) -> None:
        with self._lock:
            self.given_up += count

    def reported(self, count: int) -> None:
        with self._lock:
            self.given_up -= count


class Flight:
    """One batch in librdkafka under ``durability = "kafka"``: its hits, in
    the order of its records, await each record's acknowledgement, or its
    journaling.

    Each record is waiting, then acknowledged, journaled (by ``journal_rest``
    or, after a failed delivery, by the spill journal), refused, or given up
    (neither acknowledged nor journaled: ``Unrecorded``). Reports and
    journaling run in threads under the flight's lock; ``done`` is set on the
    Trio thread once no record is waiting, after the hits are settled.

    Records are told apart by id. Several may have the same id (a client-made
    one, collect.id_field): they are counted as often as they occur, and
    any report for that id settles one of them.
    """

    def __init__(
        self,
        hits: list[Hit],
        records: list[Encoded],
        deadline: float,
        spill: Spill,
        ledger: Ledger,
        unrecorded: Unrecorded,
    ) -> None:
        self.hits = hits
        self.records = records
        self.deadline = deadline  # trio.current_time() by which it is journaled
        self.done = trio.Event()
        self._spill = spill
        self._ledger = ledger
        self._unrecorded = unrecorded
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._waiting: dict[bytes, list[int]] = {}  # each id's waiting records, by index
        for index, hit in enumerate(hits):
            self._waiting.setdefault(hit.id.encode(), []).append(index)
        self._journaled: Counter[bytes | None] = Counter()  # written ahead, awaiting reports
        self._placement: Placement | None = None
        self._given_up: Counter[bytes | None] = Counter()
        self._undurable: set[int] = set()  # indices of hits answered by when_full
        self._finishing = False

    # -- reports: the reporting thread ------------------------------------------

    def delivered(self, message: Message) -> None:
        key = record_id(message.value() or b"")
        with self._lock:
            if _take(self._given_up, key):
                self._unrecorded.reported(1)
                return
            self._ledger.add_delivered()
            if self._placement is not None and _take(self._journaled, key):
                self._placement.settle([key])
            elif key is not None and self._take_waiting(key) is not None:
                self._finish_if_done()

    def _take_waiting(self, key: bytes) -> int | None:
        """The index of a record of this id that is waiting, no longer waiting."""
        indices = self._waiting.get(key)
        if not indices:
            return None
        index = indices.pop(0)
        if not indices:
            del self._waiting[key]
        return index

    def undelivered(self, records: Sequence[Encoded], why: str) -> None:
        """Records Kafka could not take now (or the worker could not hand
        over): those journaled already wait there for a replay; those waiting
        go to the spill journal, and are durable once there."""
        with self._lock:
            waiting, journaled = self._sort(records)
            placement = self._placement
            if journaled and placement is not None:
                placement.leave(len(journaled), self._ledger)
            if waiting:
                kept = self._spill.keep([r for _, r in waiting], why, self._unrecorded)
                self._undurable.update(index for index, _ in waiting[kept:])
                self._finish_if_done()

    def refused(self, records: Sequence[Encoded]) -> None:
        """Records no retry can deliver: counted failed; the hits of those
        still waiting are answered by ``when_full``."""
        with self._lock:
            waiting, journaled = self._sort(records)
            placement = self._placement
            if journaled and placement is not None:
                placement.settle(journaled)
            self._ledger.add_failed(len(waiting) + len(journaled))
            self._undurable.update(index for index, _ in waiting)
            self._finish_if_done()

    def _sort(
        self, records: Sequence[Encoded]
    ) -> tuple[list[tuple[int, Encoded]], list[bytes | None]]:
        """The reported records that were waiting (with their hits' indices),
        no longer waiting, and the keys of those journaled; those given up
        are done with here."""
        waiting: list[tuple[int, Encoded]] = []
        journaled: list[bytes | None] = []
        for record in records:
            key = record_id(record.value)
            if _take(self._given_up, key):
                self._unrecorded.reported(1)
            elif _take(self._journaled, key):
                journaled.append(key)
            elif key is not None:
                index = self._take_waiting(key)
                if index is not None:
                    waiting.append((index, record))
        return waiting, journaled

    # -- the disk thread ------------------------------------------------------

    def journal_rest(self) -> None:
        """Write the records still waiting to the journal, ahead of their
        reports (``ack_timeout`` passed, or no broker is reachable); those the
        journal cannot take are given up."""
        with self._lock:
            if not self._waiting:
                return
            pending = sorted(
                ((index, key) for key, indices in self._waiting.items() for index in indices),
            )
            keys = [key for _, key in pending]
            rest = [self.records[index] for index, _ in pending]
            journal, written, reason = self._spill.journal, 0, "spill disabled"
            if journal is not None:
                try:
                    segment, written = journal.write_ahead(rest)
                    if written:
                        assert segment is not None
                        self._placement = Placement(journal, segment)
                        self._journaled.update(keys[:written])
                    reason = "the spill journal is full (spill.max_bytes)"
                except PartialWrite as exc:
                    reason = f"cannot write the spill journal: {exc}"
            self._ledger.add_journaled(written)
            lost = pending[written:]
            if lost:
                self._unrecorded(len(lost), reason)
                self._unrecorded.give_up(len(lost))
                self._given_up.update(key for _, key in lost)
                self._undurable.update(index for index, _ in lost)
            self._waiting.clear()
            self._finish_if_done()

    # -- the Trio thread ------------------------------------------------------

    def _finish_if_done(self) -> None:
        if not self._waiting and not self._finishing:
            self._finishing = True
            self._token.run_sync_soon(self._finish)

    def _finish(self) -> None:
        undurable = self._undurable
        for index, hit in enumerate(self.hits):
            if hit.commit is not None:
                hit.commit.settle(hit.id, index not in undurable)
        self.done.set()


def _take(counts: Counter[bytes | None], key: bytes | None) -> bool:
    """Whether ``counts`` has ``key``; if so, one fewer."""
    if counts[key] > 0:
        counts[key] -= 1
        return True
    return False
