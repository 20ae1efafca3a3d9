"""The pipeline's timing and accounting, on Trio's virtual clock, with an in-memory sink.

The sink here stands in for the producer to observe batching, overflow and
drain deadlines exactly; delivery to a real broker is tested in test_service.py.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from redirect_logger.config import RecordsSettings
from redirect_logger.hits import Encoded, Hit
from redirect_logger.ledger import OUTCOMES, Ledger
from redirect_logger.pipeline import Admission, Pipeline, open_pipeline
from redirect_logger.spill import Journal, PartialWrite, Spill, read_segment
from redirect_logger.steps import StepTrace


class MemorySink:
    """Delivers at once while open; while closed, refuses like a full librdkafka queue."""

    def __init__(self, ledger: Ledger, *, open: bool = True) -> None:
        self.ledger = ledger
        self.reachable = True
        self.fatal_error: str | None = None
        self.rebuilt = 0
        self.open = threading.Event()
        if open:
            self.open.set()
        self.values: list[bytes] = []

    def produce_batch(self, batch: Sequence[Encoded], window: float, tag: object = None) -> int:
        # Real time: the virtual clock jumps meanwhile. No wait for a 0 s window.
        if not (self.open.wait(0.5) if window else self.open.is_set()):
            return 0
        self.values.extend(encoded.value for encoded in batch)
        self.ledger.add_delivered(len(batch))
        return len(batch)

    def queued(self) -> int:
        return 0

    def poll_until(self, stop: threading.Event) -> None:
        stop.wait()

    def flush(self, timeout: float) -> None:
        pass

    def purge(self) -> None:
        pass

    def rebuild(self) -> None:
        self.fatal_error = None
        self.rebuilt += 1


@pytest.fixture
def virtual_clock() -> trio.testing.MockClock:
    """Jumps to the next deadline once Trio has been idle for 0.25 s of real time.

    Not 0 (as ``autojump_clock``): the worker's hop to a thread is idle time for
    Trio, and the clock must not run ahead while a batch is being handed over.
    """
    return trio.testing.MockClock(autojump_threshold=0.25)


def hit(n: int) -> Hit:
    return Hit(f"id-{n:04d}", 0.0, "GET", "http", "/", b"", [], None, 302, "https://t/", "r")


def encode(h: Hit) -> Encoded:
    return Encoded("hits", None, h.id.encode(), 0, [])


def records(**overrides: object) -> RecordsSettings:
    base: dict[str, object] = {
        "workers": 1,
        "batch_size": 10,
        "batch_linger": 1.0,
        "queue_size": 100,
    }
    return RecordsSettings.model_validate({**base, **overrides})


def assert_identity(ledger: Ledger, pipeline: Pipeline) -> None:
    assert ledger.received == ledger.accounted() + pipeline.in_flight()


def pipeline_of(
    settings: RecordsSettings,
    flush_timeout: float,
    sink: MemorySink,
    encoder: Callable[[Hit], Encoded | None] = encode,
    *,
    journal: Journal | None = None,
    **options: Any,
) -> AbstractAsyncContextManager[Pipeline]:
    """open_pipeline with the sink's ledger, spilling to ``journal`` (None: spill off)."""
    spill = Spill(journal, sink.ledger)
    return open_pipeline(settings, flush_timeout, sink, spill, encoder, sink.ledger, **options)


def journaled(journal: Journal) -> list[bytes]:
    return [record.value for path in journal.seal() for record in read_segment(path).records]


def snapshot(**counts: int) -> dict[str, int]:
    zero = dict.fromkeys(OUTCOMES, 0)
    return {**zero, **counts, "in_flight": 0}


async def test_batches_by_size_and_drains_the_rest_on_close(
    virtual_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger)
    shipped: list[tuple[int, float]] = []
    t0 = trio.current_time()
    async with pipeline_of(
        records(), 10.0, sink, observe_batch=lambda n: shipped.append((n, trio.current_time()))
    ) as pipeline:
        for n in range(25):
            assert await pipeline.intake.submit(hit(n)) is Admission.ACCEPTED
    # Two full batches at once; the rest leaves when the channel closes, not after the linger.
    assert shipped == [(10, t0), (10, t0), (5, t0)]
    assert sink.values == [f"id-{n:04d}".encode() for n in range(25)]
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(received=25, delivered=25)


async def test_a_lone_hit_waits_exactly_the_linger(virtual_clock: trio.testing.MockClock) -> None:
    ledger = Ledger()
    shipped: list[float] = []
    t0 = trio.current_time()
    async with pipeline_of(
        records(batch_linger=0.02),
        10.0,
        MemorySink(ledger),
        observe_batch=lambda n: shipped.append(trio.current_time()),
    ) as pipeline:
        await pipeline.intake.submit(hit(1))
        await trio.sleep(5)
    assert shipped == [pytest.approx(t0 + 0.02, abs=1e-9)]
    assert ledger.delivered == 1


