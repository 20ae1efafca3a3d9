"""Replay: produce journaled records to Kafka again, then delete their segment.

A segment is deleted only once every record in it has a successful delivery
report; otherwise it is kept whole and tried again later (records already
delivered from it are then produced again: consumers deduplicate by ``id``).
A segment with a torn or corrupt tail has its intact records replayed and is
then set aside as ``*.corrupt``.

The replay has its own producer (its reports must not mix with the live
traffic's) and runs in one thread; the Trio side only decides when.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import trio
from confluent_kafka import Message

from .config import KafkaValue, SpillSettings
from .hits import Encoded, record_id
from .kafka import KafkaSink
from .ledger import Ledger
from .logs import RateLimitedLog
from .spill import Journal, SegmentReader

log = logging.getLogger(__name__)

_CHUNK = 100  # records read and produced at a time; the GIL is offered between chunks
_WINDOW = 0.25  # s one produce call may wait for queue room
_STOP_FLUSH = 0.2  # s to wait for outstanding reports when told to stop
_IDLE = 1.0  # s between looks for something to replay
_BACKOFF = (5.0, 60.0)  # s after a failed round: first, longest


def journal_options(spill: SpillSettings) -> dict[str, Any]:
    return {
        "max_bytes": spill.max_bytes,
        "segment_bytes": spill.segment_bytes,
        "fsync": spill.fsync,
        "fsync_interval": spill.fsync_interval,
    }


class _SegmentReports:
    """The replay producer's reports (kafka.Reports), counted per segment:
    delivered (marked settled in the journal as they come, and in the ledger
    as ``replayed`` when the segment is done), undelivered (the segment is
    kept), or refused for good (set aside, never replayed again)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()
        self._journal: Journal | None = None
        self._path: Path | None = None
        self._settled: list[bytes | None] = []  # ids to mark at the next served()

    def reset(self, journal: Journal, path: Path) -> None:
        """Count for the segment ``path`` of ``journal`` from now on."""
        with self._lock:
            self._journal, self._path = journal, path
            self.acknowledged = self.failed = 0
            self.rejected: list[Encoded] = []
            self.why = ""

    def delivered(self, message: Message, tag: object) -> None:
        with self._lock:
            self.acknowledged += 1
            self._settled.append(record_id(message.value() or b""))

    def settled(self) -> None:
        """The segment is done: its acknowledged records count as ``replayed``
        (a kept segment's do not: they are marked, and not produced again)."""
        self._ledger.add_replayed(self.acknowledged)

    def undelivered(self, records: list[Encoded], why: str, tag: object) -> None:
        with self._lock:
            self.failed += len(records)
            self.why = why

    def refused(self, records: list[Encoded], why: str, tag: object) -> None:
        with self._lock:
            self.rejected.extend(records)  # marked once kept in rejected.log
            self.why = why

    def served(self) -> None:
        """Mark the records settled since the last call in the segment's journal."""
        with self._lock:
            settled, self._settled = self._settled, []
            journal, path = self._journal, self._path
        if settled and journal is not None and path is not None:
            journal.settle(path, settled, live=False)
            journal.flush_marks()


