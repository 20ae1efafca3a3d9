"""Bounded channel, overflow policy, worker pool, batching and drain.

request ─► Intake.submit ─► bounded channel ─► worker tasks (enrich, JSON, batch)
        ─► Sink.produce_batch (in a thread) ─► delivery reports ─► Ledger (ledger.py)

What Kafka cannot take goes to the spill journal (``Spill.keep``): a batch
librdkafka's queue has no room for within ``spill.queue_full_timeout``, what
is left at the drain deadline, and, under ``when_full = "spill"``, the hits
that find the channel full (through a second bounded channel and one writer).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Protocol

import trio

from .commit import Commit
from .config import RecordsSettings
from .durable import Flight, Unrecorded
from .hits import Encoded, Hit
from .ledger import Ledger
from .spill import PartialWrite, Placement, Spill

log = logging.getLogger(__name__)

# How long one produce attempt may wait for room in librdkafka's queue before
# the worker checkpoints (so a drain deadline can take effect) and retries.
PRODUCE_WINDOW = 0.25  # s
_CHECKPOINT_EVERY = 256  # hits encoded from a backlog between checkpoints (~4 ms)
_TICK = 0.005  # s between a lingering batch's looks at the channel
_FATAL_CHECK = 0.2  # s between looks at the producer's fatal-error flag
_WATCH_EVERY = 0.05  # s between looks at broker reachability while a flight waits


class Sink(Protocol):
    """The producer side, called only from worker threads (never the Trio thread)."""

    fatal_error: str | None  # set by librdkafka's error callback; cleared by rebuild()

    reachable: bool  # some broker connection is up

    def produce_batch(self, batch: Sequence[Encoded], window: float, tag: object = None) -> int:
        """Take a prefix of ``batch``; return its length. Waits at most ``window`` s
        for queue room. Each record taken ends in exactly one delivery report,
        which carries ``tag``, or, if the producer refuses it outright, is
        reported at once."""

    def queued(self) -> int:
        """Records enqueued whose delivery report has not been served yet."""

    def poll_until(self, stop: threading.Event) -> None:
        """Serve delivery reports until ``stop`` is set."""

    def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for outstanding reports."""

    def purge(self) -> None:
        """Purge what is still queued (never-sent records first), serving the
        error delivery reports so that each one is spilled or counted."""

    def rebuild(self) -> None:
        """Replace a producer that had a fatal error; what it held is spilled or counted."""


class Admission(enum.Enum):
    ACCEPTED = "accepted"  # in the channel (and, under durability, its record durable)
    DROPPED = "dropped"  # answered, record counted as dropped
    SHED = "shed"  # answer 503, record counted as shed


class Budget:
    """Bytes of event data (``Hit.data``) held from the intake until their
    records are handed to librdkafka or the journal, or settled otherwise
    (``collect.max_bytes_in_flight``). Used on the Trio thread only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._freed = trio.Event()

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes may be taken now: within the limit, or
        nothing held (so one request's events always fit, one at a time)."""
        return size == 0 or self.held == 0 or self.held + size <= self.limit

    def take(self, size: int) -> None:
        self.held += size

    def release(self, size: int) -> None:
        if size:
            self.held -= size
            self._freed.set()
            self._freed = trio.Event()

    async def wait_freed(self) -> None:
        """Return once some bytes are released."""
        await self._freed.wait()


def _size(hit: Hit) -> int:
    return 0 if hit.data is None else len(hit.data)


