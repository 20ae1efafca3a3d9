"""The Kafka producer behind the thread boundary.

Every method here runs in a worker thread, never on the Trio thread. One
delivery-report callback (set once, in the producer's config) serves every
message; it runs in whichever thread polls (the one poller, or the final
flush) and touches only thread-safe state: the ledger, prometheus metrics and
plain attributes.

A sink built with ``acknowledged`` (the live producer under durability
"memory") asks librdkafka for error reports only: a success report costs the
GIL about as much as encoding the record did, and that producer needs no
record's message back, only how many were acknowledged. It counts them
instead (``_count_acknowledged``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import TopicMetadata  # type: ignore[attr-defined]

from .config import ConfigError, KafkaValue
from .hits import Encoded, restored
from .logs import RateLimitedLog, Throttle

log = logging.getLogger(__name__)

_BUFFER_RETRY = 0.005  # s between produce attempts while librdkafka's queue is full
_PURGE_REPORTS_WAIT = 1.0  # s for the purged records' (error) reports to be served
_AUTO_CREATE_WAIT = 1.0  # s for a topic a broker auto-creates to show in its metadata
_AUTO_CREATE_RETRY = 0.1  # s between metadata requests meanwhile
_POLL_IDLE = 0.1  # s a poll waits for reports
# s a counting sink's poll waits while records are out: no success report
# wakes it, so this is how late an acknowledgement may be counted.
_POLL_COUNTING = 0.002

# A counting sink's news: records acknowledged, and (seconds, records) for each
# batch whose records all have their outcome, timed from its produce call.
Acknowledged = Callable[[int, list[tuple[float, int]]], None]


class _RepeatFilter(Throttle, logging.Filter):
    """Passes a librdkafka log line at most once per ``interval`` s per text
    (its first 80 characters: the changing details come last).

    While a broker is down librdkafka logs every reconnect attempt; the error
    callback already reports the condition (rate-limited) with a count.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return self.allow(record.getMessage()[:80]) is not None


_librdkafka_log = logging.getLogger("redirect_logger.librdkafka")
_librdkafka_log.addFilter(_RepeatFilter())


class Reports(Protocol):
    """What becomes of records once librdkafka reports on them. Called in the
    reporting thread (the poller, a flush, a purge), never on the Trio thread.

    ``tag`` is what the batch was produced with (``produce_batch``): None, or
    what the records' owner needs to settle them (a journal placement, say).
    """

    def delivered(self, message: Message, tag: object) -> None:
        """One record acknowledged (``message.latency()``: s from produce)."""

    def undelivered(self, records: list[Encoded], why: str, tag: object) -> None:
        """Records Kafka could not take this time (outage, timeout, purge)."""

    def refused(self, records: list[Encoded], why: str, tag: object) -> None:
        """Records no retry can deliver (e.g. larger than the broker accepts)."""

    def served(self) -> None:
        """The reports of one poll have all been handed over."""


# Errors that no retry, now or after a replay, can fix.
_PERMANENT = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.INVALID_RECORD,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.INVALID_TIMESTAMP,
        KafkaError.POLICY_VIOLATION,
    }
)
# Errors produce() raises at once that no retry can fix; any other is retried later.
_REFUSED_AT_ONCE = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG_SIZE, KafkaError._INVALID_ARG}
)
# A topic that does not exist (the broker's answer, or librdkafka's metadata cache).
UNKNOWN_TOPIC = frozenset({KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC})