class Replayer:
    """Replays journaled records: this process's own slot, and the slots of
    processes that have stopped. Thread-side methods are marked."""

    def __init__(
        self,
        kafka: Mapping[str, KafkaValue],
        spill: SpillSettings,
        ledger: Ledger,
        own: Journal | None,
        *,
        rate: float | None = None,  # records/s; None: as fast as the broker takes them
    ) -> None:
        self._root = Path(spill.directory)
        self._options = journal_options(spill)
        self._own = own
        self._rate = rate
        self._segment = _SegmentReports(ledger)
        self.sink = KafkaSink(kafka, self._segment, name="replay producer")
        self.stop = threading.Event()
        self._log = RateLimitedLog(log)

    # -- thread side ----------------------------------------------------------

    def journals(self) -> Iterator[Journal]:
        """This process's journal, then each slot no running process holds."""
        if self._own is not None:
            yield self._own
        yield from Journal.unclaimed(self._root, **self._options)

    def held_slots(self) -> list[Path]:
        """Slot directories a running process holds (it replays them itself)."""
        if not self._root.is_dir():
            return []
        free = {journal.directory for journal in Journal.unclaimed(self._root, **self._options)}
        own = {self._own.directory} if self._own is not None else set()
        return sorted(
            slot for slot in self._root.glob("slot-*") if slot.is_dir() and slot not in free | own
        )

    def count(self) -> int:
        """Records waiting in the journals this replayer can reach (thread side)."""
        total = 0
        for journal in self.journals():
            for path in journal.replayable():
                settled = journal.settled_ids(path)
                total += sum(1 for r in SegmentReader(path) if record_id(r.value) not in settled)
        return total

    def wait_reachable(self, timeout: float) -> bool:
        """Connect the replay producer; whether a broker answered within ``timeout`` s."""
        give_up = time.monotonic() + timeout
        while not self.sink.reachable and time.monotonic() < give_up:
            self.sink.flush(0.1)  # serves the statistics callback
        return self.sink.reachable

    def pending(self) -> bool:
        """Whether anything waits for replay (in a thread: it reads directories)."""
        if self._own is not None and self._own.has_replayable():
            return True
        return any(journal.size for journal in Journal.unclaimed(self._root, **self._options))

    def replay_all(
        self,
        progress: Callable[[int], None] = lambda records: None,
        healthy: Callable[[], bool] = lambda: True,
    ) -> bool:
        """Replay every segment, oldest first (thread side). A segment that could
        not be delivered whole is kept, and the others are still tried while
        ``healthy()`` (the broker is reachable). Returns whether all were."""
        whole = True
        for journal in self.journals():
            for path in journal.replayable():
                if self.stop.is_set():
                    return False
                if not self.replay_segment(journal, path, progress):
                    whole = False
                    if not healthy():
                        return False
        return whole

    def replay_segment(
        self, journal: Journal, path: Path, progress: Callable[[int], None] = lambda n: None
    ) -> bool:
        """Produce the records of one sealed segment that are not marked settled;
        delete it (or set it aside if its tail is bad) once every one is
        acknowledged. Each acknowledgement is marked as it comes, so records
        delivered from a segment that is kept are not produced again. Returns
        whether the segment was done."""
        settled = journal.settled_ids(path)
        reader = SegmentReader(path)
        records = (r for r in reader if not settled or record_id(r.value) not in settled)
        segment, sink = self._segment, self.sink
        segment.reset(journal, path)
        started, sent, chunk = time.monotonic(), 0, list(islice(records, _CHUNK))
        while chunk and not self._interrupted():
            if self._rate is not None:
                ahead = started + sent / self._rate - time.monotonic()
                if ahead > 0:
                    time.sleep(min(ahead, 0.1))
                    continue
            accepted = sink.produce_batch(chunk, _WINDOW)
            sent += accepted
            del chunk[:accepted]
            if not chunk:
                chunk = list(islice(records, _CHUNK))
            before = segment.acknowledged
            sink.flush(0)  # serve the reports that are in
            progress(segment.acknowledged - before)
            time.sleep(0)  # let the Trio thread take the GIL between chunks
        while sink.queued() and not self._interrupted():
            before = segment.acknowledged
            sink.flush(0.2)
            progress(segment.acknowledged - before)
        if sink.queued():  # stopping: what is not acknowledged at once stays on disk
            sink.flush(_STOP_FLUSH)
            if sink.queued():
                sink.purge(wait=_STOP_FLUSH)
        segment.settled()
        if segment.rejected:
            aside = journal.reject(segment.rejected)
            journal.settle(path, [record_id(r.value) for r in segment.rejected], live=False)
            journal.flush_marks()
            log.error(
                "replay of %s: Kafka refused %d records for good (%s); kept in %s",
                path,
                len(segment.rejected),
                segment.why,
                aside,
            )
        if sink.fatal_error is not None:
            sink.rebuild()  # the segment is kept and tried again
            return False
        if chunk or segment.failed or segment.acknowledged + len(segment.rejected) < sent:
            if segment.failed:
                log.warning(
                    "replay of %s: %d of %d records not delivered (%s); segment kept",
                    path,
                    segment.failed,
                    sent,
                    segment.why,
                )
            return False
        if reader.corrupt_at is None:
            journal.delete(path)
            log.info("replayed %d records from %s", segment.acknowledged, path)
        else:
            kept = journal.set_aside(path)
            log.error(
                "replayed the %d intact records of %s; a torn or corrupt tail at byte %d "
                "is kept as %s",
                sent,
                path,
                reader.corrupt_at,
                kept,
            )
        return True

    def _interrupted(self) -> bool:
        return self.stop.is_set() or self.sink.fatal_error is not None

    # -- Trio side --------------------------------------------------------------

    async def run(self, reachable: Callable[[], bool]) -> None:
        """Replay in the background whenever the broker is reachable and the
        journals hold records: at start-up and after an outage. Also fsyncs
        this process's journal under ``spill.fsync = "interval"``. Never returns; cancel it
        after setting ``stop`` (the pipeline does). An error is logged and
        retried later: it never stops the service."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sync_journal)
            await self._replay_when_reachable(reachable)

    async def _sync_journal(self) -> None:
        """Under ``spill.fsync = "interval"``: fsync this process's journal every
        ``spill.fsync_interval`` s, in a thread."""
        if self._own is None:
            return
        limiter = trio.CapacityLimiter(1)
        while True:
            await trio.sleep(self._options["fsync_interval"])
            try:
                await trio.to_thread.run_sync(self._own.sync_if_due, limiter=limiter)
            except OSError as exc:
                self._log(logging.ERROR, "sync", f"cannot fsync the spill journal: {exc}")

    async def _replay_when_reachable(self, reachable: Callable[[], bool]) -> None:
        limiter = trio.CapacityLimiter(1)
        backoff = _BACKOFF[0]
        while True:
            await trio.sleep(_IDLE)
            # Between replays nothing else polls the replay producer, and what
            # librdkafka queues for it (a statistics document of some 10 kB
            # a second, errors) would pile up for as long as the service runs.
            await trio.to_thread.run_sync(self.sink.poll, limiter=limiter)
            if not reachable():
                continue
            try:
                if not await trio.to_thread.run_sync(self.pending, limiter=limiter):
                    continue
                whole = await trio.to_thread.run_sync(
                    partial(self.replay_all, healthy=reachable), limiter=limiter
                )
            except Exception as exc:  # a disk or journal error: try again later
                self._log(logging.ERROR, type(exc).__name__, f"replay failed: {exc!r}")
                whole = False
            if whole:
                backoff = _BACKOFF[0]
                continue
            if self.stop.is_set():
                return
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF[1])
