"""Count clicks per rule from redirect_logger's topics, each record once.

A sample consumer (docs/consuming.md). It reads every partition of the
topics from the beginning to the end it has when the run starts, keeps the
first record of each ``id`` and drops the copies, and prints one JSON object:

    {"records": 10, "duplicates": 1, "clicks": {"docs": 3, "home": 2},
     "bots": {"docs": 1}, "untracked": {"docs": 1}, "misses": 1, "events": 1}

- ``clicks``: redirects by rule name (``(fallback)`` for a redirecting
  fallback), without bots and without no-track hits;
- ``bots``: redirects whose record says ``"bot": true``, by rule;
- ``untracked``: redirects with ``"tracked": false`` (``redirects.no_track_param``), by rule;
- ``misses``: 404 answers; ``events``: collect events;
- ``records``: messages read; ``duplicates``: those whose ``id`` came before.

With the service's config file it reads every topic the service can write
to (as ``redirect-logger tail --all-topics``) with its ``[kafka]``
properties; this needs the ``redirect_logger`` package. Without it, name the
brokers and topics; then only ``confluent-kafka`` is needed:

    python docs/examples/consume.py --config /etc/redirect-logger.toml
    python docs/examples/consume.py --bootstrap-servers kafka-1:9092 \\
        --topic redirect-hits --topic site-events -X security.protocol=SSL

Exit codes: 0 when every partition was read to its end; 1 when that did
not happen within ``--timeout`` seconds (the counts so far are printed) or
Kafka failed; 2 on invalid usage or an invalid config file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections import Counter
from typing import Any, NoReturn

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

FALLBACK = "(fallback)"  # the name /metrics gives the fallback too


class ClickCounts:
    """Counts of records, each ``id`` counted once."""

    def __init__(self) -> None:
        # Every id seen. A long-running consumer keeps a bounded window
        # instead: see docs/consuming.md#duplicates.
        self.seen: set[str] = set()
        self.records = 0
        self.duplicates = 0
        self.clicks: Counter[str] = Counter()
        self.bots: Counter[str] = Counter()
        self.untracked: Counter[str] = Counter()
        self.misses = 0
        self.events = 0

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        if record["id"] in self.seen:
            self.duplicates += 1
            return
        self.seen.add(record["id"])
        kind = record.get("kind")
        if kind is None:  # the earliest version-1 records have no kind
            kind = "miss" if record.get("location") is None else "redirect"
        if kind == "event":
            self.events += 1
        elif kind == "miss":
            self.misses += 1
        elif kind == "redirect":  # a kind this sample does not know is passed over
            rule = record["rule"] if record["rule"] is not None else FALLBACK
            if record.get("tracked") is False:
                self.untracked[rule] += 1
            elif record.get("bot") is True:
                self.bots[rule] += 1
            else:
                self.clicks[rule] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "duplicates": self.duplicates,
            "clicks": dict(sorted(self.clicks.items())),
            "bots": dict(sorted(self.bots.items())),
            "untracked": dict(sorted(self.untracked.items())),
            "misses": self.misses,
            "events": self.events,
        }


def refuse(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def connection(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The consumer's librdkafka properties and the topics to read."""
    if args.config is not None:
        from redirect_logger.config import ConfigError, load_settings

        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            refuse(str(exc))
        return settings.consumer_kafka(), args.topic or settings.topics()
    if not args.topic:
        refuse("--topic is required with --bootstrap-servers")
    properties: dict[str, Any] = {"bootstrap.servers": args.bootstrap_servers}
    for option in args.property:
        key, equals, value = option.partition("=")
        if not equals:
            refuse(f"-X {option}: expected KEY=VALUE")
        properties[key] = value
    return properties, args.topic


def partitions(consumer: Consumer, topics: list[str], timeout: float) -> list[TopicPartition]:
    """Every partition of the topics that holds records, each with its end
    offset now (as ``offset``). A topic that does not exist is named on
    stderr and left out."""
    metadata = consumer.list_topics(timeout=timeout).topics
    found = []
    for topic in dict.fromkeys(topics):
        if topic not in metadata or metadata[topic].error is not None:
            print(f"warning: topic {topic} does not exist; skipped", file=sys.stderr)
            continue
        for partition in sorted(metadata[topic].partitions):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
            if high > low:
                found.append(TopicPartition(topic, partition, high))
    return found


def count(consumer: Consumer, topics: list[str], timeout: float) -> tuple[ClickCounts, bool]:
    """Read the topics from the beginning to their ends; the counts, and
    whether every end was reached within ``timeout`` s."""
    give_up = time.monotonic() + timeout
    counts = ClickCounts()
    ends = {(p.topic, p.partition): p.offset for p in partitions(consumer, topics, timeout)}
    consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in ends])
    while ends and time.monotonic() < give_up:
        for message in consumer.consume(500, 0.5):
            error, value, offset = message.error(), message.value(), message.offset()
            if error is not None:
                print(f"error: {error.str()}", file=sys.stderr)
                continue
            place = (message.topic(), message.partition())
            if place not in ends or value is None or offset is None:
                continue  # past its end: counted in the next run
            counts.add(json.loads(value))
            if offset + 1 >= ends[place]:
                del ends[place]
    return counts, not ends


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="the service's config file: its topics and [kafka]")
    source.add_argument("--bootstrap-servers", help="Kafka brokers, host:port[,host:port]")
    parser.add_argument("--topic", action="append", default=[], help="a topic to read (repeatable)")
    parser.add_argument(
        "-X", dest="property", action="append", default=[], metavar="KEY=VALUE",
        help="a librdkafka property (repeatable), with --bootstrap-servers",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    args = parser.parse_args(argv)
    properties, topics = connection(args)
    consumer = Consumer(
        {
            **properties,
            "group.id": f"redirect-logger-consume-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        counts, whole = count(consumer, topics, args.timeout)
    except KafkaException as exc:
        print(f"error: {exc.args[0].str()}", file=sys.stderr)
        return 1
    finally:
        consumer.close()
    print(json.dumps(counts.summary()))
    if not whole:
        print(f"error: the topics were not read to their ends within {args.timeout} s",
              file=sys.stderr)  # fmt: skip
    return 0 if whole else 1


if __name__ == "__main__":
    sys.exit(main())
