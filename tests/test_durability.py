"""``records.durability`` under SIGKILL, a failing disk and a broker outage.

Each test drives the real service (the CLI or ``hypercorn``) against Apache
Kafka, kills it under load, starts it again on the same config, and checks
by record id that every answered hit reached the topic (``journal``,
``kafka``), or that what was lost stays within the documented bound
(``memory``). librdkafka's ``linger.ms`` is 200 ms here, so that a kill
always finds records Kafka has not acknowledged yet.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from confluent_kafka.admin import AdminClient

from brokers import Broker, KafkaBroker
from redirect_logger.spill import read_segment
from support import (
    BIND_RE,
    LOAD_CLIENTS,
    ServiceProcess,
    read_topic,
    redirects,
    report_ids,
    service_config,
    topic_ids,
    unique_topic,
    until_loaded,
    until_replayed,
    wait_ready,
    write_config,
)

pytestmark = pytest.mark.faults

LINGER_MS = 200
QUEUE_SIZE = 2_000
KAFKA_QUEUE = 5_000  # queue.buffering.max.messages
BATCH_SIZE = 200


def _config(bootstrap: str, topic: str, tmp_path: Path, durability: str, **tables: Any) -> Path:
    base: dict[str, Any] = {
        "records": {
            "durability": durability,
            "queue_size": QUEUE_SIZE,
            "batch_size": BATCH_SIZE,
        },
        "kafka": {"linger.ms": LINGER_MS, "queue.buffering.max.messages": KAFKA_QUEUE},
        "spill": {"directory": str(tmp_path / "spill")},
    }
    for table, body in tables.items():
        base[table] = {**base.get(table, {}), **body}
    return write_config(tmp_path / "c.toml", service_config(bootstrap, topic, **base))


async def _kill_under_load(
    service: ServiceProcess, urls: list[str], answered: dict[str, float], seconds: float = 3.0
) -> None:
    for url in urls:
        await wait_ready(url)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(redirects, urls, answered)
        await trio.sleep(seconds)
        await until_loaded(lambda: len(answered))
        # Kill while answers are flowing (5 in the last 50 ms), so that some
        # records are in memory (librdkafka lingers 200 ms): a busy machine
        # can stall the load for a second.
        with trio.fail_after(30):
            while True:
                before = len(answered)
                await trio.sleep(0.05)
                if len(answered) - before >= 5:
                    break
        service.kill_group()


async def _killed_under_load(config: Path) -> dict[str, float]:
    """``serve`` on ``config``, SIGKILLed after 3 s of load: the answered ids."""
    service = ServiceProcess.cli(config)
    answered: dict[str, float] = {}
    try:
        url = await trio.to_thread.run_sync(service.url)
        await _kill_under_load(service, [url], answered)
    finally:
        service.kill_group()
    assert not service.ledgers()  # killed: no ledger line
    return answered


async def _restart_and_check(
    launch: Any,
    broker: Broker,
    topic: str,
    answered: dict[str, float],
    processes: int,
    name: str,
    spill: Path,
) -> tuple[int, list[dict[str, int]]]:
    """Start the service again on the same config; once the topic holds every
    answered id and the replay has emptied the journal, stop it. Returns the
    duplicates in the topic then, and the ledgers."""
    again: ServiceProcess = launch()
    try:
        await trio.to_thread.run_sync(lambda: again.wait_for(BIND_RE, processes, 60))
        await trio.to_thread.run_sync(topic_ids, broker.bootstrap, topic, set(answered))
        await trio.to_thread.run_sync(until_replayed, spill)
        code = await trio.to_thread.run_sync(again.terminate)
    finally:
        again.kill_group()
    ids = await trio.to_thread.run_sync(topic_ids, broker.bootstrap, topic, set(answered))
    missing, duplicates = report_ids(name, answered, ids)
    assert missing == 0
    assert code == 0, again.output
    ledgers = again.ledgers()
    assert len(ledgers) == processes, again.output
    print("after the restart:", ledgers)
    for ledger in ledgers:
        assert ledger["failed"] == ledger["in_flight"] == 0, ledger
    return duplicates, ledgers


def _journal_emptied(tmp_path: Path) -> None:
    left = sorted((tmp_path / "spill").glob("slot-*/segment-*.log"))
    assert not left, f"segments left after a clean stop: {left}"


@pytest.mark.parametrize(
    ("durability", "ack_timeout", "linger_ms"),
    [
        ("journal", 2.0, LINGER_MS),
        ("kafka", 2.0, LINGER_MS),  # answered on Kafka's acknowledgement
        # answered once journaled at ack_timeout, most of a second before the acknowledgement
        ("kafka", 0.1, 1000),
    ],
)
async def test_sigkill_under_load_loses_no_answered_hit(
    kafka_broker: Broker, tmp_path: Path, durability: str, ack_timeout: float, linger_ms: int
) -> None:
    topic = unique_topic()
    config = _config(
        kafka_broker.bootstrap,
        topic,
        tmp_path,
        durability,
        records={"ack_timeout": ack_timeout},
        kafka={"linger.ms": linger_ms},
    )
    answered = await _killed_under_load(config)
    name = f"{durability}, ack_timeout {ack_timeout}"
    duplicates, [ledger] = await _restart_and_check(
        lambda: ServiceProcess.cli(config),
        kafka_broker,
        topic,
        answered,
        1,
        name,
        tmp_path / "spill",
    )
    if durability == "journal" or ack_timeout < linger_ms / 1000:
        assert ledger["replayed"] > 0, ledger  # answered before Kafka acknowledged them
    assert duplicates <= KAFKA_QUEUE
    _journal_emptied(tmp_path)


async def test_sigkill_under_memory_loses_at_most_what_memory_held(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """The loss durability "journal" and "kafka" prevent: under "memory" a kill
    loses what the channel, the batches and librdkafka's queue held."""
    topic = unique_topic()
    config = _config(kafka_broker.bootstrap, topic, tmp_path, "memory")
    answered = await _killed_under_load(config)
    await trio.sleep(2 * LINGER_MS / 1000)
    bootstrap = kafka_broker.bootstrap
    ids = await trio.to_thread.run_sync(lambda: topic_ids(bootstrap, topic, set(answered), 5.0))
    missing, duplicates = report_ids("memory", answered, ids)
    bound = QUEUE_SIZE + 2 * BATCH_SIZE + KAFKA_QUEUE  # docs/durability.md#durability
    assert 0 < missing <= bound
    assert duplicates == 0


