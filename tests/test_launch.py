"""Both launch modes as real processes: SIGTERM under load loses no answered hit."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from brokers import Broker, free_port
from support import (
    BIND_RE,
    SIGNAL_CLIENTS,
    ServiceProcess,
    check_delivery,
    ledger_counts,
    read_topic,
    service_config,
    sigterm_under_load,
    unique_topic,
    unreachable_config,
    write_config,
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_cli_signal_under_load_delivers_every_answered_hit(
    kafka_broker: Broker, tmp_path: Path, signum: int
) -> None:
    """On Apache Kafka: under load the embedded broker loses acknowledged records."""
    broker = kafka_broker
    topic = unique_topic()
    config = write_config(tmp_path / "c.toml", service_config(broker.bootstrap, topic))
    service = ServiceProcess.cli(config)
    try:
        url = await trio.to_thread.run_sync(service.url)
        code, answered = await sigterm_under_load(service, [url], signum)
    finally:
        service.kill()
    assert code == 0, service.output
    await trio.to_thread.run_sync(check_delivery, broker, topic, service, answered, 1)


@pytest.mark.parametrize(("workers", "group"), [(0, False), (1, False), (2, False), (2, True)])
async def test_hypercorn_sigterm_under_load_delivers_every_answered_hit(
    kafka_broker: Broker, tmp_path: Path, workers: int, group: bool
) -> None:
    """SIGTERM to the master, or (``group``) to the whole process group as a supervisor does.

    On Apache Kafka: with two workers, two producers write to one partition.
    """
    broker = kafka_broker
    topic = unique_topic()
    config = write_config(tmp_path / "c.toml", service_config(broker.bootstrap, topic))
    service = ServiceProcess.hypercorn(config, workers)
    processes = max(workers, 1)
    try:
        urls = await trio.to_thread.run_sync(lambda: service.wait_for(BIND_RE, processes, 60))
        code, answered = await sigterm_under_load(service, urls, group=group)
    finally:
        service.kill()
    assert code == 0, service.output
    await trio.to_thread.run_sync(check_delivery, broker, topic, service, answered, processes)


@pytest.mark.parametrize(("mode", "workers"), [("cli", 0), ("hypercorn", 0), ("hypercorn", 1)])
async def test_losing_records_is_reported(tmp_path: Path, mode: str, workers: int) -> None:
    """Exit code 3 and an ERROR ledger line. Hypercorn's master (0.18) returns 0
    whatever its workers' exit codes, so with workers the ledger line is the report."""
    config = write_config(tmp_path / "c.toml", unreachable_config(spill={"enabled": False}))
    service = (
        ServiceProcess.cli(config) if mode == "cli" else ServiceProcess.hypercorn(config, workers)
    )
    try:
        url = await trio.to_thread.run_sync(service.url)
        async with httpx.AsyncClient(base_url=url) as client:
            statuses = [(await client.get("/")).status_code for _ in range(3)]
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert statuses == [302] * 3
    # With a master, Hypercorn 0.18 replaces its worker's 3 by 0 (docs/cli.md#under-hypercorn
    # says so and how to tell instead): should this fail, Hypercorn reports it now; update the doc.
    assert code == (3 if workers == 0 else 0), service.output
    assert service.ledgers() == [ledger_counts(received=3, failed=3)]
    assert "ERROR redirect_logger.service" in service.output


