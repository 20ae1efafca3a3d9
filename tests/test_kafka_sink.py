"""KafkaSink against a fake producer: the counting of acknowledgements
without a report per record (durability "memory"), and the reports of a
sink that gets one per record."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from redirect_logger import kafka
from redirect_logger.hits import Encoded
from redirect_logger.kafka import KafkaSink
from redirect_logger.metrics import LATENCY_BUCKETS, DeliveryLatency


class FakeMessage:
    def __init__(self, record: Encoded) -> None:
        self.record = record

    def topic(self) -> str:
        return self.record.topic

    def key(self) -> bytes | None:
        return self.record.key

    def value(self) -> bytes:
        return self.record.value

    def latency(self) -> float:
        return 0.004


class FakeProducer:
    """What librdkafka does with ``delivery.report.only.error``: an
    acknowledged record is gone at once, with no report; a failed one waits,
    still counted in ``len``, until a poll serves its report. Queued events
    (statistics, say) count in ``len`` too."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.only_errors = bool(conf["delivery.report.only.error"])
        self.on_delivery = conf["on_delivery"]
        self.out: list[Encoded] = []  # taken, no outcome yet
        self.failed: list[Encoded] = []  # report not yet served
        self.succeeded: list[Encoded] = []  # report not yet served (not only_errors)
        self.events = 0

    def produce(self, topic: str, value: bytes, key: bytes | None, *rest: Any) -> None:
        self.out.append(Encoded(topic, key, value, rest[3], rest[4]))

    def __len__(self) -> int:
        return len(self.out) + len(self.failed) + len(self.succeeded) + self.events

    def acknowledge(self, count: int) -> None:
        done, self.out = self.out[:count], self.out[count:]
        if not self.only_errors:
            self.succeeded += done

    def fail(self, count: int) -> None:
        done, self.out = self.out[:count], self.out[count:]
        self.failed += done

    def poll(self, timeout: float = 0) -> int:
        served = 0
        while self.succeeded or self.failed:
            if self.succeeded:
                self.on_delivery(None, FakeMessage(self.succeeded.pop(0)))
            else:
                error = KafkaError(KafkaError._MSG_TIMED_OUT)
                self.on_delivery(error, FakeMessage(self.failed.pop(0)))
            served += 1
        self.events = 0
        return served

    def flush(self, timeout: float) -> int:
        self.poll()
        return len(self)


class Reports:
    def __init__(self) -> None:
        self.delivered: list[bytes] = []
        self.undelivered: list[bytes] = []
        self.acknowledged = 0
        self.waits: list[tuple[float, int]] = []

    def on_delivered(self, message: Any, tag: object) -> None:
        self.delivered.append(message.value())

    def on_undelivered(self, records: list[Encoded], why: str, tag: object) -> None:
        self.undelivered += [record.value for record in records]

    def on_acknowledged(self, count: int, waits: list[tuple[float, int]]) -> None:
        self.acknowledged += count
        self.waits += waits


class AsReports:
    """The Reports protocol over ``Reports``."""

    def __init__(self, reports: Reports) -> None:
        self.delivered = reports.on_delivered
        self.undelivered = reports.on_undelivered
        self.refused = reports.on_undelivered

    def served(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(kafka, "Producer", FakeProducer)
    yield


def sink_of(reports: Reports, counting: bool = True) -> tuple[KafkaSink, FakeProducer]:
    acknowledged = reports.on_acknowledged if counting else None
    sink = KafkaSink({}, AsReports(reports), acknowledged=acknowledged)
    producer = sink._producer
    assert isinstance(producer, FakeProducer)
    return sink, producer


def records(first: int, count: int) -> list[Encoded]:
    return [Encoded("hits", None, b"%d" % n, 0, []) for n in range(first, first + count)]


def test_counting_sink_counts_acknowledgements_and_reports_failures() -> None:
    reports = Reports()
    sink, producer = sink_of(reports)
    assert producer.only_errors
    assert sink.produce_batch(records(0, 10), 0.0) == 10
    assert sink.produce_batch(records(10, 5), 0.0) == 5
    producer.acknowledge(4)
    producer.events = 2  # a statistics document and an error, say, not yet served
    sink._settle()
    # The 2 events could be records: 2 acknowledged records not counted yet.
    assert (reports.acknowledged, sink.queued()) == (2, 13)
    sink.poll()
    assert (reports.acknowledged, sink.queued(), reports.waits) == (4, 11, [])
    producer.fail(2)  # records 4 and 5
    producer.acknowledge(4)  # 6 to 9: the first batch has its outcomes
    sink.poll()
    assert reports.undelivered == [b"4", b"5"]
    assert (reports.acknowledged, sink.queued()) == (8, 5)
    assert [records for _, records in reports.waits] == [10]
    producer.acknowledge(5)
    sink.flush(1.0)
    assert (reports.acknowledged, sink.queued()) == (13, 0)
    assert [records for _, records in reports.waits] == [10, 5]
    assert reports.delivered == []  # no message was reported one by one


def test_reporting_sink_reports_each_acknowledged_record() -> None:
    reports = Reports()
    sink, producer = sink_of(reports, counting=False)
    assert not producer.only_errors
    sink.produce_batch(records(0, 6), 0.0)
    producer.acknowledge(3)
    producer.fail(1)
    producer.acknowledge(2)
    sink.poll()
    assert reports.delivered == [b"0", b"1", b"2", b"4", b"5"]
    assert reports.undelivered == [b"3"]
    assert (reports.acknowledged, reports.waits, sink.queued()) == (0, [], 0)


_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["produce", "ack", "fail", "event", "settle", "poll"]), st.integers(1, 9)
    ),
    max_size=40,
)