@pytest.mark.parametrize("kill", ["group", "one worker"])
async def test_hypercorn_workers_sigkilled_under_journal_lose_no_answered_hit(
    kafka_broker: Broker, tmp_path: Path, kill: str
) -> None:
    """SIGKILL of the whole process group, or of one worker (Hypercorn's
    master then stops the other, which drains): the next start replays the
    killed workers' journal slots."""
    topic = unique_topic()
    config = _config(kafka_broker.bootstrap, topic, tmp_path, "journal")
    first = ServiceProcess.hypercorn(config, 2)
    answered: dict[str, float] = {}
    try:
        urls = await trio.to_thread.run_sync(lambda: first.wait_for(BIND_RE, 2, 60))
        await wait_ready(urls[0])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(redirects, urls, answered)
            await trio.sleep(3.0)
            await until_loaded(lambda: len(answered))
            if kill == "group":
                first.kill_group()
            else:
                workers = first.workers()
                assert len(workers) == 2, workers
                os.kill(workers[0], signal.SIGKILL)
                await trio.to_thread.run_sync(first.wait, 60.0)
    finally:
        first.kill_group()
    if kill == "one worker":  # the other drained in order
        assert len(first.ledgers()) == 1, first.output
    await _restart_and_check(
        lambda: ServiceProcess.hypercorn(config, 2),
        kafka_broker,
        topic,
        answered,
        2,
        kill,
        tmp_path / "spill",
    )
    _journal_emptied(tmp_path)


async def _collect_load(
    url: str, accepted: set[str], statuses: Counter[int], seconds: float = 60.0
) -> None:
    """LOAD_CLIENTS clients post batches of 5 events, each with its own ``n``;
    the ``n`` of every event a 202 accepted is kept."""

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while trio.current_time() < end:
                ns = [uuid.uuid4().hex for _ in range(5)]
                body = b"\n".join(orjson.dumps({"n": n}) for n in ns)
                try:
                    response = await http.post(
                        "/collect", content=body, headers={"content-type": "application/x-ndjson"}
                    )
                except httpx.TransportError:
                    return
                statuses[response.status_code] += 1
                assert response.status_code == 202, response.text
                assert response.json() == {"accepted": 5}
                accepted.update(ns)

    end = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for _ in range(LOAD_CLIENTS):
            nursery.start_soon(client)


