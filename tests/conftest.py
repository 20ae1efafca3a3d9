from __future__ import annotations

from collections.abc import Iterator

import pytest

from brokers import Broker, start_broker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One real broker for the session (see tests/brokers.py); failing to start fails."""
    started = start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield started
    finally:
        started.stop()
