"""One process's service: settings, rule table, ledger, producer and pipeline.

Both launch modes run the same lifecycle, ``Service.running()``: the CLI wraps
``hypercorn.trio.serve`` in it; under ``hypercorn`` the ASGI lifespan does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import trio
from confluent_kafka import Message

from .bots import Agents
from .config import ADMIN_PATHS, RELOADED, ConfigError, Settings, port_of
from .durable import Flight
from .geo import Countries, InvalidDatabaseError
from .group import group_directory, merge, read_members, serve_member
from .heap import settled
from .hits import Encoded, Enricher, Hit, record_id
from .kafka import KafkaSink
from .ledger import Ledger
from .limits import ConnectionGate
from .metrics import Metrics
from .pipeline import Admission, Pipeline, open_pipeline
from .replay import Replayer, journal_options
from .routing import Clients, routing_warnings
from .rules import RuleTable
from .spill import Journal, JournalError, Placement, Spill
from .topics import TopicWatch

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_RECORDS_LOST = 3


class _LiveReports:
    """The live producer's reports: delivered into the ledger, undelivered to the
    journal, refused counted failed. Records written ahead (tagged with their
    ``Placement``) are settled in the journal, or left there for a replay; a
    ``Flight``'s go through the flight. Runs in the reporting thread."""

    def __init__(self, ledger: Ledger, spill: Spill, metrics: Metrics) -> None:
        self._ledger = ledger
        self._spill = spill
        self._latency = metrics.delivery_latency

    def delivered(self, message: Message, tag: object) -> None:
        latency = message.latency()
        if latency is not None:
            self._latency.observe(latency)
        if isinstance(tag, Flight):
            tag.delivered(message)
            return
        self._ledger.add_delivered()
        if isinstance(tag, Placement):
            tag.settle([record_id(message.value() or b"")])

    def acknowledged(self, count: int, waits: list[tuple[float, int]]) -> None:
        """Records of untagged batches acknowledged, counted by the sink
        (durability "memory"), and how long each settled batch took."""
        if count:
            self._ledger.add_delivered(count)
        self._latency.observe_many(waits)

    def undelivered(self, records: list[Encoded], why: str, tag: object) -> None:
        if isinstance(tag, Flight):
            tag.undelivered(records, why)
        elif isinstance(tag, Placement):  # in the journal already
            tag.leave(len(records), self._ledger)
        else:
            self._spill.keep(records, why)

    def refused(self, records: list[Encoded], why: str, tag: object) -> None:
        log.error("%d records failed: %s", len(records), why)
        if isinstance(tag, Flight):
            tag.refused(records)
            return
        self._ledger.add_failed(len(records))
        if isinstance(tag, Placement):
            tag.settle([record_id(record.value) for record in records])

    def served(self) -> None:
        if self._spill.journal is not None:
            self._spill.journal.flush_marks()


def _pixel_path(settings: Settings) -> str | None:
    """The path the pixel answers, or None when it is off."""
    return settings.pixel.path if settings.pixel.enabled else None