class KafkaSink:
    """A confluent-kafka producer with one delivery callback, broker readiness,
    and a rebuild after a fatal error."""

    def __init__(
        self,
        config: Mapping[str, KafkaValue],
        reports: Reports,
        *,
        name: str = "producer",
        unknown_topic: Callable[[], None] = lambda: None,
        acknowledged: Acknowledged | None = None,
    ) -> None:
        """``acknowledged``: count the records of untagged batches that are
        acknowledged, without a report each, and tell it (module docstring).
        Only for a sink whose batches carry no tag: a tagged record's success
        is never reported then."""
        self.name = name
        # Called (in the reporting or producing thread) when librdkafka says a
        # topic does not exist; the records themselves go to ``reports`` as usual.
        self._unknown_topic = unknown_topic
        self.reachable = False  # some broker connection is UP (librdkafka statistics)
        self.fatal_error: str | None = None
        self.rebuilds = 0
        self._reports = reports
        self._log = RateLimitedLog(log)
        # len(producer) also counts librdkafka's events (stats, errors), so the
        # records awaiting a report are counted here: produced minus reported.
        # An error report counts as reported once its record is handed to
        # ``reports`` (after the poll that served it), so in_flight stays exact.
        self._count_lock = threading.Lock()
        self._produced = 0
        self._reported = 0
        self._pending: list[tuple[Encoded, KafkaError, object]] = []  # with the batch's tag
        # Counting (``acknowledged``), for the current producer: records it
        # took, error reports it made, acknowledgements counted, and for each
        # batch not yet settled, the count it took up to and its produce time.
        self._acknowledged = acknowledged
        self._took = 0
        self._errors = 0
        self._counted = 0
        self._batches: deque[tuple[int, int, float]] = deque()
        self._work = threading.Event()  # set while a counting sink has records out
        # During a rebuild: records to produce again, with their tags.
        self._carry: list[tuple[Encoded, object]] | None = None
        self._conf: dict[str, Any] = {
            **config,
            "on_delivery": self._on_delivery,
            "delivery.report.only.error": acknowledged is not None,
            "stats_cb": self._on_stats,
            "error_cb": self._on_error,
            "logger": _librdkafka_log,
        }
        self._producer = self._create()
        # librdkafka's producers ask brokers to create the topics they produce to.
        self._auto_create = str(config.get("allow.auto.create.topics", True)).lower() not in (
            "false",
            "f",
            "0",
        )

    def _create(self) -> Producer:
        try:
            return Producer(self._conf)
        except KafkaException as exc:
            raise ConfigError(f"kafka: {exc.args[0].str()}") from exc
        except Exception as exc:  # e.g. a property given a value of the wrong type
            raise ConfigError(f"kafka: {exc}") from exc

    # -- callbacks: run in the polling thread -------------------------------

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        self._report(None, error, message)

    def _report(self, tag: object, error: KafkaError | None, message: Message) -> None:
        if error is None:
            with self._count_lock:
                self._reported += 1
            self._reports.delivered(message, tag)
            return
        if error.code() in UNKNOWN_TOPIC:
            self._unknown_topic()
        # A failed report carries neither headers nor the timestamp: the value has both.
        record = restored(message.topic() or "", message.key(), message.value() or b"")
        with self._count_lock:
            self._pending.append((record, error, tag))
            self._errors += 1

    def _settle(self) -> None:
        """Hand the error reports served by the last poll to ``reports``, a
        call per tag and kind (and count what was acknowledged)."""
        if self._acknowledged is not None:
            self._count_acknowledged()
        with self._count_lock:
            pending, self._pending = self._pending, []
        if pending:
            retry: dict[object, list[Encoded]] = {}
            refused: dict[object, list[Encoded]] = {}
            why: dict[bool, str] = {}  # the first error of each kind
            for record, error, tag in pending:
                permanent = error.code() in _PERMANENT
                (refused if permanent else retry).setdefault(tag, []).append(record)
                why.setdefault(permanent, error.str())
            if retry and self._carry is not None:  # rebuilding: they go to the new producer
                self._carry.extend(
                    (record, tag) for tag, records in retry.items() for record in records
                )
                retry = {}
            for tag, records in retry.items():
                self._reports.undelivered(records, f"delivery failed: {why[False]}", tag)
            for tag, records in refused.items():
                self._reports.refused(records, f"delivery refused: {why[True]}", tag)
            with self._count_lock:
                self._reported += len(pending)
        self._reports.served()

    def _count_acknowledged(self) -> None:
        """Count the records acknowledged since the last call, and time the
        batches now settled: a record the producer took is out (in
        ``len(producer)``, which also counts librdkafka's queued events) or
        gone, and gone is acknowledged unless its error report was made. Read
        in that order (taken, out, errors), a record taken later can only make
        the count lower than the truth, never higher, and a later call makes
        up for it. Exact once nothing is out: after a flush."""
        waits: list[tuple[float, int]] = []
        with self._count_lock:
            took = self._took
            out = len(self._producer)
            done = took - out  # acknowledged or reported failed
            acknowledged = done - self._errors - self._counted
            if acknowledged > 0:
                self._counted += acknowledged
                self._reported += acknowledged
            if out == 0:
                self._work.clear()
            now, settled = time.monotonic(), self._batches
            while settled and settled[0][0] <= done:
                _, records, produced_at = settled.popleft()
                waits.append((now - produced_at, records))
        if acknowledged > 0 or waits:
            assert self._acknowledged is not None
            self._acknowledged(max(acknowledged, 0), waits)

    def _on_stats(self, stats_json: str) -> None:
        brokers = orjson.loads(stats_json).get("brokers", {})
        self.reachable = any(broker.get("state") == "UP" for broker in brokers.values())

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.reachable = False
        if error.fatal():
            self.fatal_error = error.str()
            log.critical("%s: fatal error: %s; it will be rebuilt", self.name, error.str())
            return
        self._log(logging.WARNING, error.name(), f"kafka: {error.str()}")

    # -- the Sink protocol (pipeline.Sink) ------------------------------------

    def produce_batch(self, batch: Sequence[Encoded], window: float, tag: object = None) -> int:
        producer = self._producer
        # Untyped: its stub wants list[tuple[str, str | bytes | None]] (lists are invariant).
        produce: Callable[..., None] = producer.produce
        # A tagged batch's reports carry its tag: one callback for the batch.
        report = None if tag is None else partial(self._report, tag)
        # Arguments by position, as confluent-kafka parses them faster than by
        # keyword (0.3-0.4 us a record): topic, value, key, partition (-1: the
        # partitioner's choice), callback (None: the config's on_delivery),
        # on_delivery, timestamp, headers.
        started = time.monotonic()
        give_up = started + window
        produced = 0
        try:
            for index, (topic, key, value, timestamp_ms, headers) in enumerate(batch):
                while True:
                    try:
                        produce(topic, value, key, -1, report, None, timestamp_ms, headers)
                        produced += 1
                        break
                    except BufferError:  # queue full: backpressure, not loss
                        pass
                    except KafkaException as exc:
                        error = exc.args[0]
                        if error.code() in _REFUSED_AT_ONCE:  # this record can never go
                            self._reports.refused([batch[index]], f"refused: {error.str()}", tag)
                            break
                        if error.code() in UNKNOWN_TOPIC:
                            self._unknown_topic()
                        if error.code() != KafkaError._FATAL:  # e.g. an unknown topic: later
                            self._reports.undelivered(
                                [batch[index]], f"refused: {error.str()}", tag
                            )
                            break
                        # the producer awaits its rebuild: wait, as for a full queue
                    if time.monotonic() >= give_up or producer is not self._producer:
                        return index
                    time.sleep(_BUFFER_RETRY)
            return len(batch)
        finally:
            with self._count_lock:
                self._produced += produced
                # Counted for the producer that took them; one replaced
                # meanwhile (rebuild) was purged, and reports them failed.
                if produced and self._acknowledged is not None and producer is self._producer:
                    self._took += produced
                    self._batches.append((self._took, produced, started))
                    self._work.set()

    def topic_names(self, wanted: Collection[str], timeout: float) -> set[str] | None:
        """Which topics exist, from one metadata request for all topics, which
        never makes a broker create one. Under librdkafka's default
        ``allow.auto.create.topics`` (true for a producer) each topic of
        ``wanted`` not among them is then asked for by name, as the first
        record for it would be: a broker with ``auto.create.topics.enable``
        creates it then, and no sooner than that record would have. None when
        no broker answered within ``timeout`` s in all. Blocks: call it in a thread."""
        give_up = time.monotonic() + timeout
        try:
            metadata = self._producer.list_topics(timeout=timeout)
            if not metadata.brokers:
                return None
            found = {name for name, topic in metadata.topics.items() if _exists(topic)}
            if self._auto_create:
                for name in [name for name in wanted if name not in found]:
                    if self._created(name, give_up):
                        found.add(name)
        except KafkaException:
            return None
        return found

    def _created(self, name: str, give_up: float) -> bool:
        """Whether a metadata request naming the topic finds it, within
        ``_AUTO_CREATE_WAIT`` s: a broker that auto-creates it first answers
        that it does not exist. Raises KafkaException if no broker answers
        by ``give_up``."""
        wait_until = min(give_up, time.monotonic() + _AUTO_CREATE_WAIT)
        while True:
            left = give_up - time.monotonic()
            if left <= 0:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
            topic = self._producer.list_topics(name, timeout=left).topics.get(name)
            if topic is not None and _exists(topic):
                return True
            if time.monotonic() >= wait_until:
                return False
            time.sleep(_AUTO_CREATE_RETRY)

    def queued(self) -> int:
        with self._count_lock:
            return self._produced - self._reported

    def poll(self) -> None:
        """Serve what librdkafka has queued for this producer, without waiting:
        delivery reports, statistics (``reachable``), errors and log lines.
        Until something polls, librdkafka keeps them all, a statistics
        document every ``statistics.interval.ms`` included."""
        self._producer.poll(0)
        self._settle()

    def poll_until(self, stop: threading.Event) -> None:
        """Poll until ``stop``. A counting sink gets no report for most
        records, so while it has records out it polls every ``_POLL_COUNTING``
        s, and otherwise waits for some to go out (statistics and errors are
        served every ``_POLL_IDLE`` s at the latest either way)."""
        while not stop.is_set():
            if self._acknowledged is None:
                self._producer.poll(_POLL_IDLE)
            elif self._work.wait(_POLL_IDLE):
                self._producer.poll(_POLL_COUNTING)
            else:
                self._producer.poll(0)
            self._settle()

    def flush(self, timeout: float) -> None:
        self._producer.flush(timeout)
        self._settle()

    def purge(self, wait: float = _PURGE_REPORTS_WAIT) -> None:
        """Purge what is still queued, serving the error reports (each step waits
        up to ``wait`` s for them)."""
        # Queued records first: they were never sent. Records already sent may
        # still be acknowledged; only those still unanswered after the wait are
        # purged too (and may then be in the topic as well as in the journal).
        producer = self._producer
        producer.purge(in_queue=True, in_flight=False, blocking=True)
        self._serve_reports(producer, wait)
        if self.queued():
            producer.purge(in_queue=True, in_flight=True, blocking=True)
            self._serve_reports(producer, wait)

    def rebuild(self) -> None:
        """Replace a producer that had a fatal error with a new one.

        The records the old one held are purged and produced again into the
        new one, with their tags; those that do not fit within a second go to
        ``undelivered``. Raises ConfigError if the new producer cannot be created.
        """
        old = self._producer
        carry: list[tuple[Encoded, object]] = []
        self._carry = carry
        try:
            old.purge(in_queue=True, in_flight=True, blocking=True)
            self._serve_reports(old, 2 * _PURGE_REPORTS_WAIT)
        finally:
            self._carry = None
        self.reachable = False
        new = self._create()
        with self._count_lock:  # what the old one took and did not settle stays queued
            self._producer = new
            self._took = self._errors = self._counted = 0
            self._batches.clear()
        self.fatal_error = None
        self.rebuilds += 1
        taken = 0
        give_up = time.monotonic() + _PURGE_REPORTS_WAIT
        for tag, records in _by_tag(carry):
            produced = self.produce_batch(records, max(0.0, give_up - time.monotonic()), tag)
            taken += produced
            if produced < len(records):
                self._reports.undelivered(
                    records[produced:], "not taken by the rebuilt producer", tag
                )
        self._reports.served()
        log.warning(
            "%s rebuilt after a fatal error (%d so far); %d records it held produced again",
            self.name,
            self.rebuilds,
            taken,
        )

    def _serve_reports(self, producer: Producer, timeout: float) -> None:
        give_up = time.monotonic() + timeout
        while self.queued() and time.monotonic() < give_up:
            producer.poll(0.05)
            self._settle()


def _exists(topic: TopicMetadata) -> bool:
    """Whether a topic of a metadata answer exists (it may have no leader yet)."""
    return topic.error is None or topic.error.code() not in UNKNOWN_TOPIC


def _by_tag(tagged: list[tuple[Encoded, object]]) -> list[tuple[object, list[Encoded]]]:
    """Records grouped by tag, each group in order."""
    groups: dict[object, list[Encoded]] = {}
    for record, tag in tagged:
        groups.setdefault(tag, []).append(record)
    return list(groups.items())
