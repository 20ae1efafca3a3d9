from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from brokers import Broker, KafkaBroker, KafkaCluster, start_broker

# Property tests check what an answer says, not how fast it comes: no
# per-example deadline (hypothesis' 200 ms fails on a loaded machine).
settings.register_profile("redirect-logger", deadline=None)
settings.load_profile("redirect-logger")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One real broker for the session (see tests/brokers.py); failing to start fails."""
    started = start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def kafka_broker(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Apache Kafka (or the external cluster), whatever REDIRECT_LOGGER_TEST_BROKER says.

    For the zero-loss tests under load: the embedded broker loses acknowledged
    records under sustained produce load (one idempotent producer, 20,000
    records to one partition: 20,000 acknowledged, 11,000 readable; two
    producers, 6,000 each: 12,000 acknowledged, 7,000 readable).
    """
    if broker.kind in ("kafka", "external"):
        yield broker
        return
    started = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[KafkaBroker]:
    """Apache Kafka of the test's own, formatted but not started: the test
    starts, kills and restarts it (same ports, same data directory)."""
    (tmp_path / "kafka").mkdir()
    started = KafkaBroker(tmp_path / "kafka", start=False)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def kafka_cluster(tmp_path: Path) -> Iterator[KafkaCluster]:
    """Three Apache Kafka nodes of the test's own, started: the test stops,
    kills and restarts nodes, so no two tests share a cluster."""
    (tmp_path / "cluster").mkdir()
    started = KafkaCluster(tmp_path / "cluster")
    try:
        yield started
    finally:
        started.close()
