"""A ``Flight`` (records.durability = "kafka") on its own: each way a record
can end, what its hit is told, and what the ledger counts, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from redirect_logger.commit import Commit
from redirect_logger.durable import Flight, Unrecorded
from redirect_logger.hits import Encoded, Hit
from redirect_logger.ledger import OUTCOMES, Ledger
from redirect_logger.spill import Journal, Spill, read_segment


class Message:
    """What a delivery report hands over, as far as a flight reads it."""

    def __init__(self, record: Encoded) -> None:
        self._value = record.value

    def value(self) -> bytes:
        return self._value

    def latency(self) -> float:
        return 0.001


def hits(count: int, commit: Commit) -> list[Hit]:
    return [
        Hit(f"id-{n}", 0.0, "GET", "http", "/", b"", [], None, 302, "https://t/", "r", None, commit)
        for n in range(count)
    ]


def records(of: list[Hit]) -> list[Encoded]:
    return [Encoded("hits", None, b'{"v":2,"id":"%s"}' % h.id.encode(), 0, []) for h in of]


def on_disk(directory: Path) -> list[bytes]:
    """The record values in a journal directory's segments, sealed or not."""
    return [
        r.value for p in sorted(directory.glob("segment-*.log")) for r in read_segment(p).records
    ]


def counts(ledger: Ledger) -> dict[str, int]:
    return {o: getattr(ledger, o) for o in OUTCOMES if getattr(ledger, o)}


class Setup:
    def __init__(self, tmp_path: Path, count: int, *, when_full: str = "shed", **journal: int):
        self.ledger = Ledger()
        self.journal = Journal(
            tmp_path,
            max_bytes=journal.get("max_bytes", 10**6),
            segment_bytes=journal.get("segment_bytes", 10**6),
        )
        self.unrecorded = Unrecorded(self.ledger, when_full)
        self.commit = Commit()
        self.hits = hits(count, self.commit)
        self.commit.join(count)
        self.commit.close()
        self.records = records(self.hits)
        self.flight = Flight(
            self.hits,
            self.records,
            trio.current_time() + 2.0,
            Spill(self.journal, self.ledger),
            self.ledger,
            self.unrecorded,
        )

    async def answered(self) -> set[str]:
        """The ids of the hits answered as durable, once the flight is done."""
        with trio.fail_after(1):
            await self.flight.done.wait()
            await self.commit.wait()
        return {h.id for h in self.hits} - set(+self.commit.undurable)

    def journaled(self) -> list[bytes]:
        return [r.value for p in self.journal.seal() for r in read_segment(p).records]


async def test_acknowledged_records_answer_their_hits(tmp_path: Path) -> None:
    setup = Setup(tmp_path, 3)
    for record in setup.records:
        setup.flight.delivered(Message(record))  # type: ignore[arg-type]
    assert await setup.answered() == {"id-0", "id-1", "id-2"}
    assert counts(setup.ledger) == {"delivered": 3}
    assert setup.journaled() == []


async def test_a_failed_delivery_is_spilled_and_answered_a_refused_one_is_not(
    tmp_path: Path,
) -> None:
    setup = Setup(tmp_path, 3)
    setup.flight.delivered(Message(setup.records[0]))  # type: ignore[arg-type]
    setup.flight.undelivered([setup.records[1]], "delivery failed: timed out")
    setup.flight.refused([setup.records[2]])
    assert await setup.answered() == {"id-0", "id-1"}
    assert setup.commit.undurable == {"id-2": 1}
    assert counts(setup.ledger) == {"delivered": 1, "spilled": 1, "failed": 1}
    assert setup.journaled() == [setup.records[1].value]


async def test_at_ack_timeout_the_rest_is_written_ahead_and_settled_by_later_reports(
    tmp_path: Path,
) -> None:
    setup = Setup(tmp_path, 4)
    setup.flight.delivered(Message(setup.records[0]))  # type: ignore[arg-type]
    setup.flight.journal_rest()
    assert await setup.answered() == {"id-0", "id-1", "id-2", "id-3"}
    assert counts(setup.ledger) == {"delivered": 1, "journaled": 3}
    [segment] = setup.journal.seal()
    assert [r.value for r in read_segment(segment).records] == [r.value for r in setup.records[1:]]
    setup.flight.delivered(Message(setup.records[1]))  # type: ignore[arg-type]
    setup.flight.refused([setup.records[2]])  # refused for good: not to be replayed
    setup.flight.undelivered([setup.records[3]], "delivery failed: timed out")  # left there
    setup.journal.flush_marks()
    assert setup.journal.settled_ids(segment) == {b"id-1", b"id-2"}
    assert setup.journal.replayable() == [segment]  # id-3 waits for a replay
    assert counts(setup.ledger) == {"delivered": 2, "journaled": 3, "failed": 1, "spilled": 1}


async def test_records_of_one_id_are_each_settled(tmp_path: Path) -> None:
    """Client-made ids (collect.id_field) may repeat: three records of one
    id, one delivered, one failed (spilled), one refused; then two more
    written ahead at ack_timeout. Each is counted once, and two of the three
    hits of that id are answered as durable."""
    setup = Setup(tmp_path, 5)
    same = [h._replace(id="same") for h in setup.hits[:3]]
    setup.hits[:3] = same
    setup.records[:3] = records(same)
    setup.flight = Flight(
        setup.hits,
        setup.records,
        trio.current_time() + 2.0,
        Spill(setup.journal, setup.ledger),
        setup.ledger,
        setup.unrecorded,
    )
    setup.flight.delivered(Message(setup.records[0]))  # type: ignore[arg-type]
    setup.flight.undelivered([setup.records[1]], "delivery failed: timed out")
    setup.flight.refused([setup.records[2]])
    assert not setup.flight.done.is_set()  # id-3 and id-4 still wait
    setup.flight.journal_rest()
    with trio.fail_after(1):
        await setup.flight.done.wait()
        await setup.commit.wait()
    assert setup.commit.undurable == {"same": 1}
    assert counts(setup.ledger) == {"delivered": 1, "spilled": 1, "failed": 1, "journaled": 2}
    assert [r.value for p in setup.journal.seal() for r in read_segment(p).records] == [
        setup.records[1].value,
        setup.records[3].value,
        setup.records[4].value,
    ]


@pytest.mark.parametrize(("when_full", "field"), [("shed", "shed"), ("drop", "dropped")])
async def test_records_the_journal_cannot_take_are_given_up_and_counted_once(
    tmp_path: Path, when_full: str, field: str
) -> None:
    # Room for one record: the second and third are given up.
    setup = Setup(tmp_path, 3, when_full=when_full, max_bytes=60, segment_bytes=60)
    setup.flight.journal_rest()
    assert await setup.answered() == {"id-0"}
    assert on_disk(tmp_path) == [setup.records[0].value]
    assert counts(setup.ledger) == {"journaled": 1, field: 2}
    assert setup.unrecorded.given_up == 2  # still in librdkafka: out of in_flight
    assert setup.journal.replayable() == []  # live: not for the replay
    # Their reports come later: whatever they say, they are counted already.
    setup.flight.delivered(Message(setup.records[1]))  # type: ignore[arg-type]
    setup.flight.undelivered([setup.records[2]], "delivery failed: purged")
    setup.flight.delivered(Message(setup.records[0]))  # type: ignore[arg-type]
    assert setup.unrecorded.given_up == 0
    assert counts(setup.ledger) == {"journaled": 1, field: 2, "delivered": 1}
    assert setup.journaled() == []  # its one record settled: the segment is gone