class Intake:
    """The request path's end of the channel, with the ``when_full`` policy
    (for a full channel, or events past the byte ``Budget``) and, under
    ``records.durability`` "journal" or "kafka", the wait for durable records."""

    def __init__(
        self,
        send: trio.MemorySendChannel[Hit],
        overflow: trio.MemorySendChannel[Hit],
        records: RecordsSettings,
        ledger: Ledger,
        budget: Budget | None = None,
    ) -> None:
        self._send = send
        self._budget = budget or Budget(2**62)
        self._overflow = overflow  # to the spill writer, under when_full = "spill"
        self._policy = records.when_full
        self._on_full = _WHEN_FULL[records.when_full]
        self._max_block = records.max_block
        self._ledger = ledger
        # The open group commit; None under durability "memory".
        self._commit = Commit() if records.durability != "memory" else None

    async def submit(self, hit: Hit) -> Admission:
        """Hand a hit to the workers; O(1) unless the channel is full (or
        ``records.durability`` asks to wait for its record).

        Under ``block`` this waits at most ``max_block`` s for room; under
        ``spill`` a hit that finds the channel full goes to the spill writer's
        channel (accepted) unless that is full too. The hit is counted as
        received, and, when it is not accepted, as dropped or shed.
        Cancellation while waiting for room counts it as dropped.
        """
        self._ledger.received += 1
        if self._commit is not None:
            return (await self._admit_durably((hit,)))[1]
        try:
            self._send.send_nowait(hit)
            return Admission.ACCEPTED
        except trio.WouldBlock:
            pass
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._ledger.add_dropped()
            return Admission.DROPPED
        return (await self._when_full((hit,), 0))[1]

    async def submit_all(self, items: Sequence[Hit]) -> tuple[int, Admission]:
        """Hand the events of one collect request to the workers, in order.

        Returns how many were accepted and ``ACCEPTED``, ``DROPPED`` when
        some were dropped, or ``SHED``. Each item is counted as received, and
        each one not accepted as dropped or shed:

        - ``shed``: all or nothing. Unless the channel (and the byte budget)
          has room for every item now, none is taken and all are shed (a
          retry creates no duplicates).
        - ``drop``: what fits now is taken; the rest is dropped.
        - ``spill``: what does not fit goes to the spill writer's channel, and
          what does not fit there either is dropped.
        - ``block``: waits at most ``max_block`` s in all for room, then drops
          the rest.

        Cancellation while waiting for room counts the items not yet taken as
        dropped.
        """
        self._ledger.received += len(items)
        if self._commit is not None:
            return await self._admit_durably(items)
        if self._policy == "shed" and not self._room_for(items):
            return await self._when_full(items, 0)
        return await self._when_full(items, self._offer(self._send, items, 0))

    async def _admit_durably(self, items: Sequence[Hit]) -> tuple[int, Admission]:
        """Enqueue ``items`` under the open group commit, then wait until each
        one's record is durable or cannot be made so (the workers count those
        shed or dropped). Items that find no room follow ``when_full`` under a
        commit of their own, as the open one may close while they wait.
        Returns how many are durable, and ``SHED`` (under ``shed``) or
        ``DROPPED`` when some are not."""
        assert self._commit is not None
        commit = self._commit
        tagged = [item._replace(commit=commit) for item in items]
        shed_all = self._policy == "shed" and not self._room_for(items)
        taken = 0 if shed_all else self._offer(self._send, tagged, 0)
        commit.join(taken)
        groups = [(commit, tagged[:taken])] if taken else []
        admission = Admission.ACCEPTED
        if taken < len(items):
            own = Commit()
            rest = [item._replace(commit=own) for item in items[taken:]]
            own.join(len(rest))
            own.close()
            more, admission = await self._when_full(rest, 0)
            own.leave(len(rest) - more)
            if more:
                groups.append((own, rest[:more]))
            taken += more
        lost = 0
        for group, hits in groups:
            await group.wait()
            if group.undurable:
                lost += sum(group.lost(hit.id) for hit in hits)
        if lost:
            admission = Admission.SHED if self._policy == "shed" else Admission.DROPPED
        return taken - lost, admission

    def close_commit(self) -> None:
        """A worker has closed a batch: so is the open group commit, and a new
        one opens. Its requests are answered once its hits are settled."""
        commit = self._commit
        if commit is not None and commit.used:
            commit.close()
            self._commit = Commit()

    def _room_for(self, items: Sequence[Hit]) -> bool:
        stats = self._send.statistics()
        room = stats.max_buffer_size - stats.current_buffer_used + stats.tasks_waiting_receive
        return room >= len(items) and self._budget.fits(sum(map(_size, items)))

    async def _when_full(self, items: Sequence[Hit], taken: int) -> tuple[int, Admission]:
        """``records.when_full`` for ``items[taken:]``, which found no room (or
        a closed channel): how many are taken in all, and the admission. Counts
        those not taken as shed (``shed``, when none was taken) or dropped."""
        count = len(items)
        if taken == count:
            return taken, Admission.ACCEPTED
        after = await self._on_full(self, items, taken)
        if after is None:
            self._ledger.add_shed(count)
            return 0, Admission.SHED
        if after == count:
            return after, Admission.ACCEPTED
        self._ledger.add_dropped(count - after)
        return after, Admission.DROPPED

    def _offer(self, channel: trio.MemorySendChannel[Hit], items: Sequence[Hit], taken: int) -> int:
        """Put items from ``taken`` on into ``channel`` while it has room (and,
        for the channel to the workers, the byte budget too); the new count.
        The overflow channel, drained to the journal, takes events past the
        budget, and counts them in it."""
        budget, checked = self._budget, channel is self._send
        try:
            for item in items[taken:]:
                size = _size(item)
                if checked and not budget.fits(size):
                    break
                channel.send_nowait(item)
                budget.take(size)
                taken += 1
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return taken


