"""The Kafka producer behind the thread boundary.

Every method here runs in a worker thread, never on the Trio thread. One
delivery-report callback (set once, in the producer's config) serves every
message; it runs in whichever thread polls (the one poller, or the final
flush) and touches only thread-safe state: the ledger, prometheus metrics and
plain attributes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from .config import ConfigError, KafkaValue
from .hits import Encoded
from .ledger import Ledger

log = logging.getLogger(__name__)

_BUFFER_RETRY = 0.005  # s between produce attempts while librdkafka's queue is full
_PURGE_REPORTS_WAIT = 1.0  # s for the purged records' (error) reports to be served


class _Throttle:
    """Lets a recurring condition through at most once per ``interval`` s per key,
    and counts what it held back meanwhile."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: object) -> int | None:
        """None to hold this one back; else how many were held back since the last."""
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self._interval) < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)


class _RateLimitedLog(_Throttle):
    def __call__(self, level: int, key: str, message: str) -> None:
        suppressed = self.allow(key)
        if suppressed is None:
            return
        if suppressed:
            message += f" (and {suppressed} more like it)"
        log.log(level, "%s", message)


class _RepeatFilter(_Throttle, logging.Filter):
    """Passes a librdkafka log line at most once per ``interval`` s per text
    (its first 80 characters: the changing details come last).

    While a broker is down librdkafka logs every reconnect attempt; the error
    callback already reports the condition (rate-limited) with a count.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return self.allow(record.getMessage()[:80]) is not None


_librdkafka_log = logging.getLogger("redirect_logger.librdkafka")
_librdkafka_log.addFilter(_RepeatFilter())


class KafkaSink:
    """A confluent-kafka producer with one delivery callback and broker readiness."""

    def __init__(
        self,
        config: Mapping[str, KafkaValue],
        topic: str,
        ledger: Ledger,
        observe_latency: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.topic = topic
        self.reachable = False  # some broker connection is UP (librdkafka statistics)
        self.fatal_error: str | None = None
        self._ledger = ledger
        self._observe_latency = observe_latency
        self._log = _RateLimitedLog()
        # len(producer) also counts librdkafka's events (stats, errors), so the
        # records awaiting a report are counted here: produced minus reported.
        self._count_lock = threading.Lock()
        self._produced = 0
        self._reported = 0
        conf: dict[str, Any] = {
            **config,
            "on_delivery": self._on_delivery,
            "stats_cb": self._on_stats,
            "error_cb": self._on_error,
            "logger": _librdkafka_log,
        }
        try:
            self._producer = Producer(conf)
        except KafkaException as exc:
            raise ConfigError(f"kafka: {exc.args[0].str()}") from exc
        except Exception as exc:  # e.g. a property given a value of the wrong type
            raise ConfigError(f"kafka: {exc}") from exc

    # -- callbacks: run in the polling thread -------------------------------

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        with self._count_lock:
            self._reported += 1
        if error is None:
            self._ledger.add_delivered()
            latency = message.latency()
            if latency is not None:
                self._observe_latency(latency)
            return
        self._ledger.add_failed()
        self._log(logging.ERROR, error.name(), f"delivery failed: {error.str()}")

    def _on_stats(self, stats_json: str) -> None:
        brokers = orjson.loads(stats_json).get("brokers", {})
        self.reachable = any(broker.get("state") == "UP" for broker in brokers.values())

    def _on_error(self, error: KafkaError) -> None:
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.reachable = False
        if error.fatal():
            self.fatal_error = error.str()
            log.critical("fatal producer error: %s", error.str())
            return
        self._log(logging.WARNING, error.name(), f"kafka: {error.str()}")

    # -- the Sink protocol (pipeline.Sink) ------------------------------------

    def produce_batch(self, batch: Sequence[Encoded], window: float) -> int:
        produce = self._producer.produce
        topic = self.topic
        give_up = time.monotonic() + window
        produced = 0
        try:
            for index, (key, value, timestamp_ms) in enumerate(batch):
                while True:
                    try:
                        produce(topic, value, key, timestamp=timestamp_ms)
                        produced += 1
                        break
                    except BufferError:  # queue full: backpressure, not loss
                        if time.monotonic() >= give_up:
                            return index
                        time.sleep(_BUFFER_RETRY)
                    except KafkaException as exc:  # this record can never be produced
                        self._ledger.add_failed()
                        self._log(logging.ERROR, "produce", f"refused: {exc.args[0].str()}")
                        break
            return len(batch)
        finally:
            with self._count_lock:
                self._produced += produced

    def queued(self) -> int:
        with self._count_lock:
            return self._produced - self._reported

    def poll_until(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._producer.poll(0.1)

    def flush(self, timeout: float) -> None:
        self._producer.flush(timeout)

    def purge(self) -> None:
        # Queued records first: they were never sent. Records already sent may
        # still be acknowledged; only those still unanswered after the wait are
        # purged too (and may then be in the topic although counted failed).
        self._producer.purge(in_queue=True, in_flight=False, blocking=True)
        self._serve_reports(_PURGE_REPORTS_WAIT)
        if self.queued():
            self._producer.purge(in_queue=True, in_flight=True, blocking=True)
            self._serve_reports(_PURGE_REPORTS_WAIT)

    def _serve_reports(self, timeout: float) -> None:
        give_up = time.monotonic() + timeout
        while self.queued() and time.monotonic() < give_up:
            self._producer.poll(0.05)
