"""Prometheus metrics: the ledger, queue gauges, batch sizes, delivery latency.

Each service has its own ``CollectorRegistry`` (not the global one), so several
services can live in one process (tests) without clashing.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .ledger import OUTCOMES, Ledger
from .limits import CLOSES, HEAVY_BYTES, REFUSALS

if TYPE_CHECKING:
    from .config import Rule

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
# Why the collect endpoint refused a request (docs/collect.md).
COLLECT_REJECTIONS = (
    "method",
    "origin",
    "content_type",
    "encoding",
    "body_too_large",
    "body_timeout",
    "undecodable",
    "malformed",
    "not_an_object",
    "too_deep",
    "missing_field",
    "bad_id",
    "too_many_events",
    "event_too_large",
    "overloaded",
)
COLLECT_EVENT_OUTCOMES = ("accepted", "dropped", "shed")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
FALLBACK_RULE = "(fallback)"  # the ``rule`` label of answers by ``[fallback]``


class _LedgerCollector(Collector):
    def __init__(self, ledger: Ledger, gauges: Callable[[], dict[str, float]]) -> None:
        self._ledger = ledger
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        records = CounterMetricFamily(
            "redirect_logger_records",
            "Hit records by outcome (received = delivered + spilled + failed + dropped + shed"
            " + excluded + in_flight; replayed: delivered from the spill journal; journaled:"
            " written to the journal before their answer)",
            labels=["outcome"],
        )
        ledger = self._ledger
        for outcome in OUTCOMES:
            records.add_metric([outcome], getattr(ledger, outcome))
        yield records
        gauges = self._gauges()
        yield CounterMetricFamily(
            "redirect_logger_producer_rebuilds",
            "Producers replaced after a fatal librdkafka error",
            value=gauges.pop("producer_rebuilds"),
        )
        for name, value in gauges.items():
            yield GaugeMetricFamily(f"redirect_logger_{name}", _GAUGE_HELP[name], value=value)


class TopicsMissing(Collector):
    """``redirect_logger_topic_missing{topic}``: for each topic the config
    writes to, 1 when a broker said it does not exist, else 0 (topics.py)."""

    def __init__(self, missing: Callable[[], dict[str, int]]) -> None:
        self._missing = missing

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "redirect_logger_topic_missing",
            "1 for a topic the config writes to that does not exist (its records are"
            " journaled until it does), else 0",
            labels=["topic"],
        )
        for topic, value in self._missing().items():
            gauge.add_metric([topic], value)
        yield gauge


class RuleHits(Collector):
    """Redirect answers by rule and status: ``redirect_logger_hits_total``.

    Counted on the Trio thread by the request path (one dict update), read
    there by the scrape. A rule keeps its counts after a reload removes it.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str | None, int], int] = {}

    def count(self, rule: str | None, status: int) -> None:
        key = (rule, status)
        self._counts[key] = self._counts.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        hits = CounterMetricFamily(
            "redirect_logger_hits",
            "Redirect answers (hits) by rule name and HTTP status; "
            f'rule="{FALLBACK_RULE}" for [fallback]',
            labels=["rule", "status"],
        )
        for (rule, status), count in sorted(self._counts.items(), key=_by_rule):
            hits.add_metric([FALLBACK_RULE if rule is None else rule, str(status)], count)
        yield hits


class Choices(Collector):
    """Redirect answers by route and by split variant:
    ``redirect_logger_routed_total{rule,route}`` and
    ``redirect_logger_split_total{rule,variant}``.

    The labels are configured names only (a route's name, else its index),
    so their number is bounded by the config. ``configure`` lists every
    route and variant of the rules loaded (at 0 until answered); a route or
    variant keeps its counts after a reload removes it, as ``RuleHits``.
    Counted and read on the Trio thread.
    """

    def __init__(self) -> None:
        self._routed: dict[tuple[str, str], int] = {}
        self._split: dict[tuple[str, str], int] = {}

    def configure(self, rules: list[Rule]) -> None:
        for rule in rules:
            for index, route in enumerate(rule.routes):
                label = str(index) if route.name is None else route.name
                self._routed.setdefault((rule.name, label), 0)
            for variant in rule.split:
                self._split.setdefault((rule.name, variant.name), 0)

    def count(self, rule: str | None, route: int | str | None, variant: str | None) -> None:
        """Count one answer of ``rule`` by its route, or else its variant."""
        name = FALLBACK_RULE if rule is None else rule
        if route is not None:
            key = (name, str(route))
            self._routed[key] = self._routed.get(key, 0) + 1
        elif variant is not None:
            key = (name, variant)
            self._split[key] = self._split.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        routed = CounterMetricFamily(
            "redirect_logger_routed",
            "Redirect answers a rule's route chose, by rule and route (its name, else its index)",
            labels=["rule", "route"],
        )
        for (rule, route), count in sorted(self._routed.items()):
            routed.add_metric([rule, route], count)
        yield routed
        split = CounterMetricFamily(
            "redirect_logger_split",
            "Redirect answers a rule's split chose, by rule and variant",
            labels=["rule", "variant"],
        )
        for (rule, variant), count in sorted(self._split.items()):
            split.add_metric([rule, variant], count)
        yield split