# The when_full policies: given items of which the first ``taken`` are in the
# channel, each returns how many are taken in the end, or None to shed them all.


async def _shed(intake: Intake, items: Sequence[Hit], taken: int) -> int | None:
    return None if taken == 0 else taken


async def _drop(intake: Intake, items: Sequence[Hit], taken: int) -> int | None:
    return taken


async def _spill(intake: Intake, items: Sequence[Hit], taken: int) -> int | None:
    return intake._offer(intake._overflow, items, taken)


async def _block(intake: Intake, items: Sequence[Hit], taken: int) -> int | None:
    """Waits at most ``max_block`` s in all, for room in the channel and in
    the byte budget; cancelled meanwhile, the items not taken are counted
    dropped."""
    budget = intake._budget
    try:
        with trio.move_on_after(intake._max_block):
            for item in items[taken:]:
                size = _size(item)
                while not budget.fits(size):
                    await budget.wait_freed()
                budget.take(size)
                try:
                    await intake._send.send(item)
                except BaseException:
                    budget.release(size)
                    raise
                taken += 1
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    except BaseException:  # cancelled from outside while waiting: still counted
        intake._ledger.add_dropped(len(items) - taken)
        raise
    return taken


_WHEN_FULL: dict[str, Callable[[Intake, Sequence[Hit], int], Awaitable[int | None]]] = {
    "block": _block,
    "drop": _drop,
    "shed": _shed,
    "spill": _spill,
}


class _Batch:
    """A worker's batch: the records for Kafka, the durable hits they answer
    (in the same order), and the tag their delivery reports carry: None, the
    ``Placement`` they were written ahead to, or their ``Flight``."""

    __slots__ = ("bytes", "hits", "records", "tag")

    def __init__(self) -> None:
        self.bytes = 0  # of event data (Budget), released once the batch is handled
        self.records: list[Encoded] = []
        self.hits: list[Hit] = []
        self.tag: Placement | Flight | None = None


