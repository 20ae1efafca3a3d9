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
        self._waiting = {hit.id.encode(): index for index, hit in enumerate(hits)}
        self._journaled: set[bytes] = set()  # written ahead, awaiting their reports
        self._placement: Placement | None = None
        self._given_up: set[bytes] = set()
        self._undurable: set[int] = set()  # indices of hits answered by when_full
        self._finishing = False

    # -- reports: the reporting thread ------------------------------------------

    def delivered(self, message: Message) -> None:
        key = record_id(message.value() or b"")
        with self._lock:
            if key in self._given_up:
                self._given_up.discard(key)
                self._unrecorded.reported(1)
                return
            self._ledger.add_delivered()
            if key in self._journaled and self._placement is not None:
                self._journaled.discard(key)
                self._placement.settle([key])
            elif key is not None and self._waiting.pop(key, None) is not None:
                self._finish_if_done()

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
                keys = [key for key, _ in waiting]
                kept = self._spill.keep([r for _, r in waiting], why, self._unrecorded)
                for key in keys[kept:]:
                    self._undurable.add(self._waiting[key])
                for key in keys:
                    del self._waiting[key]
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
            for key, _ in waiting:
                self._undurable.add(self._waiting.pop(key))
            self._finish_if_done()

    def _sort(
        self, records: Sequence[Encoded]
    ) -> tuple[list[tuple[bytes, Encoded]], list[bytes | None]]:
        """The reported records still waiting (with their keys), and the keys
        of those journaled; those given up are done with here."""
        waiting: list[tuple[bytes, Encoded]] = []
        journaled: list[bytes | None] = []
        for record in records:
            key = record_id(record.value)
            if key in self._given_up:
                self._given_up.discard(key)
                self._unrecorded.reported(1)
            elif key in self._journaled:
                self._journaled.discard(key)
                journaled.append(key)
            elif key is not None and key in self._waiting:
                waiting.append((key, record))
        return waiting, journaled

    # -- the disk thread ------------------------------------------------------

    def journal_rest(self) -> None:
        """Write the records still waiting to the journal, ahead of their
        reports (``ack_timeout`` passed, or no broker is reachable); those the
        journal cannot take are given up."""
        with self._lock:
            if not self._waiting:
                return
            keys = list(self._waiting)
            rest = [self.records[self._waiting[key]] for key in keys]
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
            lost = keys[written:]
            if lost:
                self._unrecorded(len(lost), reason)
                self._unrecorded.give_up(len(lost))
                self._given_up.update(lost)
                self._undurable.update(self._waiting[key] for key in lost)
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