@pytest.mark.parametrize("durability", ["journal", "kafka"])
async def test_collect_under_sigkill_keeps_every_accepted_event(
    kafka_broker: Broker, tmp_path: Path, durability: str
) -> None:
    topic = unique_topic()
    config = _config(kafka_broker.bootstrap, topic, tmp_path, durability, collect={"enabled": True})
    first = ServiceProcess.cli(config)
    accepted: set[str] = set()
    statuses: Counter[int] = Counter()
    try:
        url = await trio.to_thread.run_sync(first.url)
        await wait_ready(url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect_load, url, accepted, statuses)
            await trio.sleep(3.0)
            await until_loaded(lambda: len(accepted))
            first.kill_group()
    finally:
        first.kill_group()
    again = ServiceProcess.cli(config)
    try:
        await trio.to_thread.run_sync(again.url)

        def events() -> list[str]:
            deadline = time.monotonic() + 120
            while True:
                found = [r["data"]["n"] for r in read_topic(kafka_broker.bootstrap, topic)]
                if accepted <= set(found) or time.monotonic() > deadline:
                    return found
                time.sleep(1.0)

        found = await trio.to_thread.run_sync(events)
        code = await trio.to_thread.run_sync(again.terminate)
    finally:
        again.kill_group()
    missing = len(accepted - set(found))
    print(
        f"collect, {durability}: {dict(statuses)}; events accepted {len(accepted)}, in topic"
        f" {len(found)} ({len(set(found))} distinct), missing {missing}"
    )
    assert missing == 0
    assert code == 0, again.output
    _journal_emptied(tmp_path)


async def _serve_for(
    config: Path, seconds: float, max_file_bytes: int | None = None
) -> tuple[ServiceProcess, dict[str, float], Counter[int], int]:
    """Run ``serve`` under load for ``seconds``, then SIGTERM it: the process,
    the answered ids, the statuses seen and the exit code."""
    service = ServiceProcess.cli(config, max_file_bytes=max_file_bytes)
    answered: dict[str, float] = {}
    statuses: Counter[int] = Counter()
    try:
        url = await trio.to_thread.run_sync(service.url)
        await redirects([url], answered, statuses, seconds=seconds)
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill_group()
    return service, answered, statuses, code


def _topic_size(bootstrap: str, topic: str) -> int:
    """Records in the topic; 0 when it was never created."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    if topic not in admin.list_topics(timeout=10).topics:
        return 0
    return len(read_topic(bootstrap, topic))


@pytest.mark.parametrize(("policy", "status"), [("shed", 503), ("drop", 301)])
async def test_an_unwritable_journal_claims_no_durability(
    kafka_broker: Broker, tmp_path: Path, policy: str, status: int
) -> None:
    """Under "journal", with a disk that takes no write (RLIMIT_FSIZE 0:
    every write fails with EFBIG), every answer follows when_full, the ledger
    says exactly what the clients saw, and nothing reaches Kafka."""
    topic = unique_topic()
    config = _config(
        kafka_broker.bootstrap, topic, tmp_path, "journal", records={"when_full": policy}
    )
    service, _, statuses, code = await _serve_for(config, 2.0, max_file_bytes=0)
    print(f"unwritable journal, {policy}: {dict(statuses)}", service.ledgers())
    assert code == 0, service.output
    assert set(statuses) == {status}, statuses
    [ledger] = service.ledgers()
    total = statuses[status]
    field = "shed" if policy == "shed" else "dropped"
    assert ledger["received"] == ledger[field] == total, ledger
    assert ledger["journaled"] == ledger["delivered"] == ledger["failed"] == 0, ledger
    assert "could be neither acknowledged nor journaled" in service.output
    assert await trio.to_thread.run_sync(_topic_size, kafka_broker.bootstrap, topic) == 0


async def test_a_full_journal_sheds_exactly_what_it_cannot_hold(tmp_path: Path) -> None:
    """Under "journal" with no broker reachable, the journal fills up to
    spill.max_bytes: each hit written answers 301, each one after that 503,
    and the ledger matches the clients' count exactly."""
    config = _config(
        "127.0.0.1:9",  # nothing listens: no acknowledgement frees the journal
        unique_topic(),
        tmp_path,
        "journal",
        records={"when_full": "shed"},
        spill={"max_bytes": 1 << 16, "segment_bytes": 1 << 16},
        shutdown={"flush_timeout": 1.0},
    )
    service, answered, statuses, code = await _serve_for(config, 2.0)
    [ledger] = service.ledgers()
    print(f"full journal: {dict(statuses)}", ledger)
    assert code == 0, service.output
    assert set(statuses) == {301, 503} and statuses[301] > 50, statuses
    assert ledger["journaled"] == ledger["spilled"] == statuses[301] == len(answered), ledger
    assert ledger["shed"] == statuses[503], ledger
    assert ledger["received"] == sum(statuses.values()), ledger
    journaled = {
        orjson.loads(record.value)["id"]
        for path in sorted((tmp_path / "spill").glob("slot-*/segment-*.log"))
        for record in read_segment(path).records
    }
    assert journaled == set(answered)


