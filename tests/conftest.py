from __future__ import annotations

from collections.abc import Iterator

import pytest

from brokers import Broker, KafkaBroker, start_broker


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
