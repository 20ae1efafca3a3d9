"""Bounded channel, overflow policy, worker pool, batching and drain.

request ─► Intake.submit ─► bounded channel ─► worker tasks (enrich, JSON, batch)
        ─► Sink.produce_batch (in a thread) ─► delivery reports ─► Ledger (ledger.py)
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import trio

from .config import RecordsSettings
from .hits import Encoded, Hit
from .ledger import Ledger

log = logging.getLogger(__name__)

# How long one produce attempt may wait for room in librdkafka's queue before
# the worker checkpoints (so a drain deadline can take effect) and retries.
PRODUCE_WINDOW = 0.25  # s
_CHECKPOINT_EVERY = 256  # hits encoded from a backlog between checkpoints (~4 ms)


class Sink(Protocol):
    """The producer side, called only from worker threads (never the Trio thread)."""

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
        error delivery reports so that each one is counted as failed."""


class Admission(enum.Enum):
    ACCEPTED = "accepted"  # in the channel
    DROPPED = "dropped"  # answered, record counted as dropped
    SHED = "shed"  # answer 503, record counted as shed


class Intake:
    """The request path's end of the channel, with the ``when_full`` policy."""

    def __init__(
        self, send: trio.MemorySendChannel[Hit], records: RecordsSettings, ledger: Ledger
    ) -> None:
        self._send = send
        self._policy = records.when_full
        self._max_block = records.max_block
        self._ledger = ledger

    async def submit(self, hit: Hit) -> Admission:
        """Hand a hit to the workers; O(1) unless the channel is full.

        Under ``block`` this waits at most ``max_block`` s for room. The hit is
        counted as received, and, when it does not enter the channel, as
        dropped or shed. Cancellation while waiting counts it as dropped.
        """
        ledger = self._ledger
        ledger.received += 1
        try:
            self._send.send_nowait(hit)
            return Admission.ACCEPTED
        except trio.WouldBlock:
            pass
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            ledger.dropped += 1
            return Admission.DROPPED
        if self._policy == "shed":
            ledger.shed += 1
            return Admission.SHED
        if self._policy == "block":
            try:
                with trio.move_on_after(self._max_block):
                    await self._send.send(hit)
                    return Admission.ACCEPTED
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass
            except BaseException:  # cancelled while waiting: still counted
                ledger.dropped += 1
                raise
        ledger.dropped += 1
        return Admission.DROPPED


class Pipeline:
    """A running pipeline: its intake and the gauges the metrics read."""

    def __init__(
        self,
        send: trio.MemorySendChannel[Hit],
        records: RecordsSettings,
        sink: Sink,
        encode: Callable[[Hit], Encoded],
        ledger: Ledger,
        observe_batch: Callable[[int], None],
    ) -> None:
        self.intake = Intake(send, records, ledger)
        self.ledger = ledger
        self.workers = records.workers
        self._send = send  # for its statistics: the queue-depth gauge
        self._records = records
        self._sink = sink
        self._encode = encode
        self._observe_batch = observe_batch
        self._limiter = trio.CapacityLimiter(records.workers)
        self.held = 0  # records taken from the channel, not yet in librdkafka

    def queue_depth(self) -> int:
        return self._send.statistics().current_buffer_used

    def in_flight(self) -> int:
        """Records in the channel, in workers' batches, or in librdkafka's queue."""
        return self.queue_depth() + self.held + self._sink.queued()

    def _take(self, hit: Hit, batch: list[Encoded]) -> None:
        """Enrich and serialize a hit into the batch; one that cannot be encoded
        is counted as failed."""
        self.held += 1
        try:
            batch.append(self._encode(hit))
        except Exception:
            self.held -= 1
            self.ledger.add_failed()
            log.exception("record %s could not be encoded; counted as failed", hit.id)

    async def collect(self, receive: trio.MemoryReceiveChannel[Hit]) -> tuple[list[Encoded], bool]:
        """Wait for a hit, then gather more until ``batch_size`` or ``batch_linger``.

        Returns the batch and whether the channel has ended. Encoding runs here,
        on the Trio thread: it is pure-Python CPU work, which in a thread would
        hold the GIL just the same and add hand-offs. A checkpoint every
        ``_CHECKPOINT_EVERY`` hits bounds how long a backlog delays redirects.
        """
        batch: list[Encoded] = []
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
            return batch, True
        return batch, False

    async def ship(self, batch: list[Encoded]) -> None:
        """Hand a batch to the sink across the thread boundary, retrying while full.

        On cancellation the unshipped rest stays counted in ``held``.
        """
        self._observe_batch(len(batch))
        while batch:
            accepted = await trio.to_thread.run_sync(
                self._sink.produce_batch, batch, PRODUCE_WINDOW, limiter=self._limiter
            )
            self.held -= accepted
            del batch[:accepted]

    async def run_worker(self, receive: trio.MemoryReceiveChannel[Hit]) -> None:
        async with receive:
            done = False
            while not done:
                batch, done = await self.collect(receive)
                if batch:
                    await self.ship(batch)


