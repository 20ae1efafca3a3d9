"""One process's service: settings, rule table, ledger, producer and pipeline.

Both launch modes run the same lifecycle, ``Service.running()``: the CLI wraps
``hypercorn.trio.serve`` in it; under ``hypercorn`` the ASGI lifespan does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from .config import ADMIN_PATHS, Settings, port_of
from .hits import Enricher
from .kafka import KafkaSink
from .ledger import Ledger
from .metrics import Metrics
from .pipeline import Pipeline, open_pipeline
from .rules import RuleTable

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_RECORDS_LOST = 3


class Service:
    """State shared by the request path, the admin routes and the lifecycle."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rules = RuleTable.from_settings(settings)
        self.ledger = Ledger()
        self.enricher = Enricher(settings.records, settings.server)
        self.metrics = Metrics(self.ledger, self._gauges)
        self.pipeline: Pipeline | None = None
        self.sink: KafkaSink | None = None
        self.draining = False
        self.binds: list[str] = []  # addresses served, once listening
        self.admin_binds: list[str] = []
        # Local ports that serve only the admin endpoints; None: admin on every port.
        admin = settings.server.admin_bind
        self.admin_ports = frozenset(port_of(b) for b in admin) if admin else None

    def listening(self, binds: list[str]) -> None:
        """Record the bound addresses (``server.bind`` first, then ``admin_bind``),
        learning the admin ports chosen by the system for port 0."""
        count = len(self.settings.server.bind)
        self.binds, self.admin_binds = binds[:count], binds[count:]
        if self.admin_binds:
            self.admin_ports = frozenset(port_of(b) for b in self.admin_binds)

    def is_admin(self, scope: dict[str, Any]) -> bool:
        """Whether an HTTP request is for the admin endpoints (by path and local port)."""
        if self.admin_ports is None:
            return scope["path"] in ADMIN_PATHS
        server = scope.get("server")
        return server is not None and server[1] in self.admin_ports

    def readiness(self) -> str | None:
        """None when ready to take traffic, else why not."""
        if self.draining:
            return "draining"
        if self.pipeline is None or self.sink is None:
            return "starting"
        if self.sink.fatal_error is not None:
            return f"producer failed: {self.sink.fatal_error}"
        if not self.sink.reachable:
            return "no Kafka broker reachable"
        return None

    def in_flight(self) -> int:
        return self.pipeline.in_flight() if self.pipeline is not None else 0

    def ledger_snapshot(self) -> dict[str, int]:
        return self.ledger.snapshot(self.in_flight())

    def _gauges(self) -> dict[str, float]:
        pipeline, sink = self.pipeline, self.sink
        return {
            "in_flight": self.in_flight(),
            "queue_depth": pipeline.queue_depth() if pipeline else 0,
            "queue_capacity": self.settings.records.queue_size,
            "producer_queue": sink.queued() if sink else 0,
            "ready": 1 if self.readiness() is None else 0,
            "broker_reachable": 1 if sink is not None and sink.reachable else 0,
        }

    def create_sink(self) -> KafkaSink:
        """The producer (created once). Raises ConfigError if librdkafka refuses ``[kafka]``."""
        if self.sink is None:
            self.sink = KafkaSink(
                self.settings.kafka,
                self.settings.records.topic,
                self.ledger,
                self.metrics.delivery_latency.observe,
            )
        return self.sink

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the producer and pipeline around the body, then drain and flush.

        On exit readiness is false, every record is delivered or counted, and
        the ledger is logged. Raises ConfigError if librdkafka refuses ``[kafka]``.
        """
        settings = self.settings
        sink = self.create_sink()
        try:
            async with open_pipeline(
                settings.records,
                settings.shutdown.flush_timeout,
                sink,
                self.enricher.encode,
                self.ledger,
                self.metrics.batch_size.observe,
            ) as pipeline:
                self.pipeline = pipeline
                log.info(
                    "pipeline running: topic %s, %d workers, queue %d records, when_full=%s",
                    settings.records.topic,
                    settings.records.workers,
                    settings.records.queue_size,
                    settings.records.when_full,
                )
                try:
                    yield
                finally:
                    self.draining = True
                    log.info("draining: closing the channel, flushing the producer")
        finally:  # also when the pipeline itself failed
            self.draining = True
            snapshot = self.ledger_snapshot()
            level = logging.INFO if self.exit_code() == EXIT_OK else logging.ERROR
            log.log(level, "ledger %s", orjson.dumps(snapshot).decode())

    def exit_code(self) -> int:
        """0 when every received record was delivered or dropped/shed by policy."""
        if self.ledger.failed or self.in_flight():
            return EXIT_RECORDS_LOST
        return EXIT_OK