@pytest.mark.parametrize("mode", ["cli", "hypercorn"])
async def test_a_property_librdkafka_refuses_stops_the_start(tmp_path: Path, mode: str) -> None:
    config = write_config(tmp_path / "c.toml", unreachable_config(kafka={"no.such.property": "1"}))
    service = ServiceProcess.cli(config) if mode == "cli" else ServiceProcess.hypercorn(config, 0)
    try:
        code = await trio.to_thread.run_sync(service.wait, 30.0)
    finally:
        service.kill()
    assert code == (2 if mode == "cli" else 1), service.output
    assert "No such configuration property" in service.output
    assert "no.such.property" in service.output
    if mode == "cli":  # Hypercorn binds before it re-raises a failed lifespan startup
        assert "Running on" not in service.output


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
async def test_an_address_in_use_is_named(tmp_path: Path, workers: list[str]) -> None:
    """Exit 1, and the error names the addresses and their keys, not only
    the system's "Address already in use"."""
    port, admin = free_port(), free_port()
    config = write_config(
        tmp_path / "c.toml",
        unreachable_config(
            server={"bind": [f"127.0.0.1:{port}"], "admin_bind": [f"127.0.0.1:{admin}"]}
        ),
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", admin))
        taken.listen()
        service = ServiceProcess.cli(config, *workers)
        try:
            code = await trio.to_thread.run_sync(service.wait, 30.0)
        finally:
            service.kill()
    assert code == 1, service.output
    expected = (
        f"error: cannot listen on 127.0.0.1:{port} 127.0.0.1:{admin} "
        "(server.bind, server.admin_bind): [Errno 98] Address already in use"
    )
    assert expected in service.output


async def test_serve_refuses_an_invalid_bind(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", unreachable_config())
    service = ServiceProcess.cli(config, "--bind", "127.0.0.1:http")
    try:
        code = await trio.to_thread.run_sync(service.wait, 30.0)
    finally:
        service.kill()
    assert code == 2
    assert "server.bind: '127.0.0.1:http' is not HOST:PORT" in service.output


async def test_hypercorn_single_process_takes_a_second_sigterm_calmly(
    broker: Broker, tmp_path: Path
) -> None:
    topic = unique_topic()
    config = write_config(tmp_path / "c.toml", service_config(broker.bootstrap, topic))
    service = ServiceProcess.hypercorn(config, 0)
    try:
        url = await trio.to_thread.run_sync(service.url)
        async with httpx.AsyncClient(base_url=url) as client:
            statuses = [(await client.get("/")).status_code for _ in range(20)]
        service.process.send_signal(signal.SIGTERM)
        await trio.sleep(0.05)
        service.process.send_signal(signal.SIGTERM)
        code = await trio.to_thread.run_sync(service.wait)
    finally:
        service.kill()
    assert statuses == [302] * 20
    assert code == 0, service.output
    assert "Traceback" not in service.output
    assert service.ledgers() == [ledger_counts(received=20, delivered=20)]


async def test_hypercorn_admin_bind(broker: Broker, tmp_path: Path) -> None:
    main, admin = free_port(), free_port()
    config = service_config(
        broker.bootstrap, unique_topic(), server={"admin_bind": [f"127.0.0.1:{admin}"]}
    )
    service = ServiceProcess.hypercorn(
        write_config(tmp_path / "c.toml", config),
        1,
        binds=(f"127.0.0.1:{main}", f"127.0.0.1:{admin}"),
    )
    try:
        await trio.to_thread.run_sync(lambda: service.wait_for(BIND_RE, 2, 60))
        async with httpx.AsyncClient() as client:
            metrics = await client.get(f"http://127.0.0.1:{admin}/metrics")
            public = await client.get(f"http://127.0.0.1:{main}/metrics")
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert metrics.status_code == 200 and "redirect_logger_records_total" in metrics.text
    assert public.status_code == 404 and "x-hit-id" in public.headers
    assert code == 0, service.output
    assert service.ledgers() == [ledger_counts(received=1, delivered=1)]


async def _load_home(url: str, done: trio.Event, locations: dict[str, str]) -> None:
    """One client asking for "/" in a loop until ``done``; each answer's id and Location."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        n = 0
        while not done.is_set():
            n += 1
            try:
                response = await client.get(f"/?n={n}")
            except httpx.TransportError:  # a worker closing its connections: ask again
                continue
            assert response.status_code == 302, response.text
            locations[response.headers["x-hit-id"]] = response.headers["location"]


async def _answered_by(locations: dict[str, str], host: str, count: int = 60) -> None:
    """Until ``count`` answers point at ``host`` (bounded: a busy machine
    starts the service and its reloads slower, not never)."""

    def answered() -> int:
        return sum(location.split("/")[2] == host for location in list(locations.values()))

    with trio.fail_after(60):
        while answered() < count:  # noqa: ASYNC110 (the clients fill a dict: no event)
            await trio.sleep(0.1)


def _retarget_home(path: Path, base: dict[str, Any], service: ServiceProcess) -> None:
    """Point the "home" rule at example.org in the config file, then SIGHUP."""
    changed = [dict(rule) for rule in base["rules"]]
    changed[0]["target"] = "https://example.org/"
    write_config(path, {**base, "rules": changed})
    service.process.send_signal(signal.SIGHUP)


def _check_reload_delivery(
    broker: Broker, topic: str, ledgers: list[dict[str, int]], locations: dict[str, str]
) -> None:
    """Both rule sets answered; each answered hit is in the topic once, as answered."""
    hosts = [location.split("/")[2] for location in locations.values()]
    assert hosts.count("example.com") > 50 and hosts.count("example.org") > 50
    delivered = sum(ledger["delivered"] for ledger in ledgers)
    assert all(ledger["received"] == ledger["delivered"] for ledger in ledgers), ledgers
    records = read_topic(broker.bootstrap, topic, expected=delivered)
    by_id = {record["id"]: record["location"] for record in records}
    assert len(by_id) == len(records) == delivered
    assert all(by_id[hit_id] == location for hit_id, location in locations.items())


async def test_hypercorn_sighup_restarts_the_workers_on_the_new_rules_losing_nothing(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """Hypercorn's master answers SIGHUP by stopping its workers (each drains)
    and starting new ones, which read the config file again."""
    topic = unique_topic()
    base = service_config(kafka_broker.bootstrap, topic)
    path = write_config(tmp_path / "c.toml", base)
    service = ServiceProcess.hypercorn(path, 1)
    locations: dict[str, str] = {}
    try:
        [url] = await trio.to_thread.run_sync(lambda: service.wait_for(BIND_RE, 1, 60))
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(SIGNAL_CLIENTS):
                nursery.start_soon(_load_home, url, done, locations)
            await _answered_by(locations, "example.com")
            _retarget_home(path, base, service)
            await _answered_by(locations, "example.org")
            done.set()
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    ledgers = service.ledgers()
    assert len(ledgers) == 2, service.output  # the first worker, then the second
    await trio.to_thread.run_sync(_check_reload_delivery, kafka_broker, topic, ledgers, locations)


async def test_sighup_reloads_the_rules_under_load_and_keeps_them_when_the_file_is_bad(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """Every request is answered by the old rules or the new ones, never lost;
    every answered hit is delivered once; an invalid file changes nothing."""
    broker = kafka_broker
    topic = unique_topic()
    base = service_config(broker.bootstrap, topic)
    path = write_config(tmp_path / "c.toml", base)
    service = ServiceProcess.cli(path)
    locations: dict[str, str] = {}
    try:
        url = await trio.to_thread.run_sync(service.url)
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            for _ in range(SIGNAL_CLIENTS):
                nursery.start_soon(_load_home, url, done, locations)
            await _answered_by(locations, "example.com")
            _retarget_home(path, base, service)
            await _answered_by(locations, "example.org")
            (tmp_path / "c.toml").write_text("[server]\nbind = 8080\n")  # invalid
            service.process.send_signal(signal.SIGHUP)
            await trio.to_thread.run_sync(
                lambda: service.wait_for(re.compile("reload refused"), timeout=30)
            )
            done.set()
        async with httpx.AsyncClient(base_url=url) as client:
            after = (await client.get("/")).headers["location"]
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    assert after == "https://example.org/"  # the bad file kept the reloaded rules
    assert "rules reloaded: 2 rules" in service.output
    assert "SIGHUP: reload refused, the rules in use stay: " in service.output
    assert "server.bind: Input should be a valid list" in service.output
    [ledger] = service.ledgers()
    assert ledger["received"] == len(locations) + 1
    await trio.to_thread.run_sync(_check_reload_delivery, broker, topic, [ledger], {**locations})


async def test_hypercorn_without_workers_ignores_sighup_instead_of_dying_undrained(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "c.toml", unreachable_config())
    service = ServiceProcess.hypercorn(config, 0)
    try:
        url = await trio.to_thread.run_sync(service.url)
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/")).status_code == 302
            service.process.send_signal(signal.SIGHUP)
            await trio.sleep(0.5)
            assert (await client.get("/")).status_code == 302
        code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill()
    assert code == 0, service.output
    assert "SIGHUP ignored: reloading needs hypercorn --workers 1 or more" in service.output
    assert service.ledgers() == [ledger_counts(received=2, spilled=2)]