@given(_STEPS)
def test_counting_never_runs_ahead_of_the_acknowledgements(steps: list[tuple[str, int]]) -> None:
    """Whatever librdkafka does between two counts, the count is at most the
    records acknowledged, and exact once every report is served."""
    reports = Reports()
    sink, producer = sink_of(reports)
    produced = acknowledged = 0
    for step, count in steps:
        if step == "produce":
            produced += sink.produce_batch(records(produced, count), 0.0)
        elif step == "ack":
            acknowledged += min(count, len(producer.out))
            producer.acknowledge(count)
        elif step == "fail":
            producer.fail(count)
        elif step == "event":
            producer.events += count
        elif step == "settle":
            sink._settle()
        else:
            sink.poll()
        assert reports.acknowledged <= acknowledged
    acknowledged += len(producer.out)
    producer.acknowledge(len(producer.out))
    sink.flush(1.0)
    assert reports.acknowledged == acknowledged
    assert reports.acknowledged + len(reports.undelivered) == produced
    assert sink.queued() == 0
    assert sum(records for _, records in reports.waits) == produced


def test_a_record_taken_while_counting_is_not_counted_before_its_batch_is() -> None:
    """A batch whose records are in librdkafka but not yet counted as taken
    (its produce call still running in another thread) makes the count lower,
    never higher."""
    reports = Reports()
    sink, producer = sink_of(reports)
    sink.produce_batch(records(0, 3), 0.0)
    producer.acknowledge(3)
    counted = threading.Event()

    def produce_then_count(*args: Any) -> None:
        FakeProducer.produce(producer, *args)
        if not counted.is_set():
            counted.set()
            sink._settle()  # mid-batch: 1 record out, not yet taken

    producer.produce = produce_then_count  # type: ignore[method-assign]
    sink.produce_batch(records(3, 4), 0.0)
    # 3 taken, 1 out: 2 counted, as if the one out were one of the 3.
    assert reports.acknowledged == 2
    producer.acknowledge(4)
    sink.poll()
    assert reports.acknowledged == 7


def test_delivery_latency_writes_what_a_prometheus_histogram_writes() -> None:
    """The same samples (on the bucket edges, between, past the last), one at
    a time and a batch at once, as prometheus_client's Histogram writes them
    (but its ``_created``)."""
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram(DeliveryLatency.NAME, "x", buckets=LATENCY_BUCKETS, registry=theirs)
    latency = DeliveryLatency()
    ours.register(latency)
    samples = [0.0007, 0.001, 0.003, 0.01, 0.0250001, 1, 2.5, 31.0]
    for seconds in samples:
        histogram.observe(seconds)
        latency.observe(seconds)
    for _ in range(3):
        histogram.observe(0.004)
    latency.observe_many([(0.004, 3)])

    def samples_of(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if line[:1] != "#" and "_created" not in line]

    (*our_counts, our_sum), (*their_counts, their_sum) = samples_of(ours), samples_of(theirs)
    assert our_counts == their_counts
    assert 'redirect_logger_delivery_latency_seconds_bucket{le="0.005"} 6.0' in our_counts
    # 3 * 0.004 added at once rounds differently from 0.004 added 3 times
    assert float(our_sum.split()[1]) == pytest.approx(float(their_sum.split()[1]))