@pytest.mark.parametrize("workers", [1, 3])
async def test_a_lingering_batch_takes_hits_per_tick_not_per_hit(
    virtual_clock: trio.testing.MockClock, workers: int
) -> None:
    """40 hits 0.5 ms apart: one batch, whatever the number of workers (one
    gathers at a time), and woken per 5 ms tick, not per hit."""
    ledger = Ledger()
    shipped: list[tuple[int, float]] = []
    trace = StepTrace()
    t0 = trio.current_time()
    async with pipeline_of(
        records(batch_linger=0.05, batch_size=100, workers=workers),
        10.0,
        MemorySink(ledger),
        observe_batch=lambda n: shipped.append((n, trio.current_time())),
    ) as pipeline:
        trio.lowlevel.add_instrument(trace)
        for n in range(40):
            await pipeline.intake.submit(hit(n))
            await trio.sleep(0.0005)
        await trio.sleep(1)
        trio.lowlevel.remove_instrument(trace)
    assert shipped == [(40, pytest.approx(t0 + 0.05, abs=1e-9))]
    assert ledger.delivered == 40
    worker_steps = trace.steps_by_task.get("redirect_logger.pipeline.Pipeline.run_worker", 0)
    # the first hit, 10 ticks of 5 ms, the shipping: about 14 steps (one per hit: 40+)
    assert 5 <= worker_steps <= 20, trace.steps_by_task


async def _fill(pipeline: Pipeline, count: int) -> list[Admission]:
    """Submit one hit and let the worker take it, then ``count`` more."""
    outcomes = [await pipeline.intake.submit(hit(0))]
    await trio.testing.wait_all_tasks_blocked()
    for n in range(1, count + 1):
        outcomes.append(await pipeline.intake.submit(hit(n)))
    return outcomes


@pytest.mark.parametrize(
    ("policy", "refused", "field"),
    [("drop", Admission.DROPPED, "dropped"), ("shed", Admission.SHED, "shed")],
)
async def test_full_queue_refuses_per_policy_and_counts_it(
    virtual_clock: trio.testing.MockClock, policy: str, refused: Admission, field: str
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger, open=False)
    async with pipeline_of(
        records(queue_size=2, batch_size=1, when_full=policy), 10.0, sink
    ) as pipeline:
        outcomes = await _fill(pipeline, 4)
        assert outcomes == [Admission.ACCEPTED] * 3 + [refused] * 2
        assert (pipeline.held, pipeline.queue_depth()) == (1, 2)
        assert getattr(ledger, field) == 2
        assert_identity(ledger, pipeline)
        sink.open.set()
    assert ledger.snapshot(pipeline.in_flight())[field] == 2
    assert (ledger.received, ledger.delivered, pipeline.in_flight()) == (5, 3, 0)
    assert_identity(ledger, pipeline)


async def test_block_waits_max_block_then_drops(virtual_clock: trio.testing.MockClock) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger, open=False)
    async with pipeline_of(
        records(queue_size=1, batch_size=1, when_full="block", max_block=0.5),
        10.0,
        sink,
    ) as pipeline:
        assert await _fill(pipeline, 1) == [Admission.ACCEPTED] * 2
        start = trio.current_time()
        assert await pipeline.intake.submit(hit(7)) is Admission.DROPPED
        assert trio.current_time() - start == pytest.approx(0.5)
        with trio.move_on_after(0.1):  # a request cancelled while blocked is counted too
            await pipeline.intake.submit(hit(8))
        assert ledger.dropped == 2
        assert_identity(ledger, pipeline)
        sink.open.set()
    assert (ledger.received, ledger.delivered, ledger.dropped, pipeline.in_flight()) == (4, 2, 2, 0)


async def test_block_accepts_once_room_frees_up(virtual_clock: trio.testing.MockClock) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger, open=False)
    async with pipeline_of(
        records(queue_size=1, batch_size=1, when_full="block", max_block=5.0),
        10.0,
        sink,
    ) as pipeline:
        await _fill(pipeline, 1)
        outcomes: list[Admission] = []

        async def submit() -> None:
            outcomes.append(await pipeline.intake.submit(hit(9)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit)
            await trio.sleep(1.0)
            assert outcomes == []  # still waiting for room
            sink.open.set()
    assert outcomes == [Admission.ACCEPTED]
    assert (ledger.received, ledger.delivered, ledger.dropped) == (3, 3, 0)


async def test_drain_deadline_counts_unshipped_records_failed_without_a_journal(
    virtual_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger, open=False)
    async with pipeline_of(records(batch_size=2), 3.0, sink) as pipeline:
        for n in range(5):
            await pipeline.intake.submit(hit(n))
        closing = trio.current_time()
    assert trio.current_time() - closing == pytest.approx(3.0, abs=0.05)
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(received=5, failed=5)


async def test_drain_deadline_journals_every_unshipped_record(
    virtual_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger, open=False)
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**5)
    async with pipeline_of(records(batch_size=2), 3.0, sink, journal=journal) as pipeline:
        for n in range(5):
            await pipeline.intake.submit(hit(n))
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(received=5, spilled=5)
    assert sorted(journaled(journal)) == [f"id-{n:04d}".encode() for n in range(5)]


