"""``redirect-logger replay``: journals left by stopped processes, delivered with progress."""

from __future__ import annotations

import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import orjson
import pytest
import trio
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient, NewTopic

from brokers import Broker
from redirect_logger import replay as replay_module
from redirect_logger.config import parse_settings
from redirect_logger.hits import Encoded
from redirect_logger.ledger import Ledger
from redirect_logger.replay import Replayer
from redirect_logger.spill import Journal, read_segment
from support import (
    ROOT,
    UNREACHABLE,
    Read,
    ledger_counts,
    read_messages,
    read_topic,
    service_config,
    start_service,
    unique_topic,
    v1_frame,
    write_config,
)

OPTIONS = {"max_bytes": 10**7, "segment_bytes": 4_000}


HEADERS = [
    [("schema-version", b"1"), ("kind", b"redirect"), ("rule", b"home")],
    [("schema-version", b"1"), ("kind", b"miss"), ("rule", b"")],
    [("schema-version", b"1"), ("kind", b"event"), ("rule", b"c\xc3\xa9")],
]


def journal_records(topic: str, count: int) -> list[Encoded]:
    return [
        Encoded(
            topic,
            b"k%d" % n if n % 2 else None,
            orjson.dumps({"id": str(uuid.uuid4()), "n": n}),
            1_700_000_000_000 + n,
            HEADERS[n % 3],
        )
        for n in range(count)
    ]


def ids(records: list[Encoded]) -> set[str]:
    return {orjson.loads(record.value)["id"] for record in records}


def by_id(messages: list[Encoded] | list[Read]) -> dict[str, tuple[object, ...]]:
    """Each message's key, timestamp and headers, by its record's id."""
    found: dict[str, tuple[object, ...]] = {}
    for message in messages:
        record = orjson.loads(message.value) if isinstance(message, Encoded) else message.record
        found[record["id"]] = (message.key, message.timestamp_ms, message.headers)
    return found


def replay(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "redirect_logger.cli", "replay", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


async def test_replay_delivers_unheld_slots_sets_a_torn_tail_aside_and_skips_held_ones(
    broker: Broker, tmp_path: Path
) -> None:
    topic = unique_topic()
    spill = tmp_path / "spill"
    # slot-0: held by a running process (this one), left alone.
    held = Journal.claim_slot(spill, **OPTIONS)
    held.append(journal_records(topic, 5))
    # slot-1: a stopped process's journal, several segments.
    first = journal_records(topic, 120)
    stopped = Journal(spill / "slot-1", **OPTIONS)
    stopped.append(first)
    stopped.close()
    # slot-2: another, whose last segment has a torn tail (its last record cut short).
    second = journal_records(topic, 30)
    torn = Journal(spill / "slot-2", **OPTIONS)
    torn.append(second)
    [*_, last] = torn.seal()
    torn.close()
    last.write_bytes(last.read_bytes()[:-5])
    config = write_config(
        tmp_path / "c.toml",
        service_config(broker.bootstrap, topic, spill={"directory": str(spill)}),
    )
    try:
        result = await trio.to_thread.run_sync(replay, config)
    finally:
        held.close()
    assert result.returncode == 0, result.stderr  # nothing left that it could replay
    assert f"{spill / 'slot-0'}: in use by a running service" in result.stderr
    assert "replay: 100%" in result.stderr  # the progress bar reached its end
    assert "replayed 149 records; 0 still journaled" in result.stderr
    assert "torn or corrupt tail" in result.stderr
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(broker.bootstrap, topic, expected=149)
    )
    assert len(messages) == 149
    assert by_id(messages) == by_id(first + second[:-1])  # keys, timestamps, headers kept
    assert len(list((spill / "slot-0").glob("segment-*.log"))) == 1
    assert not list((spill / "slot-1").glob("segment-*"))
    assert [p.name for p in (spill / "slot-2").glob("segment-*")] == [last.name + ".corrupt"]