class Pipeline:
    """A running pipeline: its intake and the gauges the metrics read."""

    def __init__(
        self,
        records: RecordsSettings,
        sink: Sink,
        spill: Spill,
        encode: Callable[[Hit], Encoded | None],
        ledger: Ledger,
        observe_batch: Callable[[int], None],
        spill_after: float | None,
        max_bytes_in_flight: int = 2**62,
    ) -> None:
        self.send, self.receive = trio.open_memory_channel[Hit](records.queue_size)
        self.overflow_send, self.overflow_receive = trio.open_memory_channel[Hit](
            records.queue_size if records.when_full == "spill" else 0
        )
        self.budget = Budget(max_bytes_in_flight)
        self.intake = Intake(self.send, self.overflow_send, records, ledger, self.budget)
        self.closed = trio.Event()  # set when the intake's channels are closed
        self._gathering = trio.Lock()  # held by the worker gathering a batch
        self.ledger = ledger
        self.workers = records.workers
        self.spill = spill
        self.unrecorded = Unrecorded(ledger, records.when_full)
        self._records = records
        self._sink = sink
        self._encode = encode
        self._observe_batch = observe_batch
        self._spill_after = spill_after  # s of a full librdkafka queue; None: wait
        self._backed_up = False  # the last batch found no room for spill_after s
        self._limiter = trio.CapacityLimiter(records.workers)
        self._disk = trio.CapacityLimiter(1)
        self.held = 0  # records taken from a channel, not yet in librdkafka or the journal
        self._in_hand: list[_Batch] = []  # each worker's current batch
        # Group commit: a durable batch closes as soon as the channel is empty.
        self._group_commit = records.durability != "memory"
        self.deliver = {
            "memory": self.ship,
            "journal": self._journal_then_ship,
            "kafka": self._ship_acknowledged,
        }[records.durability]
        self.flights: deque[Flight] = deque()  # under "kafka", oldest first
        self._flown = trio.Event()  # set when a flight is added

    def queue_depth(self) -> int:
        return (
            self.send.statistics().current_buffer_used
            + self.overflow_send.statistics().current_buffer_used
        )

    def in_flight(self) -> int:
        """Records in the channels, in workers' batches, or in librdkafka's
        queue (but those already counted as given up)."""
        return self.queue_depth() + self.held + self._sink.queued() - self.unrecorded.given_up

    def _take(self, hit: Hit, batch: _Batch) -> None:
        """Enrich and serialize a hit into the batch. One from an excluded client
        (``encode`` returns None) is counted as excluded; one that cannot be
        encoded, as failed. Either way its request (if it waits) is answered:
        as recorded, and by ``when_full``."""
        try:
            encoded = self._encode(hit)
        except Exception:
            self.budget.release(_size(hit))
            self.ledger.add_failed()
            log.exception("record %s could not be encoded; counted as failed", hit.id)
            if hit.commit is not None:
                hit.commit.settle(hit.id, False)
            return
        if encoded is None:
            self.budget.release(_size(hit))
            self.ledger.add_excluded()
            if hit.commit is not None:
                hit.commit.settle(hit.id, True)
            return
        self.held += 1
        batch.bytes += _size(hit)
        batch.records.append(encoded)
        if hit.commit is not None:
            batch.hits.append(hit)

    async def collect(self, receive: trio.MemoryReceiveChannel[Hit], batch: _Batch) -> bool:
        """Wait for a hit, then gather more into ``batch`` until ``batch_size``
        or ``batch_linger`` (under durability: until the channel is empty, as
        a linger would delay every answer). Returns whether the channel has ended.

        While the batch lingers, the worker looks at the channel every
        ``_TICK`` and takes all it holds, rather than waking for each hit: at
        a few thousand requests/s a wake-up per hit cost about as much as
        encoding it. A backlog is taken without sleeping, and the channel's
        close ends the wait at once.

        Encoding runs here, on the Trio thread: it is pure-Python CPU work,
        which in a thread would hold the GIL just the same and add hand-offs.
        A checkpoint every ``_CHECKPOINT_EVERY`` hits bounds how long a backlog
        delays redirects.
        """
        records, size = batch.records, self._records.batch_size
        try:
            self._take(await receive.receive(), batch)
            closes = trio.current_time() + self._records.batch_linger
            while len(records) < size:
                try:
                    hit = receive.receive_nowait()
                except trio.WouldBlock:
                    now = trio.current_time()
                    if self._group_commit or now >= closes:
                        break
                    with trio.move_on_at(min(closes, now + _TICK)):
                        await self.closed.wait()
                    continue
                self._take(hit, batch)
                if len(records) % _CHECKPOINT_EVERY == 0:
                    await trio.lowlevel.checkpoint()
        except trio.EndOfChannel:
            return True
        return False

    async def ship(self, batch: _Batch) -> None:
        """Hand a batch to the sink across the thread boundary, retrying while
        librdkafka's queue is full; past ``spill.queue_full_timeout`` the rest
        goes to the spill journal instead. Empties ``batch``.

        Once a batch has been spilled that way, the next ones wait for no room:
        they take what fits at once and spill the rest, until one fits whole.
        Under ``records.durability`` (with a journal) no batch waits for room:
        answers would wait behind it, and the journal is where the rest goes
        (a batch written ahead is there already).
        On cancellation the unshipped rest stays in ``batch``, counted in ``held``.
        """
        started = trio.current_time()
        at_once = self._group_commit and self.spill.journal is not None
        while batch.records:
            if at_once or (
                self._spill_after is not None
                and (self._backed_up or trio.current_time() - started >= self._spill_after)
            ):
                await self._produce(batch, 0.0)
                self._backed_up = bool(batch.records)
                if batch.records:
                    await self.keep(batch, "librdkafka's queue stayed full")
                break
            await self._produce(batch, PRODUCE_WINDOW)
        batch.tag = None

    async def _produce(self, batch: _Batch, window: float) -> None:
        accepted = await trio.to_thread.run_sync(
            self._sink.produce_batch, batch.records, window, batch.tag, limiter=self._limiter
        )
        self.held -= accepted
        del batch.records[:accepted]

    async def keep(self, batch: _Batch, why: str) -> None:
        """Journal what is left of ``batch`` (in a thread) and empty it.

        Records written ahead are in the journal already: they wait there for
        a replay. A flight's go through the flight (its hits await them).
        Otherwise they are spilled, and the hits waiting on them answered by
        whether they were written.
        """
        records, tag = list(batch.records), batch.tag
        if isinstance(tag, Placement):
            await trio.to_thread.run_sync(tag.leave, len(records), self.ledger, limiter=self._disk)
        elif isinstance(tag, Flight):
            await trio.to_thread.run_sync(tag.undelivered, records, why, limiter=self._disk)
        else:
            written = await trio.to_thread.run_sync(
                self.spill.keep, records, why, limiter=self._disk
            )
            for index, hit in enumerate(batch.hits):
                if hit.commit is not None:
                    hit.commit.settle(hit.id, index < written)
        batch.hits.clear()
        self.held -= len(records)
        batch.records.clear()

    async def _journal_then_ship(self, batch: _Batch) -> None:
        """Write ``batch`` to the journal before its answers go out, then ship it.

        One thread hop does both: the write (a group commit: one write for the
        batch), then, once the batch's requests are told (``_answer``, on the
        Trio thread), handing the batch to librdkafka as far as its queue has
        room at once; the rest stays in the journal for the replay. Records
        the journal cannot take are not recorded (``Unrecorded``: shed or
        dropped, by ``when_full``).
        """
        journal, records = self.spill.journal, batch.records
        hits, batch.hits = batch.hits, []
        token = trio.lowlevel.current_trio_token()

        def write_then_produce() -> tuple[Path | None, int, str, int]:
            segment, written, reason = None, 0, "spill disabled"
            if journal is not None:
                try:
                    segment, written = journal.write_ahead(records)
                    reason = "the spill journal is full (spill.max_bytes)"
                except PartialWrite as exc:
                    reason = f"cannot write the spill journal: {exc}"
            token.run_sync_soon(_answer, hits, written)
            if not written:
                return segment, written, reason, 0
            assert journal is not None and segment is not None
            tag = Placement(journal, segment)
            return segment, written, reason, self._sink.produce_batch(records[:written], 0.0, tag)

        segment, written, reason, taken = await trio.to_thread.run_sync(
            write_then_produce, limiter=self._limiter
        )
        self.ledger.add_journaled(written)
        lost = len(records) - written
        if lost:
            self.unrecorded(lost, reason)
            del records[written:]
        del records[:taken]
        self.held -= lost + taken
        if records:
            assert journal is not None and segment is not None
            batch.tag = Placement(journal, segment)
            await self.keep(batch, "librdkafka's queue was full")
        batch.tag = None

    async def _ship_acknowledged(self, batch: _Batch) -> None:
        """Under durability "kafka": ship the batch as a ``Flight`` whose hits
        await Kafka's acknowledgements (``watch_flights`` journals it at
        ``ack_timeout``). While no broker is reachable, no hit waits for one:
        the batch is written ahead at once."""
        if not self._sink.reachable:
            await self._journal_then_ship(batch)
            return
        flight = Flight(
            batch.hits,
            list(batch.records),
            trio.current_time() + self._records.ack_timeout,
            self.spill,
            self.ledger,
            self.unrecorded,
        )
        batch.hits = []
        batch.tag = flight
        self.flights.append(flight)
        self._flown.set()
        await self.ship(batch)

    async def watch_flights(self) -> None:
        """Under durability "kafka": journal each flight's unacknowledged
        records at its deadline, or at once while no broker is reachable.
        Flights are taken oldest first, as their deadlines come."""
        flights, sink = self.flights, self._sink
        while True:
            if not flights:
                self._flown = trio.Event()
                await self._flown.wait()
                continue
            flight = flights[0]
            while (
                not flight.done.is_set()
                and sink.reachable
                and trio.current_time() < flight.deadline
            ):
                with trio.move_on_at(min(flight.deadline, trio.current_time() + _WATCH_EVERY)):
                    await flight.done.wait()
            if not flight.done.is_set():
                await trio.to_thread.run_sync(flight.journal_rest, limiter=self._disk)
            flights.popleft()

    async def run_worker(self, receive: trio.MemoryReceiveChannel[Hit]) -> None:
        async def deliver(batch: _Batch) -> None:
            self._observe_batch(len(batch.records))
            await self.deliver(batch)

        await self._run(receive, deliver, self._gathering)

    async def run_overflow_writer(self, receive: trio.MemoryReceiveChannel[Hit]) -> None:
        """Under ``when_full = "spill"``: journal the hits that found the channel full."""
        why = "the channel was full (when_full = spill)"
        await self._run(receive, partial(self.keep, why=why), trio.Lock())

    async def _run(
        self,
        receive: trio.MemoryReceiveChannel[Hit],
        handle: Callable[[_Batch], Awaitable[None]],
        gathering: trio.Lock,
    ) -> None:
        """Collect batches until the channel ends; ``handle`` empties each one.

        One worker at a time gathers (holds ``gathering``) while the others
        ship the batches they gathered: a batch fills, rather than the hits
        being split between workers that all linger and all wake.
        """
        batch = _Batch()
        self._in_hand.append(batch)
        async with receive:
            done = False
            while not done:
                async with gathering:
                    done = await self.collect(receive, batch)
                    self.intake.close_commit()
                if batch.records:
                    await handle(batch)
                self._handled(batch)

    def _handled(self, batch: _Batch) -> None:
        """Release the byte budget of a batch handed over (or journaled)."""
        self.budget.release(batch.bytes)
        batch.bytes = 0

    async def spill_leftovers(self) -> None:
        """After the drain deadline: journal every record still in a worker's
        batch or in a channel. Must run shielded."""
        leftovers = _Batch()
        for receive in (self.receive, self.overflow_receive):
            while True:
                try:
                    self._take(receive.receive_nowait(), leftovers)
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
        count = len(leftovers.records) + sum(len(batch.records) for batch in self._in_hand)
        if count:
            log.error("%d records not handed to Kafka within flush_timeout: spilling", count)
        for batch in [*self._in_hand, leftovers]:
            if batch.records:
                await self.keep(batch, "not handed to Kafka within flush_timeout")
            self._handled(batch)