async def test_a_queue_full_past_its_timeout_spills_the_batch(
    virtual_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger, open=False)
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**5)
    async with pipeline_of(
        records(batch_size=3), 30.0, sink, journal=journal, spill_after=2.0
    ) as pipeline:
        for n in range(3):
            await pipeline.intake.submit(hit(n))
        await trio.sleep(1.7)
        assert (ledger.spilled, pipeline.held) == (0, 3)  # still waiting for room
        await trio.sleep(1.0)
        assert (ledger.spilled, pipeline.held) == (3, 0)
        # The queue is known to be full: the next batch is spilled without waiting.
        for n in range(3, 6):
            await pipeline.intake.submit(hit(n))
        await trio.sleep(0.5)
        assert (ledger.spilled, pipeline.held) == (6, 0)
        assert_identity(ledger, pipeline)
        sink.open.set()  # room again: batches go to Kafka
        await pipeline.intake.submit(hit(6))
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(received=7, spilled=6, delivered=1)
    assert journaled(journal) == [b"id-%04d" % n for n in range(6)]
    assert sink.values == [b"id-0006"]


async def test_when_full_spill_journals_the_overflow_and_drops_past_the_cap(
    virtual_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger, open=False)
    # Room for two overflow records on disk (a frame here is 12+18+4+7 = 41 bytes).
    journal = Journal(tmp_path, max_bytes=90, segment_bytes=90)
    async with pipeline_of(
        records(queue_size=2, batch_size=1, batch_linger=0.01, when_full="spill"),
        5.0,
        sink,
        journal=journal,
    ) as pipeline:
        outcomes = await _fill(pipeline, 6)
        # 1 with the worker, 2 in the channel, 1 with the spill writer, 2 in the
        # overflow channel (its capacity); the writer journals 2 of those 3.
        assert outcomes == [Admission.ACCEPTED] * 6 + [Admission.DROPPED]
        await trio.sleep(1)
        assert (ledger.spilled, ledger.dropped) == (2, 2)
        assert_identity(ledger, pipeline)
        sink.open.set()
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(
        received=7, delivered=3, spilled=2, dropped=2
    )
    assert journaled(journal) == [b"id-0003", b"id-0004"]


async def test_a_fatal_producer_error_triggers_a_rebuild(
    virtual_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger)
    async with pipeline_of(records(), 10.0, sink):
        await trio.sleep(1)
        assert sink.rebuilt == 0
        sink.fatal_error = "Fatal error: test"
        await trio.sleep(1)
        assert (sink.rebuilt, sink.fatal_error) == (1, None)


async def test_drain_is_shielded_from_outer_cancellation(
    virtual_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger)
    with trio.CancelScope() as scope:
        async with pipeline_of(records(), 10.0, sink) as pipeline:
            for n in range(30):
                await pipeline.intake.submit(hit(n))
            scope.cancel()
            await trio.sleep(1)
    assert ledger.delivered == 30
    assert pipeline.in_flight() == 0


async def test_a_hit_that_cannot_be_encoded_is_counted_failed(
    virtual_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger)

    def encode_or_fail(h: Hit) -> Encoded:
        if h.id == "id-0003":
            raise ValueError("unencodable")
        return encode(h)

    async with pipeline_of(records(), 10.0, sink, encode_or_fail) as pipeline:
        for n in range(6):
            await pipeline.intake.submit(hit(n))
    assert sink.values == [f"id-{n:04d}".encode() for n in (0, 1, 2, 4, 5)]
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(received=6, delivered=5, failed=1)


async def test_an_excluded_hit_is_counted_excluded_not_shipped(
    virtual_clock: trio.testing.MockClock,
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger)

    def encode_or_exclude(h: Hit) -> Encoded | None:
        return None if h.id == "id-0001" else encode(h)

    async with pipeline_of(records(), 10.0, sink, encode_or_exclude) as pipeline:
        for n in range(3):
            await pipeline.intake.submit(hit(n))
    assert sink.values == [b"id-0000", b"id-0002"]
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(received=3, delivered=2, excluded=1)


