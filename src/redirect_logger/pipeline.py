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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Protocol

import trio

from .config import RecordsSettings
from .hits import Encoded, Hit
from .ledger import Ledger
from .spill import Spill

log = logging.getLogger(__name__)

# How long one produce attempt may wait for room in librdkafka's queue before
# the worker checkpoints (so a drain deadline can take effect) and retries.
PRODUCE_WINDOW = 0.25  # s
_CHECKPOINT_EVERY = 256  # hits encoded from a backlog between checkpoints (~4 ms)
_FATAL_CHECK = 0.2  # s between looks at the producer's fatal-error flag


class Sink(Protocol):
    """The producer side, called only from worker threads (never the Trio thread)."""

    fatal_error: str | None  # set by librdkafka's error callback; cleared by rebuild()

    def produce_batch(self, batch: Sequence[Encoded], window: float) -> int:
        """Take a prefix of ``batch``; return its length. Waits at most ``window`` s
        for queue room. Each record taken ends in exactly one delivery report, or,
        if the producer refuses it outright, is counted as failed at once."""

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
    ACCEPTED = "accepted"  # in the channel
    DROPPED = "dropped"  # answered, record counted as dropped
    SHED = "shed"  # answer 503, record counted as shed


class Intake:
    """The request path's end of the channel, with the ``when_full`` policy."""

    def __init__(
        self,
        send: trio.MemorySendChannel[Hit],
        overflow: trio.MemorySendChannel[Hit],
        records: RecordsSettings,
        ledger: Ledger,
    ) -> None:
        self._send = send
        self._overflow = overflow  # to the spill writer, under when_full = "spill"
        self._policy = records.when_full
        self._max_block = records.max_block
        self._ledger = ledger

    async def submit(self, hit: Hit) -> Admission:
        """Hand a hit to the workers; O(1) unless the channel is full.

        Under ``block`` this waits at most ``max_block`` s for room; under
        ``spill`` a hit that finds the channel full goes to the spill writer's
        channel (accepted) unless that is full too. The hit is counted as
        received, and, when it is not accepted, as dropped or shed.
        Cancellation while waiting counts it as dropped.
        """
        self._ledger.received += 1
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

        Returns how many were accepted (always the first ones) and ``ACCEPTED``,
        ``DROPPED`` when some were dropped, or ``SHED``. Each item is counted as
        received, and each one not accepted as dropped or shed:

        - ``shed``: all or nothing. Unless the channel has room for every item
          now, none is taken and all are shed (a retry creates no duplicates).
        - ``drop``: what fits now is taken; the rest is dropped.
        - ``spill``: what does not fit goes to the spill writer's channel, and
          what does not fit there either is dropped.
        - ``block``: waits at most ``max_block`` s in all for room, then drops
          the rest.

        Cancellation while waiting counts the items not yet taken as dropped.
        """
        self._ledger.received += len(items)
        if self._policy == "shed":
            stats = self._send.statistics()
            room = stats.max_buffer_size - stats.current_buffer_used + stats.tasks_waiting_receive
            if room < len(items):
                return await self._when_full(items, 0)
        return await self._when_full(items, self._offer(self._send, items, 0))

    async def _when_full(self, items: Sequence[Hit], taken: int) -> tuple[int, Admission]:
        """``records.when_full`` for ``items[taken:]``, which found no room (or
        a closed channel): how many are taken in all, and the admission. Counts
        those not taken as shed (``shed``, when none was taken) or dropped."""
        ledger, count, send = self._ledger, len(items), self._send
        if taken == count:
            return taken, Admission.ACCEPTED
        if self._policy == "shed" and taken == 0:
            ledger.shed += count
            return 0, Admission.SHED
        if self._policy == "spill":
            taken = self._offer(self._overflow, items, taken)
        elif self._policy == "block":
            try:
                with trio.move_on_after(self._max_block):
                    for item in items[taken:]:
                        await send.send(item)
                        taken += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            except BaseException:  # cancelled from outside while waiting: still counted
                ledger.add_dropped(count - taken)
                raise
        if taken == count:
            return taken, Admission.ACCEPTED
        ledger.add_dropped(count - taken)
        return taken, Admission.DROPPED

    @staticmethod
    def _offer(channel: trio.MemorySendChannel[Hit], items: Sequence[Hit], taken: int) -> int:
        """Put items from ``taken`` on into ``channel`` while it has room; the new count."""
        try:
            for item in items[taken:]:
                channel.send_nowait(item)
                taken += 1
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return taken


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
    ) -> None:
        self.send, self.receive = trio.open_memory_channel[Hit](records.queue_size)
        self.overflow_send, self.overflow_receive = trio.open_memory_channel[Hit](
            records.queue_size if records.when_full == "spill" else 0
        )
        self.intake = Intake(self.send, self.overflow_send, records, ledger)
        self.ledger = ledger
        self.workers = records.workers
        self.spill = spill
        self._records = records
        self._sink = sink
        self._encode = encode
        self._observe_batch = observe_batch
        self._spill_after = spill_after  # s of a full librdkafka queue; None: wait
        self._backed_up = False  # the last batch found no room for spill_after s
        self._limiter = trio.CapacityLimiter(records.workers)
        self._disk = trio.CapacityLimiter(1)
        self.held = 0  # records taken from a channel, not yet in librdkafka or the journal
        self._in_hand: list[list[Encoded]] = []  # each worker's current batch

    def queue_depth(self) -> int:
        return (
            self.send.statistics().current_buffer_used
            + self.overflow_send.statistics().current_buffer_used
        )

    def in_flight(self) -> int:
        """Records in the channels, in workers' batches, or in librdkafka's queue."""
        return self.queue_depth() + self.held + self._sink.queued()

    def _take(self, hit: Hit, batch: list[Encoded]) -> None:
        """Enrich and serialize a hit into the batch. One from an excluded client
        (``encode`` returns None) is counted as excluded; one that cannot be
        encoded, as failed."""
        try:
            encoded = self._encode(hit)
        except Exception:
            self.ledger.add_failed()
            log.exception("record %s could not be encoded; counted as failed", hit.id)
            return
        if encoded is None:
            self.ledger.add_excluded()
            return
        self.held += 1
        batch.append(encoded)

    async def collect(self, receive: trio.MemoryReceiveChannel[Hit], batch: list[Encoded]) -> bool:
        """Wait for a hit, then gather more into ``batch`` until ``batch_size``
        or ``batch_linger``. Returns whether the channel has ended.

        Encoding runs here, on the Trio thread: it is pure-Python CPU work,
        which in a thread would hold the GIL just the same and add hand-offs.
        A checkpoint every ``_CHECKPOINT_EVERY`` hits bounds how long a backlog
        delays redirects.
        """
        try:
            self._take(await receive.receive(), batch)
            with trio.move_on_after(self._records.batch_linger):
                while len(batch) < self._records.batch_size:
                    try:
                        hit = receive.receive_nowait()
                    except trio.WouldBlock:
                        hit = await receive.receive()
                    self._take(hit, batch)
                    if len(batch) % _CHECKPOINT_EVERY == 0:
                        await trio.lowlevel.checkpoint()
        except trio.EndOfChannel:
            return True
        return False

    async def ship(self, batch: list[Encoded]) -> None:
        """Hand a batch to the sink across the thread boundary, retrying while
        librdkafka's queue is full; past ``spill.queue_full_timeout`` the rest
        goes to the spill journal instead. Empties ``batch``.

        Once a batch has been spilled that way, the next ones wait for no room:
        they take what fits at once and spill the rest, until one fits whole.
        On cancellation the unshipped rest stays in ``batch``, counted in ``held``.
        """
        self._observe_batch(len(batch))
        started = trio.current_time()
        while batch:
            if self._spill_after is not None and (
                self._backed_up or trio.current_time() - started >= self._spill_after
            ):
                await self._produce(batch, 0.0)
                self._backed_up = bool(batch)
                if batch:
                    await self.keep(batch, "librdkafka's queue stayed full")
                return
            await self._produce(batch, PRODUCE_WINDOW)

    async def _produce(self, batch: list[Encoded], window: float) -> None:
        accepted = await trio.to_thread.run_sync(
            self._sink.produce_batch, batch, window, limiter=self._limiter
        )
        self.held -= accepted
        del batch[:accepted]

    async def keep(self, batch: list[Encoded], why: str) -> None:
        """Spill ``batch`` (in a thread) and empty it."""
        await trio.to_thread.run_sync(self.spill.keep, list(batch), why, limiter=self._disk)
        self.held -= len(batch)
        batch.clear()

    async def run_worker(self, receive: trio.MemoryReceiveChannel[Hit]) -> None:
        await self._run(receive, self.ship)

    async def run_overflow_writer(self, receive: trio.MemoryReceiveChannel[Hit]) -> None:
        """Under ``when_full = "spill"``: journal the hits that found the channel full."""
        await self._run(receive, partial(self.keep, why="the channel was full (when_full = spill)"))

    async def _run(
        self,
        receive: trio.MemoryReceiveChannel[Hit],
        handle: Callable[[list[Encoded]], Awaitable[None]],
    ) -> None:
        """Collect batches until the channel ends; ``handle`` empties each one."""
        batch: list[Encoded] = []
        self._in_hand.append(batch)
        async with receive:
            done = False
            while not done:
                done = await self.collect(receive, batch)
                if batch:
                    await handle(batch)

    async def spill_leftovers(self) -> None:
        """After the drain deadline: journal every record still in a worker's
        batch or in a channel. Must run shielded."""
        leftovers = [record for batch in self._in_hand for record in batch]
        for batch in self._in_hand:
            batch.clear()
        for receive in (self.receive, self.overflow_receive):
            while True:
                try:
                    self._take(receive.receive_nowait(), leftovers)
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
        if leftovers:
            log.error(
                "%d records not handed to Kafka within flush_timeout: spilling", len(leftovers)
            )
            await self.keep(leftovers, "not handed to Kafka within flush_timeout")


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
) -> AsyncIterator[Pipeline]:
    """Run the worker pool, the one delivery-report poller, the fatal-error
    watcher and the ``background`` tasks (the replayer) around the body;
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
    pipeline = Pipeline(records, sink, spill, encode, ledger, observe_batch, spill_after)
    stop_polling = threading.Event()
    drain = trio.CancelScope(shield=True)  # only the drain deadline stops the workers
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_reports, sink, stop_polling)
        nursery.start_soon(_run_workers, pipeline, drain, stop_polling)
        async with trio.open_nursery() as tasks:
            tasks.start_soon(_rebuild_on_fatal, sink)
            for task in background:
                tasks.start_soon(task)
            try:
                yield pipeline
            finally:
                pipeline.send.close()
                pipeline.overflow_send.close()
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