async def _serve_reports(sink: Sink, stop: threading.Event) -> None:
    await trio.to_thread.run_sync(sink.poll_until, stop, limiter=trio.CapacityLimiter(1))


async def _run_workers(
    pipeline: Pipeline, drain: trio.CancelScope, stop_polling: threading.Event
) -> None:
    """Run the worker pool (and the spill writer) inside ``drain`` until the
    channels end or its deadline; then journal what was not handed over and
    stop the report poller."""
    try:
        with drain:
            async with trio.open_nursery() as workers:
                for _ in range(pipeline.workers):
                    workers.start_soon(pipeline.run_worker, pipeline.receive.clone())
                workers.start_soon(pipeline.run_overflow_writer, pipeline.overflow_receive.clone())
    finally:
        with trio.CancelScope(shield=True):
            await pipeline.spill_leftovers()
        pipeline.receive.close()
        pipeline.overflow_receive.close()
        stop_polling.set()


async def _rebuild_on_fatal(sink: Sink) -> None:
    """Rebuild the producer whenever librdkafka reports a fatal error."""
    limiter = trio.CapacityLimiter(1)
    while True:
        await trio.sleep(_FATAL_CHECK)
        if sink.fatal_error is not None:
            await trio.to_thread.run_sync(sink.rebuild, limiter=limiter)