async def test_replay_skips_the_records_marked_acknowledged(broker: Broker, tmp_path: Path) -> None:
    """A segment's .acked marks (written as Kafka acknowledges records, by the
    live producer or a replay) keep those records from being sent again."""
    topic = unique_topic()
    spill = tmp_path / "spill"
    records = journal_records(topic, 10)
    journal = Journal(spill / "slot-0", **OPTIONS)
    journal.append(records)
    [segment] = journal.seal()
    acknowledged = [orjson.loads(r.value)["id"].encode() for r in records[:4]]
    journal.settle(segment, acknowledged, live=False)
    journal.close()
    assert segment.with_suffix(".acked").read_bytes() == b"".join(i + b"\n" for i in acknowledged)
    config = write_config(
        tmp_path / "c.toml",
        service_config(broker.bootstrap, topic, spill={"directory": str(spill)}),
    )
    result = await trio.to_thread.run_sync(replay, config)
    assert result.returncode == 0, result.stderr
    assert "replayed 6 records; 0 still journaled" in result.stderr
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(broker.bootstrap, topic, expected=6)
    )
    assert by_id(messages) == by_id(records[4:])
    assert not list((spill / "slot-0").glob("segment-*"))  # the segment and its marks


async def test_replay_without_a_broker_keeps_every_record(tmp_path: Path) -> None:
    topic = unique_topic()
    spill = tmp_path / "spill"
    journal = Journal.claim_slot(spill, **OPTIONS)
    journal.append(journal_records(topic, 10))
    journal.close()
    before = sorted(p.read_bytes() for p in spill.rglob("segment-*"))
    config = write_config(
        tmp_path / "c.toml", service_config(UNREACHABLE, topic, spill={"directory": str(spill)})
    )
    result = await trio.to_thread.run_sync(replay, config, "--timeout", "2")
    assert result.returncode == 1
    assert "no Kafka broker reachable within 2.0 s; 10 records stay journaled" in result.stderr
    assert sorted(p.read_bytes() for p in spill.rglob("segment-*")) == before


async def test_replay_with_nothing_journaled_says_so(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "c.toml",
        service_config(UNREACHABLE, unique_topic(), spill={"directory": str(tmp_path / "s")}),
    )
    result = await trio.to_thread.run_sync(replay, config)
    assert (result.returncode, result.stderr) == (0, f"nothing to replay in {tmp_path / 's'}\n")


async def test_the_idle_replayer_serves_its_producers_statistics_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing but the replayer polls the replay producer. While it has
    nothing to replay, librdkafka queues a statistics document (some 10 kB)
    every ``statistics.interval.ms``, and the errors, until something polls:
    unserved, they grew the service's memory by about 0.4 MiB a minute."""
    monkeypatch.setattr(replay_module, "_IDLE", 0.05)  # it looks every 50 ms, not every second
    config = service_config(
        UNREACHABLE,
        unique_topic(),
        kafka={"statistics.interval.ms": 50},
        spill={"directory": str(tmp_path / "spill")},
    )
    settings = parse_settings(config)
    replayer = Replayer(settings.kafka, settings.spill, Ledger(), None)
    with trio.move_on_after(2.0):
        await replayer.run(lambda: False)  # no broker: nothing is replayed
    # len(): what librdkafka holds for this producer, events waiting for a poll
    # included. Unserved, 2 s of statistics alone would be 40.
    assert len(replayer.sink._producer) < 10


async def test_a_record_kafka_refuses_for_good_is_set_aside_not_retried(
    broker: Broker, tmp_path: Path
) -> None:
    topic = unique_topic()
    spill = tmp_path / "spill"
    good = journal_records(topic, 3)
    value = b'{"id": "huge", "pad": "' + b"x" * 1_100_000 + b'"}'
    huge = Encoded(topic, None, value, 0, HEADERS[0])
    journal = Journal(spill / "slot-0", max_bytes=10**7, segment_bytes=4 * 10**6)
    journal.append([good[0], huge, *good[1:]])
    journal.close()
    config = write_config(
        tmp_path / "c.toml",
        service_config(broker.bootstrap, topic, spill={"directory": str(spill)}),
    )
    result = await trio.to_thread.run_sync(replay, config)
    assert result.returncode == 0, result.stderr
    assert "Kafka refused 1 records for good" in result.stderr
    records = await trio.to_thread.run_sync(lambda: read_topic(broker.bootstrap, topic, expected=3))
    assert sorted(r["id"] for r in records) == sorted(ids(good))
    assert not list(spill.rglob("segment-*"))
    assert read_segment(spill / "slot-0" / "rejected.log").records == [huge]


