"""Failover on a replicated cluster: three Apache Kafka nodes, a topic with
replication factor 3 and min.insync.replicas 2, the producer idempotent with
acks=all (the defaults).

Each test drives the service (the CLI) under load, takes nodes away, and
checks by record id that every answered hit is in the topic exactly once,
and that the service's ledger adds up. The redirect latency around each fault
is printed for docs/benchmarks.md, not asserted: it depends on the machine.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
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
    wait_ready,
    write_config,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.cluster]

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


OUTCOME_RE = re.compile(r'^redirect_logger_records_total\{outcome="(\w+)"\} (\S+)$', re.M)


async def _until_replayed(url: str) -> None:
    """Until /metrics shows every spilled record replayed. (Under durability
    "kafka" the journal's active segment stays until shutdown, settled.)"""
    async with httpx.AsyncClient(base_url=url) as http:
        while True:
            metrics = (await http.get("/metrics")).text
            counts = {name: float(value) for name, value in OUTCOME_RE.findall(metrics)}
            if counts["replayed"] >= counts["spilled"]:
                return
            await trio.sleep(0.5)


async def _every_hit_once(
    service: ServiceProcess,
    url: str,
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
    with trio.fail_after(90):
        await _until_replayed(url)
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


async def _started(
    cluster: KafkaCluster, tmp_path: Path, **tables: Any
) -> tuple[str, ServiceProcess, str]:
    """A new topic (RF 3, min ISR 2) and the service on it, ready: (topic, service, URL)."""
    topic = unique_topic()
    await trio.to_thread.run_sync(cluster.create_topic, topic)
    service = ServiceProcess.cli(_config(cluster, topic, tmp_path, **tables))
    try:
        url = await trio.to_thread.run_sync(service.url)
        await wait_ready(url)
    except BaseException:
        service.kill_group()
        raise
    return topic, service, url


@pytest.mark.parametrize("durability", ["memory", "kafka"])
async def test_the_partition_leader_sigkilled_under_load_costs_no_hit_and_no_duplicate(
    kafka_cluster: KafkaCluster, tmp_path: Path, durability: str
) -> None:
    """SIGKILL of the node that leads partition 0: its partitions get new
    leaders among the in-sync followers once the controller has fenced it
    (broker.session.timeout.ms, 9 s); what librdkafka had sent to the dead
    leader is sent again to the new one and deduplicated by the idempotent
    producer. Every answered hit is in the topic once. Under "kafka" an
    answer waits for acks=all, or for records.ack_timeout (2 s) and the
    journal."""
    topic, service, url = await _started(
        kafka_cluster, tmp_path, records={"durability": durability}
    )
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
        name = f"leader killed, {durability}"
        print(f"node {leader.node_id} killed; partition 0 led by another after {moved:.1f} s")
        _print_windows(
            name,
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
        spill = tmp_path / "spill"
        await _every_hit_once(service, url, kafka_cluster, topic, answered, spill, name)
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


async def test_two_of_three_nodes_down_then_one_back_delivers_every_hit_once(
    kafka_cluster: KafkaCluster, tmp_path: Path
) -> None:
    """Two nodes SIGKILLed: below min.insync.replicas, and the controller
    quorum lost with them (no election, no ISR change), so no write is
    acknowledged. librdkafka holds what its queue takes and retries it (its
    errors, NOT_ENOUGH_REPLICAS or a request timeout, are retriable, and
    message.timeout.ms, 300 s, outlasts the outage); the rest is journaled.
    Once one node is back, delivery resumes, the running service replays its
    journal with the ids kept, and every answered hit is in the topic
    exactly once."""
    topic, service, url = await _started(
        kafka_cluster, tmp_path, kafka={"queue.buffering.max.messages": 1000}
    )
    answered: dict[str, float] = {}
    sent: dict[str, float] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: redirects([url], answered, seconds=24.0, clients=CLIENTS, sent=sent)
            )
            await trio.sleep(4.0)
            first = await trio.to_thread.run_sync(kafka_cluster.leader, topic, 0)
            second = next(node for node in kafka_cluster.nodes if node is not first)
            down_at = time.perf_counter()
            await trio.to_thread.run_sync(first.kill)
            await trio.to_thread.run_sync(second.kill)
            await trio.sleep(12.0)
            back_at = time.perf_counter()
            await trio.to_thread.run_sync(first.start)
            ready_at = time.perf_counter()
        print(
            f"nodes {first.node_id} and {second.node_id} killed; node {first.node_id} started"
            f" {back_at - down_at:.1f} s later, a live broker after {ready_at - back_at:.1f} s"
        )
        _print_windows(
            "two of three down",
            answered,
            {
                "before": _window(answered, sent, 0.0, down_at),
                "two nodes down": _window(answered, sent, down_at, back_at),
                "one back": _window(answered, sent, back_at, float("inf")),
            },
        )
        ledger = await _every_hit_once(
            service, url, kafka_cluster, topic, answered, tmp_path / "spill", "two of three down"
        )
    finally:
        service.kill_group()
    assert ledger["spilled"] > 0, ledger  # the outage outgrew librdkafka's queue


async def test_a_rolling_restart_under_load_delivers_every_hit_once(
    kafka_cluster: KafkaCluster, tmp_path: Path
) -> None:
    """Each node in turn is stopped (SIGTERM: a controlled shutdown moves its
    leaderships first), started again and awaited back in every partition's
    ISR before the next. Every answered hit is in the topic exactly once."""
    topic, service, url = await _started(kafka_cluster, tmp_path)
    answered: dict[str, float] = {}
    sent: dict[str, float] = {}
    restarts: dict[str, tuple[float, float]] = {}
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: redirects(
                    [url], answered, seconds=150.0, clients=CLIENTS, sent=sent, until=done
                )
            )
            await trio.sleep(4.0)
            for node in kafka_cluster.nodes:
                began = time.perf_counter()
                await trio.to_thread.run_sync(node.stop)
                stopped = time.perf_counter()
                assert node.process is not None
                code = node.process.returncode
                assert code != -signal.SIGKILL, "no controlled shutdown within 20 s"
                await trio.to_thread.run_sync(node.start)
                deadline = time.monotonic() + 60
                await trio.to_thread.run_sync(
                    kafka_cluster.wait_in_sync, topic, deadline, [node.node_id]
                )
                restarts[f"node {node.node_id} restarting"] = (began, time.perf_counter())
                print(
                    f"node {node.node_id}: stopped in {stopped - began:.1f} s (exit {code}),"
                    f" back in sync {time.perf_counter() - stopped:.1f} s later"
                )
            await trio.sleep(3.0)
            done.set()
        _print_windows(
            "rolling restart",
            answered,
            {label: _window(answered, sent, *span) for label, span in restarts.items()},
        )
        await _every_hit_once(
            service, url, kafka_cluster, topic, answered, tmp_path / "spill", "rolling restart"
        )
    finally:
        service.kill_group()