@asynccontextmanager
async def open_pipeline(
    records: RecordsSettings,
    flush_timeout: float,
    sink: Sink,
    spill: Spill,
    encode: Callable[[Hit], Encoded | None],
    ledger: Ledger,
    *,
    observe_batch: Callable[[int], None] = lambda size: None,
    spill_after: float | None = None,
    background: Sequence[Callable[[], Awaitable[None]]] = (),
    stopping: threading.Event | None = None,
    max_bytes_in_flight: int = 2**62,
) -> AsyncIterator[Pipeline]:
    """Run the worker pool, the one delivery-report poller, the fatal-error
    watcher, under durability "kafka" the flight watcher, and the
    ``background`` tasks (the replayer) around the body;
    ``stopping`` is set first on exit, for background work in threads.

    The workers are shielded from the caller's cancellation: on exit, whatever
    the reason, the background tasks are cancelled, the channels are closed,
    the workers drain them and ship their last batches, and the producer is
    flushed, all within ``flush_timeout`` s. Records not handed over in that
    time are journaled (``spill``); records still unacknowledged are purged,
    and their reports journal them too. ``in_flight`` is 0 at exit unless
    librdkafka does not report the purged records within 2 s (the ledger then
    shows them).
    """
    pipeline = Pipeline(
        records, sink, spill, encode, ledger, observe_batch, spill_after, max_bytes_in_flight
    )
    stop_polling = threading.Event()
    drain = trio.CancelScope(shield=True)  # only the drain deadline stops the workers
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_reports, sink, stop_polling)
        nursery.start_soon(_run_workers, pipeline, drain, stop_polling)
        async with trio.open_nursery() as tasks:
            tasks.start_soon(_rebuild_on_fatal, sink)
            if records.durability == "kafka":
                tasks.start_soon(pipeline.watch_flights)
            for task in background:
                tasks.start_soon(task)
            try:
                yield pipeline
            finally:
                pipeline.send.close()
                pipeline.overflow_send.close()
                pipeline.closed.set()
                drain.deadline = trio.current_time() + flush_timeout
                if stopping is not None:
                    stopping.set()
                tasks.cancel_scope.cancel()
    with trio.CancelScope(shield=True):
        budget = max(0.0, drain.deadline - trio.current_time())
        flusher = trio.CapacityLimiter(1)
        await trio.to_thread.run_sync(sink.flush, budget, limiter=flusher)
        left = sink.queued()
        if left:
            log.error("%d records not acknowledged within flush_timeout: purging", left)
            await trio.to_thread.run_sync(sink.purge, limiter=flusher)


def _answer(hits: list[Hit], durable: int) -> None:
    """Settle the hits of a batch written ahead: the first ``durable`` are in
    the journal, the others not. Runs on the Trio thread."""
    for index, hit in enumerate(hits):
        if hit.commit is not None:
            hit.commit.settle(hit.id, index < durable)