async def _serve_reports(sink: Sink, stop: threading.Event) -> None:
    await trio.to_thread.run_sync(sink.poll_until, stop, limiter=trio.CapacityLimiter(1))


async def _run_workers(
    pipeline: Pipeline,
    receive: trio.MemoryReceiveChannel[Hit],
    drain: trio.CancelScope,
    stop_polling: threading.Event,
) -> None:
    """Run the worker pool inside ``drain`` until the channel ends or its deadline.

    Then count what was not handed over as failed and stop the report poller.
    """
    try:
        with drain:
            async with trio.open_nursery() as workers:
                for _ in range(pipeline.workers):
                    workers.start_soon(pipeline.run_worker, receive.clone())
    finally:
        stop_polling.set()
        unsent = pipeline.held + receive.statistics().current_buffer_used
        receive.close()
        if unsent:
            pipeline.ledger.add_failed(unsent)
            pipeline.held = 0
            log.error("%d records not handed to Kafka within flush_timeout: failed", unsent)


@asynccontextmanager
async def open_pipeline(
    records: RecordsSettings,
    flush_timeout: float,
    sink: Sink,
    encode: Callable[[Hit], Encoded],
    ledger: Ledger,
    observe_batch: Callable[[int], None] = lambda size: None,
) -> AsyncIterator[Pipeline]:
    """Run the worker pool and the one delivery-report poller around the body.

    The workers are shielded from the caller's cancellation: on exit, whatever
    the reason, the channel is closed, the workers drain it and ship their
    last batches, and the producer is flushed, all within ``flush_timeout`` s.
    Records that could not be handed over or flushed in that time are purged
    and counted as failed; ``in_flight`` is 0 at exit unless librdkafka does
    not report the purged records within 2 s (the ledger then shows them).
    """
    send, receive = trio.open_memory_channel[Hit](records.queue_size)
    pipeline = Pipeline(send, records, sink, encode, ledger, observe_batch)
    stop_polling = threading.Event()
    drain = trio.CancelScope(shield=True)  # only the drain deadline stops the workers
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_reports, sink, stop_polling)
        nursery.start_soon(_run_workers, pipeline, receive, drain, stop_polling)
        try:
            yield pipeline
        finally:
            send.close()
            drain.deadline = trio.current_time() + flush_timeout
    with trio.CancelScope(shield=True):
        budget = max(0.0, drain.deadline - trio.current_time())
        flusher = trio.CapacityLimiter(1)
        await trio.to_thread.run_sync(sink.flush, budget, limiter=flusher)
        left = sink.queued()
        if left:
            log.error("%d records not delivered within flush_timeout: purged, failed", left)
            await trio.to_thread.run_sync(sink.purge, limiter=flusher)