# --- records.durability = "journal": answered once written ahead ---


def journal_values(directory: Path) -> set[bytes]:
    """Every record value in the journal's segment files, sealed or not."""
    return {
        record.value
        for path in sorted(directory.glob("segment-*.log"))
        for record in read_segment(path).records
    }


async def test_under_journal_each_answer_waits_for_its_batch_written_in_one_write(
    virtual_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger)
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**5)
    writes: list[int] = []
    write_ahead = journal.write_ahead

    def counted(batch: Sequence[Encoded]) -> tuple[Path | None, int]:
        writes.append(len(batch))
        return write_ahead(batch)

    journal.write_ahead = counted  # type: ignore[method-assign]
    answered: list[int] = []
    async with pipeline_of(records(durability="journal"), 10.0, sink, journal=journal) as pipeline:

        async def request(n: int) -> None:
            assert await pipeline.intake.submit(hit(n)) is Admission.ACCEPTED
            assert b"id-%04d" % n in journal_values(tmp_path)  # on disk before the answer
            answered.append(n)

        async with trio.open_nursery() as nursery:
            for n in range(25):
                nursery.start_soon(request, n)
    # One write per batch (batch_size 10), shared by the requests waiting on it;
    # no linger: a batch closes when the channel is empty.
    assert (writes, sorted(answered)) == ([10, 10, 5], list(range(25)))
    assert sorted(sink.values) == [b"id-%04d" % n for n in range(25)]
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(
        received=25, delivered=25, journaled=25
    )


@pytest.mark.parametrize(
    ("policy", "answer", "field"),
    [("shed", Admission.SHED, "shed"), ("drop", Admission.DROPPED, "dropped")],
)
async def test_under_journal_a_full_journal_answers_by_when_full_and_records_nothing(
    virtual_clock: trio.testing.MockClock,
    tmp_path: Path,
    policy: str,
    answer: Admission,
    field: str,
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger)
    # Room for two records (a frame here is 12+18+4+7 = 41 bytes).
    journal = Journal(tmp_path, max_bytes=90, segment_bytes=90)
    outcomes: dict[int, Admission] = {}
    async with pipeline_of(
        records(durability="journal", when_full=policy), 10.0, sink, journal=journal
    ) as pipeline:

        async def request(n: int) -> None:
            outcomes[n] = await pipeline.intake.submit(hit(n))

        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(request, n)
    accepted = sorted(n for n, outcome in outcomes.items() if outcome is Admission.ACCEPTED)
    assert sorted(outcomes.values(), key=str) == sorted(
        [Admission.ACCEPTED] * 2 + [answer] * 3, key=str
    )
    assert sorted(sink.values) == [b"id-%04d" % n for n in accepted]
    assert journal_values(tmp_path) == set(sink.values)
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(
        received=5, delivered=2, journaled=2, **{field: 3}
    )


async def test_under_journal_an_unwritable_journal_claims_no_durability(
    virtual_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger()
    sink = MemorySink(ledger)
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**5)

    def refuse(batch: Sequence[Encoded]) -> tuple[Path | None, int]:
        raise PartialWrite(0, OSError(28, "No space left on device"))

    journal.write_ahead = refuse  # type: ignore[method-assign]
    async with pipeline_of(
        records(durability="journal", when_full="shed"), 10.0, sink, journal=journal
    ) as pipeline:
        assert await pipeline.intake.submit(hit(1)) is Admission.SHED
        count, admission = await pipeline.intake.submit_all([hit(2), hit(3)])
        assert (count, admission) == (0, Admission.SHED)
    assert sink.values == []
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(received=3, shed=3)


async def test_under_journal_a_full_kafka_queue_delays_no_answer(
    virtual_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A batch written ahead never waits for room in librdkafka's queue: what
    does not fit stays in the journal, counted spilled, for the replay."""
    ledger = Ledger()
    sink = MemorySink(ledger, open=False)
    journal = Journal(tmp_path, max_bytes=10**6, segment_bytes=10**5)
    async with pipeline_of(
        records(durability="journal"), 10.0, sink, journal=journal, spill_after=1.0
    ) as pipeline:
        started = trio.current_time()
        for n in range(3):
            assert await pipeline.intake.submit(hit(n)) is Admission.ACCEPTED
        assert trio.current_time() == started  # no queue_full_timeout waited out
        await trio.sleep(1)
        assert (ledger.spilled, pipeline.held) == (3, 0)
        assert journal.replayable() != []  # left for the replay, nothing live
    assert sink.values == []
    assert journal_values(tmp_path) == {b"id-%04d" % n for n in range(3)}
    assert ledger.snapshot(pipeline.in_flight()) == snapshot(received=3, spilled=3, journaled=3)