async def test_an_unusable_slot_is_skipped_and_never_stops_the_service(
    broker: Broker, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    (spill / "slot-7" / "lock").mkdir(parents=True)  # its lock cannot be opened
    topic = unique_topic()
    config = service_config(broker.bootstrap, topic, spill={"directory": str(spill)})
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                for _ in range(3):  # the replayer looks every second once Kafka is reachable
                    assert (await client.get("/")).status_code == 302
                    await trio.sleep(1.0)
            stop.set()
    assert codes == [0]
    assert service.ledger_snapshot()["delivered"] == 3


async def test_a_journal_written_before_headers_is_replayed_with_the_headers_of_its_records(
    broker: Broker, tmp_path: Path
) -> None:
    """Format-1 segments (no headers in the frame) are still replayed; each
    message gets the headers its record implies."""
    topic = unique_topic()
    values = [
        {"v": 1, "id": "a", "kind": "redirect", "rule": "home", "location": "https://t/"},
        {"v": 1, "id": "b", "kind": "miss", "rule": None, "location": None},
        {"v": 1, "id": "c", "rule": "docs", "location": "https://d/"},  # before "kind"
        {"id": "d", "n": 4},  # not a record: no headers
    ]
    slot = tmp_path / "spill" / "slot-0"
    slot.mkdir(parents=True)
    (slot / "segment-00000000000000000000.log").write_bytes(
        b"".join(
            v1_frame(topic, None if n % 2 else b"k", orjson.dumps(value), 1_700_000_000_000 + n)
            for n, value in enumerate(values)
        )
    )
    config = write_config(
        tmp_path / "c.toml",
        service_config(broker.bootstrap, topic, spill={"directory": str(tmp_path / "spill")}),
    )
    result = await trio.to_thread.run_sync(replay, config)
    assert result.returncode == 0, result.stderr
    assert "replayed 4 records; 0 still journaled" in result.stderr
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(broker.bootstrap, topic, expected=4)
    )
    assert by_id(messages) == {
        "a": (b"k", 1_700_000_000_000, HEADERS[0]),
        "b": (None, 1_700_000_000_001, HEADERS[1]),
        "c": (
            b"k",
            1_700_000_000_002,
            [("schema-version", b"1"), ("kind", b"redirect"), ("rule", b"docs")],
        ),
        "d": (None, 1_700_000_000_003, []),
    }
    assert not list(slot.glob("segment-*"))


async def test_records_the_service_journaled_are_replayed_with_their_headers(
    broker: Broker, tmp_path: Path
) -> None:
    """Live hits while Kafka is unreachable: their delivery reports (which
    carry no headers) journal them; the replay sends them with the headers a
    live message has."""
    topic = unique_topic()
    spill = {"directory": str(tmp_path / "spill")}
    down = service_config(UNREACHABLE, topic, shutdown={"flush_timeout": 1.0}, spill=spill)
    sent: dict[str, str] = {}
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, down, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                for target in ["/", "/docs/a", "/missing"] * 2:
                    sent[(await client.get(target)).headers["x-hit-id"]] = target
            stop.set()
    assert codes == [0]
    assert service.ledger_snapshot() == ledger_counts(received=6, spilled=6)
    journal = service.spill.journal
    assert journal is not None
    journaled = [r for path in journal.seal() for r in read_segment(path).records]
    config = write_config(tmp_path / "c.toml", service_config(broker.bootstrap, topic, spill=spill))
    result = await trio.to_thread.run_sync(replay, config)
    assert result.returncode == 0, result.stderr
    assert "replayed 6 records; 0 still journaled" in result.stderr
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(broker.bootstrap, topic, expected=6)
    )
    assert by_id(messages) == by_id(journaled)  # as journaled: key, timestamp, headers
    rule = {"/": b"home", "/docs/a": b"docs", "/missing": b""}
    assert {read.record["id"]: read.headers for read in messages} == {
        hit_id: [
            ("schema-version", b"3"),
            ("kind", b"miss" if target == "/missing" else b"redirect"),
            ("rule", rule[target]),
        ]
        for hit_id, target in sent.items()
    }
    assert {read.key for read in messages} == {b"127.0.0.1"}
    # Failed delivery reports carry no timestamp (-1): the request time is restored.
    for read in messages:
        stamp = datetime.fromisoformat(read.record["ts"]).timestamp()
        assert read.timestamp_ms == round(stamp * 1000) > 1_700_000_000_000


