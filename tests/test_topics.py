"""A topic the service writes to that does not exist (issue 14): /readyz, the
redirect_logger_topic_missing gauge, the log, and the records spilled then
replayed once the topic is created."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection
from pathlib import Path

import httpx
import pytest
import trio
from confluent_kafka.admin import AdminClient, NewTopic

from brokers import Broker
from redirect_logger import topics
from redirect_logger.config import parse_settings
from redirect_logger.hits import record_id
from redirect_logger.kafka import KafkaSink
from redirect_logger.service import Service
from redirect_logger.spill import read_segment
from redirect_logger.topics import TopicWatch
from support import read_topic, service_config, start_service, unique_topic, unreachable_config


class FakeBroker:
    """A lookup (``topics.Lookup``) whose answer the test sets; None: no broker answered."""

    def __init__(self, existing: Collection[str] | None) -> None:
        self.existing = existing
        self.calls = 0

    def __call__(self, wanted: list[str], timeout: float) -> Collection[str] | None:
        assert 0 < timeout <= topics.CHECK_TIMEOUT
        self.calls += 1
        return self.existing


async def _until(condition: Callable[[], object]) -> None:
    with trio.fail_after(5):
        while not condition():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_topic_watch_names_missing_topics_until_they_exist(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(topics, "RECHECK", 0.1)
    monkeypatch.setattr(topics, "_MIN_GAP", 0.05)
    monkeypatch.setattr(topics, "_LOOK", 0.01)
    broker = FakeBroker({"a", "other"})
    watch = TopicWatch(lambda: ["a", "b", "c"], broker)
    assert watch.gauge() == {"a": 0, "b": 0, "c": 0}  # nothing known missing before a check
    assert watch.reason() is None
    caplog.set_level(logging.ERROR, logger="redirect_logger.topics")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            await _until(lambda: watch.missing)
            assert watch.missing == ("b", "c")
            assert watch.gauge() == {"a": 0, "b": 1, "c": 1}
            assert watch.reason() == "missing topics: b, c"

            # Re-checked while missing; logged once (rate-limited), not per check.
            calls = broker.calls
            await _until(lambda: broker.calls >= calls + 3)
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1, errors
            assert "topic(s) missing: b, c" in errors[0]

            # No broker answers: inconclusive, what was known stays.
            broker.existing = None
            calls = broker.calls
            await _until(lambda: broker.calls >= calls + 2)
            assert watch.missing == ("b", "c")

            # One is created, then the other: seen without anything asking.
            broker.existing = {"a", "b"}
            await _until(lambda: watch.missing == ("c",))
            assert watch.reason() == "missing topic: c"
            broker.existing = {"a", "b", "c"}
            await _until(lambda: not watch.missing)
            assert watch.gauge() == {"a": 0, "b": 0, "c": 0}

            # Nothing missing: no more checks, until a report of an unknown topic.
            calls = broker.calls
            await trio.sleep(0.5)
            assert broker.calls == calls
            broker.existing = {"a", "b"}
            watch.suspect()
            await _until(lambda: watch.missing == ("c",))
            nursery.cancel_scope.cancel()


async def test_no_broker_at_start_is_not_a_missing_topic() -> None:
    watch = TopicWatch(lambda: ["a"], FakeBroker(None))
    with trio.fail_after(5):
        await watch.check()
    assert watch.missing == ()
    assert watch.gauge() == {"a": 0}


def test_a_reload_asks_for_a_check_and_the_gauge_follows_the_rules() -> None:
    config = unreachable_config()
    service = Service(parse_settings(config))
    before = set(service.topics.gauge())
    assert before == {config["records"]["topic"]}
    new_topic = unique_topic("rule")
    rule = {"name": "new", "path": "/new", "target": "https://example.com/", "topic": new_topic}
    service.use_rules(parse_settings({**config, "rules": [*config["rules"], rule]}))
    assert service.topics.gauge() == {config["records"]["topic"]: 0, new_topic: 0}
    assert service.topics._due.is_set()  # checked by the watch within _MIN_GAP
    text = service.metrics.exposition().decode()
    assert f'redirect_logger_topic_missing{{topic="{new_topic}"}} 0.0' in text


def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)


def _journaled_ids(spill: Path) -> list[str]:
    ids = []
    for path in sorted(spill.glob("slot-*/segment-*.log")):
        for record in read_segment(path).records:
            found = record_id(record.value)
            assert found is not None
            ids.append(found.decode())
    return ids


async def test_a_missing_rule_topic_is_named_spilled_and_replayed_once_created(
    kafka_broker: Broker,
) -> None:
    records_topic, missing = unique_topic(), unique_topic("missing")
    await trio.to_thread.run_sync(_create_topic, kafka_broker.bootstrap, records_topic)
    config = service_config(
        kafka_broker.bootstrap,
        records_topic,
        # The test broker auto-creates topics; a producer asks it to by default.
        kafka={
            "allow.auto.create.topics": False,
            "topic.metadata.propagation.max.ms": 1000,
        },
    )
    config["rules"].append(
        {"name": "gone", "path": "/gone", "target": "https://example.com/", "topic": missing}
    )
    spill = Path(config["spill"]["directory"])
    count = 20
    stop = trio.Event()
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as http:

                async def readyz(**params: str) -> httpx.Response:
                    return await http.get("/readyz", params=params)

                async def gauge() -> dict[str, float]:
                    text = (await http.get("/metrics")).text
                    found = re.findall(
                        r'redirect_logger_topic_missing\{topic="([^"]+)"\} (\S+)', text
                    )
                    return {topic: float(value) for topic, value in found}

                answer = await readyz()
                while "missing" not in answer.text:
                    await trio.sleep(0.1)
                    answer = await readyz()
                assert answer.status_code == 503
                assert answer.text == f"not ready: missing topic: {missing}\n"
                assert (await readyz(exclude="kafka")).status_code == 200
                assert await gauge() == {records_topic: 0.0, missing: 1.0}

                sent = []
                for _ in range(count):
                    response = await http.get("/gone")
                    assert response.status_code == 302
                    sent.append(response.headers["x-hit-id"])
                while service.ledger.spilled < count:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                assert service.ledger.spilled == count
                assert service.ledger.delivered == service.ledger.failed == 0
                assert sorted(_journaled_ids(spill)) == sorted(sent)

                await trio.to_thread.run_sync(_create_topic, kafka_broker.bootstrap, missing)
                while (await readyz()).status_code != 200:  # noqa: ASYNC110
                    await trio.sleep(0.1)
                assert await gauge() == {records_topic: 0.0, missing: 0.0}
                while service.ledger.replayed < count:  # noqa: ASYNC110
                    await trio.sleep(0.1)

                # New hits go straight to the topic now.
                later = []
                for _ in range(5):
                    response = await http.get("/gone")
                    later.append(response.headers["x-hit-id"])
                while service.ledger.delivered + service.ledger.replayed < count + 5:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            stop.set()
    assert codes == [0]
    ids = await trio.to_thread.run_sync(
        lambda: [r["id"] for r in read_topic(kafka_broker.bootstrap, missing, expected=count + 5)]
    )
    assert sorted(ids) == sorted(sent + later)
    ledger = service.ledger
    assert ledger.received == ledger.spilled + ledger.delivered == count + 5
    assert ledger.delivered + ledger.replayed == count + 5  # the later ones may spill too
    assert not _journaled_ids(spill)


class _NoReports:
    def delivered(self, message: object, tag: object) -> None: ...
    def undelivered(self, records: object, why: str, tag: object) -> None: ...
    def refused(self, records: object, why: str, tag: object) -> None: ...
    def served(self) -> None: ...


def test_the_check_creates_a_topic_only_as_the_first_record_would(kafka_broker: Broker) -> None:
    """On a broker with ``auto.create.topics.enable=true`` (tests/brokers.py):
    with ``allow.auto.create.topics = false`` the check creates nothing and
    reports the topic missing; under librdkafka's producer default (true),
    the topic is created as the first record for it would create it, and is
    not reported missing."""
    bootstrap = kafka_broker.bootstrap
    existing, absent = unique_topic(), unique_topic("absent")
    _create_topic(bootstrap, existing)
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})

    strict = KafkaSink(
        {"bootstrap.servers": bootstrap, "allow.auto.create.topics": False}, _NoReports()
    )
    watch = TopicWatch(lambda: [existing, absent], strict.topic_names)
    for _ in range(3):
        trio.run(watch.check)
        assert watch.missing == (absent,)
    assert absent not in admin.list_topics(timeout=10).topics
    strict.flush(1)

    default = KafkaSink({"bootstrap.servers": bootstrap}, _NoReports())
    watch = TopicWatch(lambda: [existing, absent], default.topic_names)
    trio.run(watch.check)
    assert watch.missing == ()
    assert absent in admin.list_topics(timeout=10).topics
    default.flush(1)


def test_an_unreachable_broker_makes_the_check_inconclusive() -> None:
    sink = KafkaSink({"bootstrap.servers": "127.0.0.1:9"}, _NoReports())
    assert sink.topic_names(["a"], 0.5) is None