async def test_under_kafka_a_down_broker_delays_no_answer_and_everything_arrives(
    own_kafka: KafkaBroker, tmp_path: Path
) -> None:
    """No request waits ``ack_timeout`` for a broker known to be down: each is
    journaled at once. Once the broker is up, every answered hit arrives."""
    topic = unique_topic()
    config = _config(own_kafka.bootstrap, topic, tmp_path, "kafka", records={"ack_timeout": 3.0})
    service = ServiceProcess.cli(config)
    answered: dict[str, float] = {}
    try:
        url = await trio.to_thread.run_sync(service.url)
        await redirects([url], answered, seconds=3.0)
        assert len(answered) > 50
        assert max(answered.values()) < 1.0, sorted(answered.values())[-5:]
        await trio.to_thread.run_sync(own_kafka.start)
        ids = await trio.to_thread.run_sync(topic_ids, own_kafka.bootstrap, topic, set(answered))
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill_group()
    missing, duplicates = report_ids("kafka, broker down", answered, ids)
    assert (missing, duplicates) == (0, 0)
    assert code == 0, service.output
    [ledger] = service.ledgers()
    print(ledger)
    assert ledger["journaled"] == len(answered), ledger
    _journal_emptied(tmp_path)


async def test_under_kafka_a_broker_killed_mid_load_delays_answers_only_until_known_down(
    own_kafka: KafkaBroker, tmp_path: Path
) -> None:
    """The broker is SIGKILLed under load: requests wait for it only until the
    service knows it is down (far less than ``ack_timeout``), then are
    journaled at once. Once it is back, every answered hit is in the topic."""
    topic = unique_topic()
    config = _config(
        own_kafka.bootstrap,
        topic,
        tmp_path,
        "kafka",
        records={"ack_timeout": 4.0},
        kafka={"linger.ms": 0},
        server={"graceful_timeout": 8.0},
        shutdown={"grace_period": 30.0},
    )
    await trio.to_thread.run_sync(own_kafka.start)
    service = ServiceProcess.cli(config)
    before: dict[str, float] = {}
    transition: dict[str, float] = {}
    during: dict[str, float] = {}
    try:
        url = await trio.to_thread.run_sync(service.url)
        await wait_ready(url)
        await redirects([url], before, seconds=2.0)
        await trio.to_thread.run_sync(own_kafka.kill)
        await redirects([url], transition, seconds=1.0)  # while the news spreads
        await redirects([url], during, seconds=3.0)
        await trio.to_thread.run_sync(own_kafka.start)
        answered = {**before, **transition, **during}
        ids = await trio.to_thread.run_sync(topic_ids, own_kafka.bootstrap, topic, set(answered))
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill_group()
    report_ids("kafka, broker killed: before", before, ids)
    report_ids("kafka, broker killed: its first second down", transition, ids)
    missing, duplicates = report_ids("kafka, broker killed: down", during, ids)
    assert set(answered) <= set(ids)
    assert max(transition.values()) < 4.0  # ack_timeout at the most
    assert len(during) > 50
    assert max(during.values()) < 1.0, sorted(during.values())[-5:]
    assert missing == 0
    assert set(before) <= set(ids)
    assert duplicates <= KAFKA_QUEUE
    assert code == 0, service.output
    print(service.ledgers())
    _journal_emptied(tmp_path)
