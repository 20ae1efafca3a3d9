"""Failover on a replicated cluster: three Apache Kafka nodes, a topic with
replication factor 3 and min.insync.replicas 2, the producer idempotent with
acks=all (the defaults).

Each test drives the service (the CLI) under load, takes nodes away, and
checks by record id that every answered hit is in the topic exactly once,
and that the service's ledger adds up. The redirect latency around each fault
is printed for docs/operations.md, not asserted: it depends on the machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from confluent_kafka import KafkaException

from brokers import KafkaCluster, KafkaNode
from support import (
    ServiceProcess,
    latency_figures,
    redirects,
    report_ids,
    service_config,
    topic_ids,
    unique_topic,
    until_replayed,
    wait_ready,
    write_config,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

CLIENTS = 6
KAFKA_QUEUE = 2_000  # queue.buffering.max.messages: an outage soon outgrows it
WINDOW = 5.0  # s after a fault whose redirects count as "during the failover"


def _config(cluster: KafkaCluster, topic: str, tmp_path: Path, **tables: Any) -> Path:
    base: dict[str, Any] = {
        # by path: the hits spread over the three partitions (by client_ip,
        # all of them from 127.0.0.1, they would go to one)
        "records": {"key": "path", "queue_size": 2_000, "batch_size": 200},
        "kafka": {"queue.buffering.max.messages": KAFKA_QUEUE},
        "spill": {"directory": str(tmp_path / "spill")},
        "shutdown": {"flush_timeout": 5.0, "grace_period": 15.0},
    }
    for table, body in tables.items():
        base[table] = {**base.get(table, {}), **body}
    return write_config(tmp_path / "c.toml", service_config(cluster.bootstrap, topic, **base))


def _window(
    answered: dict[str, float], sent: dict[str, float], start: float, end: float
) -> list[float]:
    """The latencies of the redirects sent in [start, end) (perf_counter)."""
    return [answered[hit] for hit, at in sent.items() if start <= at < end]


def _print_windows(name: str, answered: dict[str, float], windows: dict[str, list[float]]) -> None:
    print(f"{name}: {len(answered)} redirects ({latency_figures(list(answered.values()))})")
    for label, latencies in windows.items():
        print(f"  {label}: {len(latencies)} redirects ({latency_figures(latencies)})")


async def _every_hit_once(
    service: ServiceProcess,
    cluster: KafkaCluster,
    topic: str,
    answered: dict[str, float],
    spill: Path,
    name: str,
) -> dict[str, int]:
    """Once the topic holds every answered id and the journal is replayed,
    SIGTERM the service; the topic holds each answered id exactly once and
    nothing else, and the ledger adds up with nothing lost. Returns the ledger."""
    await trio.to_thread.run_sync(topic_ids, cluster.bootstrap, topic, set(answered))
    await trio.to_thread.run_sync(until_replayed, spill)
    code = await trio.to_thread.run_sync(service.terminate)
    ids = await trio.to_thread.run_sync(topic_ids, cluster.bootstrap, topic, set(answered), 30.0)
    missing, duplicates = report_ids(name, answered, ids)
    assert code == 0, service.output
    [ledger] = service.ledgers()
    print(f"{name}: ledger {ledger}")
    assert (missing, duplicates) == (0, 0)
    assert set(ids) == set(answered)  # and nothing else
    assert ledger["received"] == len(answered), ledger
    assert ledger["received"] == sum(
        ledger[field]
        for field in ("delivered", "spilled", "failed", "dropped", "shed", "excluded", "in_flight")
    ), ledger
    assert ledger["failed"] == ledger["dropped"] == ledger["shed"] == ledger["in_flight"] == 0
    assert ledger["replayed"] == ledger["spilled"], ledger  # by this process, ids kept
    left = await trio.to_thread.run_sync(lambda: list(spill.glob("slot-*/segment-*.log")))
    assert not left, f"journal not emptied: {left}"
    return ledger


async def _started(config: Path) -> tuple[ServiceProcess, str]:
    service = ServiceProcess.cli(config)
    try:
        url = await trio.to_thread.run_sync(service.url)
        await wait_ready(url)
    except BaseException:
        service.kill_group()
        raise
    return service, url


async def test_the_partition_leader_sigkilled_under_load_costs_no_hit_and_no_duplicate(
    kafka_cluster: KafkaCluster, tmp_path: Path
) -> None:
    """SIGKILL of the node that leads partition 0: its partitions get new
    leaders among the in-sync followers; what librdkafka had sent to the dead
    leader is sent again to the new one and deduplicated by the idempotent
    producer. Every answered hit is in the topic once."""
    topic = unique_topic()
    await trio.to_thread.run_sync(kafka_cluster.create_topic, topic)
    service, url = await _started(_config(kafka_cluster, topic, tmp_path))
    answered: dict[str, float] = {}
    sent: dict[str, float] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: redirects([url], answered, seconds=18.0, clients=CLIENTS, sent=sent)
            )
            await trio.sleep(8.0)
            leader = await trio.to_thread.run_sync(kafka_cluster.leader, topic, 0)
            killed_at = time.perf_counter()
            await trio.to_thread.run_sync(leader.kill)
            moved = await trio.to_thread.run_sync(_new_leader, kafka_cluster, topic, leader)
        print(f"node {leader.node_id} killed; partition 0 led by another after {moved:.1f} s")
        _print_windows(
            "leader killed",
            answered,
            {
                f"the {WINDOW:.0f} s before the kill": _window(
                    answered, sent, killed_at - WINDOW, killed_at
                ),
                f"the {WINDOW:.0f} s after it": _window(
                    answered, sent, killed_at, killed_at + WINDOW
                ),
                "from then on": _window(answered, sent, killed_at + WINDOW, float("inf")),
            },
        )
        await _every_hit_once(
            service, kafka_cluster, topic, answered, tmp_path / "spill", "leader killed"
        )
    finally:
        service.kill_group()


def _new_leader(cluster: KafkaCluster, topic: str, old: KafkaNode, timeout: float = 60.0) -> float:
    """Seconds until partition 0 is led by a node other than ``old``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if cluster.partitions(topic)[0].leader not in (old.node_id, -1):
                return time.monotonic() - started
        except KafkaException:  # no metadata from the remaining nodes yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"partition 0 of {topic} still without a new leader after {timeout} s")
