"""Many workers, one view: ``serve --workers N`` and ``hypercorn --workers N``.

The supervisor's lifecycle (signals, restarts, exit status) and the group's
``/metrics``, which sums every worker whichever one a scrape reaches.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from brokers import Broker, free_port
from redirect_logger.ledger import SETTLED
from support import (
    ServiceProcess,
    check_delivery,
    read_topic,
    service_config,
    sigterm_under_load,
    topic_ids,
    unique_topic,
    until_loaded,
    write_config,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _config(
    tmp_path: Path, bootstrap: str, topic: str, **tables: Any
) -> tuple[Path, str, str, dict[str, Any]]:
    """A config file with fixed public and admin ports: (path, public URL, admin URL, config)."""
    port, admin = free_port(), free_port()
    server = {"bind": [f"127.0.0.1:{port}"], "admin_bind": [f"127.0.0.1:{admin}"]}
    config = service_config(bootstrap, topic, server=server, **tables)
    path = write_config(tmp_path / "c.toml", config)
    return path, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}", config


def _launch(mode: str, path: Path, public: str, admin: str, workers: int) -> ServiceProcess:
    if mode == "serve":
        return ServiceProcess.cli(path, "--workers", str(workers))
    binds = (public.removeprefix("http://"), admin.removeprefix("http://"))
    return ServiceProcess.hypercorn(path, workers, binds)


def _scrape(admin: str) -> Samples:
    text = httpx.get(f"{admin}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _record(samples: Samples, outcome: str) -> int:
    return int(samples[("redirect_logger_records_total", (("outcome", outcome),))])


def _gauge(samples: Samples, name: str) -> float:
    return samples[(f"redirect_logger_{name}", ())]


def _until_ready(admin: str, workers: int, timeout: float = 60.0) -> None:
    """Until a scrape sums ``workers`` workers and /readyz answers 200 (every
    worker's producer reaches a broker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            samples = _scrape(admin)
            ready = httpx.get(f"{admin}/readyz", timeout=5).status_code == 200
        except httpx.TransportError:
            samples, ready = {}, False
        if samples and _gauge(samples, "workers") == workers and ready:
            return
        time.sleep(0.2)
    raise AssertionError(f"{workers} ready workers not seen within {timeout} s")


def _hits(public: str, paths: list[str]) -> list[tuple[int, str]]:
    """One request per path, each on a new connection (so that they spread
    over the workers): (status, X-Hit-Id) each."""
    answers = []
    for path in paths:
        response = httpx.get(f"{public}{path}", headers={"connection": "close"}, timeout=10)
        answers.append((response.status_code, response.headers["x-hit-id"]))
    return answers


@pytest.mark.parametrize("mode", ["serve", "hypercorn"])
def test_every_scrape_shows_the_whole_group(broker: Broker, tmp_path: Path, mode: str) -> None:
    """Two workers; 90 hits spread over them; every scrape, whichever worker
    answers it, counts all 90, by outcome and by rule, and the identity holds."""
    topic = unique_topic()
    path, public, admin, _ = _config(tmp_path, broker.bootstrap, topic)
    service = _launch(mode, path, public, admin, 2)
    try:
        _until_ready(admin, 2)
        paths = [f"/docs/{n}" if n % 3 else "/" if n % 2 else "/nowhere" for n in range(90)]
        answers = _hits(public, paths)
        statuses = Counter(status for status, _ in answers)
        assert statuses == {301: 60, 302: 15, 404: 15}
        read_topic(broker.bootstrap, topic, expected=90)
        deadline = time.monotonic() + 30
        while _record(_scrape(admin), "delivered") < 90 and time.monotonic() < deadline:
            time.sleep(0.2)
        for _ in range(10):  # each on a new connection: any worker may answer
            samples = _scrape(admin)
            assert _gauge(samples, "workers") == 2
            assert _record(samples, "received") == 90
            assert _record(samples, "delivered") == 90
            assert _gauge(samples, "in_flight") == 0
            assert _record(samples, "received") == sum(
                _record(samples, outcome) for outcome in SETTLED
            ) + _gauge(samples, "in_flight")
            by_rule = {
                labels: value
                for (name, labels), value in samples.items()
                if name == "redirect_logger_hits_total"
            }
            assert by_rule == {
                (("rule", "docs"), ("status", "301")): 60,
                (("rule", "home"), ("status", "302")): 15,
                (("rule", "(fallback)"), ("status", "404")): 15,
            }
            assert _gauge(samples, "ready") == _gauge(samples, "broker_reachable") == 2
            assert _gauge(samples, "queue_capacity") == 2 * 10_000
        code = service.terminate()
    finally:
        service.kill_group()
    assert code == 0, service.output
    ledgers = service.ledgers()
    assert len(ledgers) == 2, service.output
    assert all(ledger["received"] > 0 for ledger in ledgers), ledgers  # both took hits
    assert sum(ledger["received"] for ledger in ledgers) == 90


@pytest.mark.parametrize(("signum", "group"), [(signal.SIGTERM, False), (signal.SIGINT, True)])
async def test_serve_workers_sigterm_under_load_delivers_every_answered_hit(
    kafka_broker: Broker, tmp_path: Path, signum: int, group: bool
) -> None:
    """SIGTERM to the supervisor, or SIGINT to the whole process group (a
    terminal's Ctrl+C), under load: every worker drains once, exit 0, and
    every answered hit is in Kafka once."""
    topic = unique_topic()
    path, public, admin, _ = _config(tmp_path, kafka_broker.bootstrap, topic)
    service = ServiceProcess.cli(path, "--workers", "2")
    try:
        await trio.to_thread.run_sync(_until_ready, admin, 2)
        code, answered = await sigterm_under_load(service, [public], signum, group)
    finally:
        service.kill_group()
    assert code == 0, service.output
    assert "group exit code 0: workers' last exit codes [0, 0]" in service.output
    assert "again" not in service.output  # each worker got one stop signal
    await trio.to_thread.run_sync(check_delivery, kafka_broker, topic, service, answered, 2)


def _new_worker(service: ServiceProcess, old: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = service.workers()
        if len(now) == len(old) and now != old:
            return now
        time.sleep(0.1)
    raise AssertionError(f"no worker replaced {old}; output:\n{service.output}")


@pytest.mark.faults
async def test_a_killed_worker_is_replaced_and_its_journal_replayed(
    kafka_broker: Broker, tmp_path: Path
) -> None:
    """Under ``records.durability = "journal"``, SIGKILL one of two workers under
    load: a new worker takes its place, the group replays its journal slot, and
    every answered hit (before and after the kill) reaches Kafka. The group's
    exit status stays 0: the journal held what the dead worker answered."""
    topic = unique_topic()
    spill = tmp_path / "spill"
    path, public, admin, _ = _config(
        tmp_path,
        kafka_broker.bootstrap,
        topic,
        records={"durability": "journal", "queue_size": 2000},
        kafka={"linger.ms": 200},
        spill={"directory": str(spill)},
    )
    service = ServiceProcess.cli(path, "--workers", "2")
    answered: dict[str, int] = {}
    try:
        await trio.to_thread.run_sync(_until_ready, admin, 2)
        workers = service.workers()
        assert len(workers) == 2
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_keep_loading, public, answered, 6.0)
                await trio.sleep(2.0)
                await until_loaded(lambda: len(answered))
                before = len(answered)
                os.kill(workers[0], signal.SIGKILL)
                replaced = await trio.to_thread.run_sync(_new_worker, service, workers)
            assert workers[1] in replaced
            await trio.to_thread.run_sync(_until_ready, admin, 2)
            bootstrap = kafka_broker.bootstrap
            ids = await trio.to_thread.run_sync(topic_ids, bootstrap, topic, set(answered))
            code = await trio.to_thread.run_sync(service.terminate)
    finally:
        service.kill_group()
    missing = set(answered) - set(ids)
    print(
        f"answered {len(answered)} ({before} before the kill); in topic {len(ids)},"
        f" {len(ids) - len(set(ids))} duplicates"
    )
    assert not missing, f"{len(missing)} answered hits missing"
    assert code == 0, service.output
    assert "worker 0 (pid" in service.output and "died: killed by SIGKILL" in service.output
    assert "group exit code 0" in service.output
    assert not list(spill.glob("slot-*/segment-*.log")), "journal not emptied"


async def _keep_loading(url: str, answered: dict[str, int], seconds: float) -> None:
    """Four keep-alive clients for ``seconds``; a connection a killed worker
    held is opened again. Only 301 answers are expected."""

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            n = 0
            while trio.current_time() < end:
                n += 1
                try:
                    response = await http.get(f"/docs/p{n}")
                except httpx.TransportError:
                    continue  # its worker was killed: the request was not answered
                assert response.status_code == 301, response.text
                answered[response.headers["x-hit-id"]] = n

    end = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(client)


class Group(NamedTuple):
    service: ServiceProcess
    path: Path
    public: str
    admin: str
    config: dict[str, Any]


@pytest.fixture
def group(kafka_broker: Broker, tmp_path: Path) -> Iterator[Group]:
    """``serve --workers 2`` on a config of its own, both workers ready; on
    Apache Kafka, since the fault tests among its users count deliveries."""
    path, public, admin, config = _config(tmp_path, kafka_broker.bootstrap, unique_topic())
    service = ServiceProcess.cli(path, "--workers", "2")
    try:
        _until_ready(admin, 2)
        yield Group(service, path, public, admin, config)
    finally:
        service.kill_group()


@pytest.mark.faults
def test_a_worker_killed_under_memory_durability_fails_the_exit_status(group: Group) -> None:
    """Under ``memory`` a killed worker's records in memory are gone: the
    worker is replaced, and the group exits 3 however clean the rest is."""
    service = group.service
    workers = service.workers()
    os.kill(workers[1], signal.SIGKILL)
    _new_worker(service, workers)
    _until_ready(group.admin, 2)
    assert _hits(group.public, ["/"])[0][0] == 302
    code = service.terminate()
    assert code == 3, service.output
    assert 'under records.durability = "memory" its records in memory are lost' in service.output
    assert "group exit code 3: workers' last exit codes [0, 0], 1 died" in service.output


def test_sighup_reloads_the_rules_in_every_worker(group: Group) -> None:
    service = group.service
    workers = service.workers()
    group.config["rules"][0]["target"] = "https://example.org/new"
    write_config(group.path, group.config)
    service.process.send_signal(signal.SIGHUP)
    service.wait_for(re.compile("rules reloaded"), count=2)
    locations = {
        httpx.get(group.public, headers={"connection": "close"}).headers["location"]
        for _ in range(40)
    }
    assert locations == {"https://example.org/new"}
    assert service.workers() == workers  # reloaded, not restarted
    assert service.terminate() == 0, service.output


def test_a_config_librdkafka_refuses_stops_the_group(tmp_path: Path) -> None:
    """Every worker exits 2 at start: the supervisor stops, exit 2, no restart loop."""
    path, _, _, _ = _config(
        tmp_path, "127.0.0.1:9", unique_topic(), kafka={"no.such.property": "1"}
    )
    service = ServiceProcess.cli(path, "--workers", "2")
    try:
        code = service.wait(60)
    finally:
        service.kill_group()
    assert code == 2, service.output
    assert "the config cannot be used; stopping every worker" in service.output
    assert "starting it again" not in service.output


@pytest.mark.faults
def test_workers_drain_and_exit_when_the_supervisor_dies(group: Group) -> None:
    service = group.service
    workers = service.workers()
    _hits(group.public, ["/"] * 10)
    service.kill_leader()  # the supervisor only
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(0.2)
    service._reader.join(10)
    assert service.output.count("is gone: draining and stopping") == 2, service.output
    ledgers = service.ledgers()
    assert len(ledgers) == 2
    assert sum(ledger["delivered"] for ledger in ledgers) == 10


def test_workers_is_a_positive_number(tmp_path: Path) -> None:
    path, _, _, _ = _config(tmp_path, "127.0.0.1:9", unique_topic())
    service = ServiceProcess.cli(path, "--workers", "0")
    assert service.wait(30) == 2
    assert "--workers: 0 is not between 1 and 256" in service.output