class Service:
    """State shared by the request path, the admin routes and the lifecycle."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rules = RuleTable.from_settings(settings)
        self.pixel_path = _pixel_path(settings)
        self.ledger = Ledger()
        agents = Agents()  # parsed User-Agents, shared by the bot flag and the routes
        self.enricher = Enricher(
            settings.records,
            settings.server,
            settings.rules,
            settings.fallback.topic,
            settings.redirects.no_track_param,
            settings.collect.topic,
            agents,
            settings.collect.bad_topic,
        )
        self.clients = Clients(agents, settings.records, settings.server, self.enricher.client_ip)
        self._use_countries(settings.records.geoip_database)
        for warning in routing_warnings(settings.rules):
            log.warning("%s", warning)
        # Which topics the config writes to are missing (checked once the producer runs).
        self.topics = TopicWatch(lambda: self.settings.topics(), self._topic_names)
        self.metrics = Metrics(self.ledger, self._gauges, self.topics.gauge)
        self.metrics.choices.configure(settings.rules)
        self.pipeline: Pipeline | None = None
        self.sink: KafkaSink | None = None
        self.spill = Spill(None, self.ledger)  # gets its journal in create_sink()
        self.replayer: Replayer | None = None
        self.draining = False
        self.binds: list[str] = []  # addresses served, once listening
        self.admin_binds: list[str] = []
        self._member: Path | None = None  # this worker's socket in its group's directory
        # Local ports that serve only the admin endpoints; None: admin on every port.
        admin = settings.server.admin_bind
        self.admin_ports = frozenset(port_of(b) for b in admin) if admin else None
        refused, closed = self.metrics.connections_refused, self.metrics.connections_closed
        self.connections = ConnectionGate(
            settings.server,
            lambda reason: refused.labels(reason).inc(),
            self.admin_ports,
            self.metrics.h2_streams_refused.inc,
            lambda reason: closed.labels(reason).inc(),
        )

    def use_rules(self, settings: Settings) -> None:
        """Swap in the ``[[rules]]``, ``[fallback]``, ``[redirects]`` and
        ``[pixel]`` and ``records.geoip_database`` (reopened) of newly loaded
        settings: one assignment each for the request path, so a request sees
        the old table or the new one, never a mix. The other tables need a
        restart; a change to them is logged and not applied. Raises ConfigError,
        changing nothing, when the new rules contradict the tables in use (a
        rule on the collect path in use, say)."""
        old = self.settings
        merged = old.with_rules_of(settings)
        table = RuleTable.from_settings(merged)
        self._use_countries(merged.records.geoip_database)
        self.enricher.use_rules(
            merged.rules, merged.fallback.topic, merged.redirects.no_track_param
        )
        self.rules = table
        self.pixel_path = _pixel_path(merged)
        self.metrics.choices.configure(merged.rules)
        restart = [
            name
            for name in type(old).model_fields
            if name not in RELOADED
            and getattr(merged if name == "records" else old, name) != getattr(settings, name)
        ]
        if (
            "server" in restart
            and old.server.model_copy(update={"bind": settings.server.bind}) == settings.server
        ):
            restart.remove("server")  # only bind differs, e.g. serve --bind
        self.settings = merged
        self.topics.suspect()  # the rules may write to other topics now
        for warning in routing_warnings(merged.rules):
            log.warning("%s", warning)
        log.info("rules reloaded: %d rules", len(settings.rules))
        if restart:
            log.warning("changed, but applied only at the next start: [%s]", "], [".join(restart))

    def _use_countries(self, path: str | None) -> None:
        """Open ``records.geoip_database`` (again: a reload picks up a file
        replaced in place) for the records and the routes. Raises ConfigError
        naming the key, keeping the database in use, when it cannot be read."""
        countries = None
        if path is not None:
            try:
                countries = Countries(path)
            except (OSError, ValueError, InvalidDatabaseError) as exc:
                raise ConfigError(f"records.geoip_database: {path!r}: {exc}") from exc
        old = self.clients.countries
        self.clients.countries = self.enricher.countries = countries
        if old is not None:
            old.close()

    def listening(self, binds: list[str]) -> None:
        """Record the bound addresses (``server.bind`` first, then ``admin_bind``),
        learning the admin ports chosen by the system for port 0."""
        count = len(self.settings.server.bind)
        self.binds, self.admin_binds = binds[:count], binds[count:]
        if self.admin_binds:
            self.admin_ports = frozenset(port_of(b) for b in self.admin_binds)
            self.connections.admin_ports = self.admin_ports

    def is_admin(self, scope: dict[str, Any]) -> bool:
        """Whether an HTTP request is for the admin endpoints (by path and local port)."""
        if self.admin_ports is None:
            return scope["path"] in ADMIN_PATHS
        server = scope.get("server")
        return server is not None and server[1] in self.admin_ports

    def readiness(self, *, kafka: bool = True) -> str | None:
        """None when ready to take traffic, else why not. Without ``kafka``
        only starting and draining count: the producer's state and missing
        topics do not."""
        if self.draining:
            return "draining"
        if self.pipeline is None or self.sink is None:
            return "starting"
        if not kafka:
            return None
        if self.sink.fatal_error is not None:
            return f"producer failed: {self.sink.fatal_error}"
        if not self.sink.reachable:
            return "no Kafka broker reachable"
        return self.topics.reason()

    def in_flight(self) -> int:
        return self.pipeline.in_flight() if self.pipeline is not None else 0

    async def admit(self, hit: Hit) -> Admission:
        """Hand a redirect's hit to the pipeline (``Intake.submit``): what to
        answer, once ``records.durability`` holds. Before the pipeline runs,
        nothing can be recorded: counted shed, answered 503."""
        pipeline = self.pipeline
        if pipeline is None:
            self._shed_unstarted(1)
            return Admission.SHED
        return await pipeline.intake.submit(hit)

    async def admit_all(self, hits: Sequence[Hit]) -> tuple[int, Admission]:
        """Hand a collect request's events to the pipeline (``Intake.submit_all``):
        how many are recorded, and what to answer."""
        pipeline = self.pipeline
        if pipeline is None:
            self._shed_unstarted(len(hits))
            return 0, Admission.SHED
        return await pipeline.intake.submit_all(hits)

    def _shed_unstarted(self, count: int) -> None:
        self.ledger.received += count
        self.ledger.add_shed(count)

    def ledger_snapshot(self) -> dict[str, int]:
        return self.ledger.snapshot(self.in_flight())

    def _gauges(self) -> dict[str, float]:
        pipeline, sink = self.pipeline, self.sink
        return {
            "in_flight": self.in_flight(),
            "queue_depth": pipeline.queue_depth() if pipeline else 0,
            "queue_capacity": self.settings.records.queue_size,
            "bytes_in_flight": pipeline.budget.held if pipeline else 0,
            "producer_queue": sink.queued() if sink else 0,
            "ready": 1 if self.readiness() is None else 0,
            "broker_reachable": 1 if sink is not None and sink.reachable else 0,
            "spill_bytes": self.spill.journal.size if self.spill.journal is not None else 0,
            "producer_rebuilds": sink.rebuilds if sink else 0,
            "workers": 1,
            "connections": self.connections.open,
        }

    async def exposition(self) -> bytes:
        """``/metrics``: this process's metrics, or its group's summed
        (``group.py``) when it is one of several workers."""
        own = self.metrics.exposition()
        member = self._member
        if member is None:
            return own
        others = await read_members(member.parent, member)
        if not others:
            return own
        return await trio.to_thread.run_sync(merge, [own, *others])

    def _topic_names(self, wanted: list[str], timeout: float) -> set[str] | None:
        """The topics that exist (``KafkaSink.topic_names``); None before the
        producer exists. Runs in a thread."""
        sink = self.sink
        return None if sink is None else sink.topic_names(wanted, timeout)

    def create_sink(self) -> KafkaSink:
        """The producer, the spill journal and the replayer (created once).

        Raises ConfigError if librdkafka refuses ``[kafka]`` or the spill
        directory cannot be used.
        """
        if self.sink is not None:
            return self.sink
        settings = self.settings
        if settings.spill.enabled and self.spill.journal is None:
            try:
                journal = Journal.claim_slot(
                    Path(settings.spill.directory), **journal_options(settings.spill)
                )
            except JournalError as exc:
                raise ConfigError(f"spill.directory: {exc}") from exc
            self.spill.journal = journal
            log.info("spill journal %s (%d bytes waiting)", journal.directory, journal.size)
        reports = _LiveReports(self.ledger, self.spill, self.metrics)
        # Under "memory" no batch is tagged: the sink counts acknowledgements.
        counting = settings.records.durability == "memory"
        self.sink = KafkaSink(
            settings.kafka,
            reports,
            unknown_topic=self.topics.suspect,
            acknowledged=reports.acknowledged if counting else None,
        )
        if settings.spill.enabled:
            self.replayer = Replayer(
                settings.kafka,
                settings.spill,
                self.ledger,
                self.spill.journal,
                rate=settings.spill.replay_rate,
            )
        return self.sink

    def close_journal(self) -> None:
        if self.spill.journal is not None:
            self.spill.journal.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run the producer and pipeline around the body, then drain and flush.

        On exit readiness is false, every record is delivered or counted, and
        the ledger is logged. Raises ConfigError if librdkafka refuses ``[kafka]``.
        """
        settings = self.settings
        sink = self.create_sink()
        replayer = self.replayer
        background: list[Callable[[], Awaitable[None]]] = [self.topics.run]
        if replayer is not None:
            # No replay while a topic is missing: it would fail, and back off
            # for up to a minute after the topic is created.
            background.append(
                partial(replayer.run, lambda: sink.reachable and not self.topics.missing)
            )
        spill_after = settings.spill.queue_full_timeout if settings.spill.enabled else None
        stack = ExitStack()  # what start-up built stays frozen until the drain ends
        try:
            async with trio.open_nursery() as group:  # serves the metrics through the drain
                async with open_pipeline(
                    settings.records,
                    settings.shutdown.flush_timeout,
                    sink,
                    self.spill,
                    self.enricher.encode,
                    self.ledger,
                    observe_batch=self.metrics.batch_size.observe,
                    spill_after=spill_after,
                    background=background,
                    stopping=replayer.stop if replayer is not None else None,
                    max_bytes_in_flight=settings.collect.max_bytes_in_flight,
                ) as pipeline:
                    self.pipeline = pipeline
                    await self._join_group(group)
                    stack.enter_context(settled())
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
                group.cancel_scope.cancel()
        finally:  # also when the pipeline itself failed
            stack.close()
            self.draining = True
            with trio.CancelScope(shield=True):  # its last fsync, off the Trio thread
                await trio.to_thread.run_sync(self.close_journal)
            snapshot = self.ledger_snapshot()
            level = logging.INFO if self.exit_code() == EXIT_OK else logging.ERROR
            log.log(level, "ledger %s", orjson.dumps(snapshot).decode(), extra={"ledger": snapshot})
            journal = self.spill.journal
            if journal is not None and journal.size:
                log.warning(
                    "%d bytes of records wait in %s for replay (at the next start, or "
                    "redirect-logger replay)",
                    journal.size,
                    journal.directory,
                )

    async def _join_group(self, nursery: trio.Nursery) -> None:
        """Serve this worker's metrics to its group, if it has one; a directory
        that cannot be used leaves the scrapes of this worker its own."""
        directory = group_directory()
        if directory is None:
            return
        try:
            self._member = await nursery.start(serve_member, directory, self.metrics.exposition)
        except OSError as exc:
            log.error("metrics stay this worker's own: group directory %s: %s", directory, exc)

    def exit_code(self) -> int:
        """0 when every received record was delivered, journaled, or dropped/shed
        by policy (``when_full``, ``spill.max_bytes``); 3 when any failed."""
        if self.ledger.failed or self.in_flight():
            return EXIT_RECORDS_LOST
        return EXIT_OK