def _by_rule(item: tuple[tuple[str | None, int], int]) -> tuple[str, int]:
    (rule, status), _ = item
    return (FALLBACK_RULE if rule is None else rule, status)


_GAUGE_HELP = {
    "in_flight": "Records received but not yet delivered, spilled, failed, dropped or shed",
    "queue_depth": "Records waiting in the bounded channel (and the overflow channel)",
    "queue_capacity": "Capacity of the bounded channel (records.queue_size)",
    "bytes_in_flight": "Bytes of collect events held from intake until handed to librdkafka"
    " or the journal (at most collect.max_bytes_in_flight, but see docs)",
    "producer_queue": "Records in librdkafka's queue awaiting a delivery report",
    "ready": "1 when /readyz answers 200",
    "broker_reachable": "1 when the producer has a connection to some broker",
    "spill_bytes": "Bytes in this process's spill journal awaiting replay",
    "workers": "Worker processes whose metrics this scrape sums (1 for a single process)",
    "connections": "Client connections open (at most server.max_connections per process)",
}


class DeliveryLatency(Collector):
    """``redirect_logger_delivery_latency_seconds``: a histogram that takes many
    records of one latency in one call (``observe_many``), as the live
    producer learns of its acknowledgements a batch at a time (kafka.py), and
    costs a bisection per call rather than prometheus_client's lock per bucket.
    Called from the reporting thread; read by the scrape."""

    NAME = "redirect_logger_delivery_latency_seconds"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: past 30 s
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """One record, acknowledged ``seconds`` after it was produced."""
        self.observe_many(((seconds, 1),))

    def observe_many(self, waits: Iterable[tuple[float, int]]) -> None:
        """``(seconds, records)`` pairs: that many records acknowledged that long after."""
        with self._lock:
            for seconds, records in waits:
                self._counts[bisect_left(LATENCY_BUCKETS, seconds)] += records
                self._sum += seconds * records

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets, cumulative = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append((_bound_text(bound), cumulative))
        family = HistogramMetricFamily(
            self.NAME, "Time from produce to the broker's acknowledgement"
        )
        family.add_metric([], buckets, total)
        yield family


def _bound_text(bound: float) -> str:
    """A bucket's ``le`` as prometheus_client writes it: ``0.005``, ``1.0``, ``+Inf``."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
    def __init__(
        self,
        ledger: Ledger,
        gauges: Callable[[], dict[str, float]],
        topics_missing: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_LedgerCollector(ledger, gauges))
        self.registry.register(TopicsMissing(topics_missing))
        self.rule_hits = RuleHits()
        self.registry.register(self.rule_hits)
        self.choices = Choices()
        self.registry.register(self.choices)
        self.batch_size = Histogram(
            "redirect_logger_batch_size_records",
            "Records per batch handed to the producer",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.delivery_latency = DeliveryLatency()
        self.registry.register(self.delivery_latency)

        self.collect_rejected = Counter(
            "redirect_logger_collect_rejected",
            "Collect requests refused, by reason (nothing of them recorded, except as shed)",
            ["reason"],
            registry=self.registry,
        )
        self.collect_events = Counter(
            "redirect_logger_collect_events",
            "Events of collect requests by what the channel did with them (each is in the"
            " records ledger too)",
            ["outcome"],
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "redirect_logger_connections_refused",
            "Client connections refused or closed by a limit, by reason (none reached the app"
            " after its refusal: no hit of theirs is lost)",
            ["reason"],
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "redirect_logger_connections_closed",
            "Client connections the service closed on a timeout, by reason: idle_timeout"
            " (no complete request head within server.idle_timeout), send_timeout (its"
            " answers unread for server.send_timeout: the kernel aborted it)",
            ["reason"],
            registry=self.registry,
        )
        self.h2_streams_refused = Counter(
            "redirect_logger_h2_streams_refused",
            "HTTP/2 streams refused (REFUSED_STREAM) past server.h2_max_concurrent_streams",
            registry=self.registry,
        )
        self.heavy_requests = Counter(
            "redirect_logger_heavy_requests",
            "Requests that took their turn in the heavy lane: a hit whose target is longer"
            f" than {HEAVY_BYTES} bytes, a collect request whose body is longer or compressed",
            registry=self.registry,
        )
        for reason in REFUSALS:
            self.connections_refused.labels(reason)
        for reason in CLOSES:
            self.connections_closed.labels(reason)
        for reason in COLLECT_REJECTIONS:
            self.collect_rejected.labels(reason)
        for outcome in COLLECT_EVENT_OUTCOMES:
            self.collect_events.labels(outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
