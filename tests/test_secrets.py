"""SASL/PLAIN against Apache Kafka, and secrets that never appear in any output."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import trio

from brokers import SASL_PASSWORD, SASL_USER, Broker
from support import (
    ServiceProcess,
    ledger_counts,
    read_topic,
    service_config,
    unique_topic,
    write_config,
)


def sasl_config(broker: Broker, topic: str, password: str) -> dict[str, object]:
    sasl_bootstrap = getattr(broker, "sasl_bootstrap", None)
    assert sasl_bootstrap, "the SASL tests need the Apache Kafka test broker"
    return service_config(
        sasl_bootstrap,
        topic,
        kafka={
            "bootstrap.servers": sasl_bootstrap,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanisms": "PLAIN",
            "sasl.username": SASL_USER,
            "sasl.password": password,
        },
        shutdown={"flush_timeout": 2.0},
    )


async def _requests(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url) as client:
        return [await client.get(f"/docs/sasl{n}") for n in range(count)]


async def test_sasl_plain_delivers_and_the_password_is_never_printed(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    topic = unique_topic()
    config = write_config(tmp_path / "c.toml", sasl_config(kafka_broker, topic, SASL_PASSWORD))
    check = await trio.run_process(
        [sys.executable, "-m", "redirect_logger.cli", "check", "--config", str(config)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    check_output = (check.stdout + check.stderr).decode()
    assert '"sasl.password": "***"' in check_output
    service = ServiceProcess.cli(config, env={"REDIRECT_LOGGER_LOG_LEVEL": "DEBUG"})
    try:
        url = await trio.to_thread.run_sync(service.url)
        responses = await _requests(url, 5)
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    assert [r.status_code for r in responses] == [301] * 5
    records = await trio.to_thread.run_sync(
        lambda: read_topic(kafka_broker.bootstrap, topic, expected=5)
    )
    assert sorted(r["id"] for r in records) == sorted(r.headers["x-hit-id"] for r in responses)
    for output in (check_output, service.output):
        assert SASL_PASSWORD not in output


async def test_a_wrong_password_is_not_ready_and_never_printed(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    wrong = "wrong-pw-5f2a9b-never-logged"
    config = write_config(tmp_path / "c.toml", sasl_config(kafka_broker, unique_topic(), wrong))
    service = ServiceProcess.cli(config, env={"REDIRECT_LOGGER_LOG_LEVEL": "DEBUG"})
    try:
        url = await trio.to_thread.run_sync(service.url)
        responses = await _requests(url, 3)
        await trio.sleep(2.5)  # librdkafka reports broker states every second
        async with httpx.AsyncClient(base_url=url) as client:
            ready = await client.get("/readyz")
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert [r.status_code for r in responses] == [301] * 3
    assert (ready.status_code, ready.text) == (503, "not ready: no Kafka broker reachable\n")
    assert code == 0, service.output  # nothing lost: journaled for a replay
    assert "Authentication failed" in service.output
    assert wrong not in service.output
    assert service.ledgers() == [ledger_counts(received=3, spilled=3)]


async def test_a_password_from_the_environment_delivers_and_is_never_printed(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """``"sasl.password" = "${…}"``: check masks it, and the service logs it
    nowhere, in JSON lines at DEBUG either."""
    topic = unique_topic()
    config = sasl_config(kafka_broker, topic, "${RL_TEST_SASL_PASSWORD}")
    config["logging"] = {"format": "json", "level": "DEBUG"}
    path = write_config(tmp_path / "c.toml", config)
    env = {"RL_TEST_SASL_PASSWORD": SASL_PASSWORD}
    check = await trio.run_process(
        [sys.executable, "-m", "redirect_logger.cli", "check", "--config", str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, **env},
    )
    assert check.returncode == 0, check.stderr
    check_output = (check.stdout + check.stderr).decode()
    assert json.loads(check.stdout)["kafka"]["sasl.password"] == "***"
    service = ServiceProcess.cli(path, env=env)
    try:
        url = await trio.to_thread.run_sync(service.url)
        responses = await _requests(url, 3)
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    records = await trio.to_thread.run_sync(
        lambda: read_topic(kafka_broker.bootstrap, topic, expected=3)
    )
    assert sorted(r["id"] for r in records) == sorted(r.headers["x-hit-id"] for r in responses)
    lines = [json.loads(line) for line in service.lines]  # every line JSON, Hypercorn's too
    ledger = [line["ledger"] for line in lines if line["message"].startswith("ledger ")]
    assert ledger == [ledger_counts(received=3, delivered=3)]
    for output in (check_output, service.output):
        assert SASL_PASSWORD not in output