async def test_replay_keeps_a_segment_it_cannot_deliver_and_goes_on_with_the_next(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """A segment whose topic does not exist is kept whole (exit 1, ``segment
    kept``); the replay does not stop there: the newer segment after it is
    delivered and deleted (docs/durability.md#by-hand-redirect-logger-replay)."""
    missing, topic = unique_topic("missing"), unique_topic()
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap, "log_level": 0})
    created = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    await trio.to_thread.run_sync(lambda: created[topic].result(30))
    spill = tmp_path / "spill"
    stuck, later = journal_records(missing, 10), journal_records(topic, 10)
    journal = Journal(spill / "slot-0", **OPTIONS)
    journal.append(stuck)
    [kept] = journal.seal()
    journal.append(later)
    journal.close()
    data = service_config(
        kafka_broker.bootstrap,
        topic,
        spill={"directory": str(spill)},
        # The test broker auto-creates topics; a producer asks it to by default.
        kafka={"allow.auto.create.topics": False, "topic.metadata.propagation.max.ms": 1000},
    )
    config = write_config(tmp_path / "c.toml", data)
    result = await trio.to_thread.run_sync(replay, config)
    assert result.returncode == 1, result.stderr  # records remain journaled
    assert f"replay of {kept}: 10 of 10 records not delivered" in result.stderr
    assert "segment kept" in result.stderr
    assert "replayed 10 records; 10 still journaled" in result.stderr
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(kafka_broker.bootstrap, topic, expected=10)
    )
    assert by_id(messages) == by_id(later)
    assert [p.name for p in (spill / "slot-0").glob("segment-*.log")] == [kept.name]
    assert ids(read_segment(kept).records) == ids(stuck)


async def test_a_fatal_error_of_the_replay_producer_rebuilds_it_and_keeps_the_segment(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """librdkafka's fatal errors cannot be provoked from a client, so the replay
    producer's error callback is handed one, as librdkafka would, right after
    the first chunk of the older segment is produced: that segment is kept
    (what was acknowledged before is marked, and not produced again), the
    producer is rebuilt once, the replay goes on with the next segment, and
    the next replay finishes the kept one. Every record is in Kafka, and none
    is left journaled (docs/durability.md#replay)."""
    topic = unique_topic()
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap, "log_level": 0})
    created = admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    await trio.to_thread.run_sync(lambda: created[topic].result(30))
    spill = tmp_path / "spill"
    older, newer = journal_records(topic, 40), journal_records(topic, 40)
    journal = Journal(spill / "slot-0", max_bytes=10**7, segment_bytes=10**6)
    journal.append(older)
    [kept] = journal.seal()
    journal.append(newer)
    journal.close()
    settings = parse_settings(
        service_config(kafka_broker.bootstrap, topic, spill={"directory": str(spill)})
    )
    ledger = Ledger()
    replayer = Replayer(settings.kafka, settings.spill, ledger, None)
    sink = replayer.sink
    produce_batch = sink.produce_batch
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(replay_module, "_CHUNK", 10)  # four chunks a segment

    def fail_after_the_first_chunk(batch: list[Encoded], window: float, tag: object = None) -> int:
        taken = produce_batch(batch, window, tag)
        if sink.rebuilds == 0 and sink.fatal_error is None:
            sink._on_error(KafkaError(KafkaError._FATAL, "injected", fatal=True))
        return taken

    monkeypatch.setattr(sink, "produce_batch", fail_after_the_first_chunk)
    try:
        assert await trio.to_thread.run_sync(replayer.wait_reachable, 30.0)
        assert not await trio.to_thread.run_sync(replayer.replay_all)  # the older one is kept
        assert (sink.rebuilds, sink.fatal_error) == (1, None)
        assert [p.name for p in (spill / "slot-0").glob("segment-*.log")] == [kept.name]
        assert await trio.to_thread.run_sync(replayer.replay_all)
    finally:
        monkeypatch.undo()
    assert list((spill / "slot-0").glob("segment-*.log")) == []
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(kafka_broker.bootstrap, topic, expected=80)
    )
    assert by_id(messages) == by_id(older + newer)  # every record, at least once
    assert sink.rebuilds == 1
    assert ledger.replayed == len(messages)  # each delivery counted once
