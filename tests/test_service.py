"""The whole service in-process (CLI lifecycle) against a real broker."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import orjson
import pytest
import trio
from confluent_kafka import KafkaError

from brokers import Broker
from redirect_logger.service import Service
from redirect_logger.spill import read_segment
from support import (
    RFC3339_MS,
    UUID7,
    check_record_schema,
    ledger_counts,
    read_messages,
    read_topic,
    service_config,
    start_service,
    unique_topic,
    unreachable_config,
)

# User-Agents sent, and whether a GET with each is a bot hit (a HEAD always is)
AGENT_IS_BOT = {
    "ua/1": False,
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)": True,
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1_1 like Mac OS X) AppleWebKit/605.1.15"
    " (KHTML, like Gecko) Version/18.1.1 Mobile/15E148 Safari/604.1": False,
}


async def test_every_answered_hit_is_delivered_once_with_its_fields(broker: Broker) -> None:
    topic = unique_topic()
    stop = trio.Event()
    # id -> (method, target, status, location, user agent)
    sent: dict[str, tuple[str, str, int, str | None, str]] = {}
    agents = list(AGENT_IS_BOT)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(
                nursery, service_config(broker.bootstrap, topic), stop
            )
            base = service.binds[0]
            requests = [("GET", "/?utm_source=mail&x=1")] * 100
            requests += [("GET", "/docs/guide/intro?q=%0D%0A")] * 100
            requests += [("HEAD", "/docs")] * 50 + [("GET", "/missing")] * 50
            limits = httpx.Limits(max_connections=16)
            async with httpx.AsyncClient(base_url=base, limits=limits) as client:

                async def send(method: str, target: str, agent: str) -> None:
                    response = await client.request(
                        method,
                        target,
                        headers={"user-agent": agent, "referer": "https://ref.example/"},
                    )
                    hit_id = response.headers["x-hit-id"]
                    assert hit_id not in sent
                    if method == "HEAD":
                        assert response.content == b""
                    sent[hit_id] = (
                        method,
                        target,
                        response.status_code,
                        response.headers.get("location"),
                        agent,
                    )

                async with trio.open_nursery() as clients:
                    for n, (method, target) in enumerate(requests):
                        clients.start_soon(send, method, target, agents[n % len(agents)])
            stop.set()
    assert codes == [0]
    assert len(sent) == 300
    statuses = sorted(
        {(target, status, location) for _, target, status, location, _ in sent.values()}
    )
    assert statuses == [
        ("/?utm_source=mail&x=1", 302, "https://example.com/?utm_source=mail&x=1"),
        ("/docs", 301, "https://docs.example.com/"),
        ("/docs/guide/intro?q=%0D%0A", 301, "https://docs.example.com/guide/intro?q=%0D%0A"),
        ("/missing", 404, None),
    ]
    assert service.ledger_snapshot() == ledger_counts(received=300, delivered=300)

    messages = await trio.to_thread.run_sync(read_messages, broker.bootstrap, topic)
    records = [message.record for message in messages]
    ids = [record["id"] for record in records]
    assert len(ids) == len(set(ids)) == 300
    assert set(ids) == set(sent)
    assert Counter(tuple(message.headers) for message in messages) == {
        (("schema-version", b"3"), ("kind", b"redirect"), ("rule", b"home")): 100,
        (("schema-version", b"3"), ("kind", b"redirect"), ("rule", b"docs")): 150,
        (("schema-version", b"3"), ("kind", b"miss"), ("rule", b"")): 50,
    }
    rule_of = {"/": "home", "/docs": "docs", "/missing": None}
    for message in messages:
        record = message.record
        rule = rule_of.get(record["path"], "docs")
        assert message.headers == [
            ("schema-version", b"3"),
            ("kind", record["kind"].encode()),
            ("rule", b"" if rule is None else rule.encode()),
        ]
        method, target, status, location, agent = sent[record["id"]]
        path, _, query = target.partition("?")
        assert UUID7.match(record["id"])
        assert record["v"] == 3
        assert (record["method"], record["scheme"], record["path"], record["query"]) == (
            method,
            "http",
            path,
            query,
        )
        assert (record["status"], record["location"]) == (status, location)
        assert record["rule"] == rule_of.get(path, "docs")
        assert record["host"] == base.removeprefix("http://")
        assert record["client_ip"] == "127.0.0.1"
        assert re.match(r"^127\.0\.0\.1:\d+$", record["remote_address"])
        assert (record["user_agent"], record["referer"]) == (agent, "https://ref.example/")
        assert record["bot"] is (method == "HEAD" or AGENT_IS_BOT[agent])
        assert RFC3339_MS.match(record["ts"]) and RFC3339_MS.match(record["logged_at"])
        assert record["logged_at"] >= record["ts"]
        assert record["instance"] == service.enricher.instance
        assert datetime.fromisoformat(record["ts"]).year >= 2024
        assert record["kind"] == ("miss" if status == 404 else "redirect")
        check_record_schema(record)
    # 250 GETs and 50 HEADs, the agents in turn: 84 GETs as Googlebot, and every HEAD
    assert sum(record["bot"] for record in records) == 84 + 50


async def test_admin_endpoints_and_readiness(broker: Broker) -> None:
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(
                nursery, service_config(broker.bootstrap, unique_topic()), stop
            )
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                assert (await client.get("/healthz")).status_code == 200
                with trio.fail_after(10):  # librdkafka reports broker state every second
                    while (await client.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                        await trio.sleep(0.1)
                await client.get("/docs/x")
                metrics = (await client.get("/metrics")).text
                assert 'redirect_logger_records_total{outcome="received"} 1.0' in metrics
                assert "redirect_logger_queue_capacity 10000.0" in metrics
                assert "redirect_logger_ready 1.0" in metrics
                assert "x-hit-id" not in (await client.get("/healthz")).headers
                service.draining = True
                for path in ("/readyz", "/readyz?exclude=kafka"):
                    ready = await client.get(path)
                    assert (ready.status_code, ready.text) == (503, "not ready: draining\n")
            stop.set()
    assert codes == [0]


async def _hits_while_unreachable(config: dict[str, Any]) -> tuple[Service, list[int], set[str]]:
    stop = trio.Event()
    ids: set[str] = set()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                for _ in range(20):
                    response = await client.get("/?a=1")
                    assert response.status_code == 302
                    ids.add(response.headers["x-hit-id"])
                ready = await client.get("/readyz")
                assert (ready.status_code, ready.text) == (
                    503,
                    "not ready: no Kafka broker reachable\n",
                )
                traffic = await client.get("/readyz?exclude=kafka")  # hits are journaled
                assert (traffic.status_code, traffic.text) == (200, "ready\n")
            stop.set()
    return service, codes, ids


async def test_unreachable_kafka_still_redirects_and_journals_every_record() -> None:
    service, codes, ids = await _hits_while_unreachable(unreachable_config())
    assert codes == [0]
    assert service.ledger_snapshot() == ledger_counts(received=20, spilled=20)
    journal = service.spill.journal
    assert journal is not None
    journaled = [r for path in journal.seal() for r in read_segment(path).records]
    assert {orjson.loads(r.value)["id"] for r in journaled} == ids
    assert len(journaled) == 20
    home = [("schema-version", b"3"), ("kind", b"redirect"), ("rule", b"home")]
    assert [r.headers for r in journaled] == [home] * 20


async def test_unreachable_kafka_without_a_journal_exits_3_reporting_the_loss() -> None:
    config = unreachable_config(
        spill={"enabled": False},
        records={"outage_tolerance": 60.0},
        kafka={"message.timeout.ms": 60000},
    )
    service, codes, _ = await _hits_while_unreachable(config)
    assert codes == [3]
    assert service.ledger_snapshot() == ledger_counts(received=20, failed=20)


async def test_readiness_turns_false_shutdown_delay_before_the_listeners_close(
    broker: Broker,
) -> None:
    stop = trio.Event()
    config = service_config(broker.bootstrap, unique_topic(), server={"shutdown_delay": 2.0})
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                stop.set()
                await trio.sleep(0.2)
                ready = await client.get("/readyz")
                assert (ready.status_code, ready.text) == (503, "not ready: draining\n")
                assert (await client.get("/")).status_code == 302  # still served meanwhile
    assert codes == [0]
    assert service.ledger_snapshot()["delivered"] == 1


async def test_admin_bind_serves_the_admin_endpoints_alone(broker: Broker) -> None:
    stop = trio.Event()
    config = service_config(
        broker.bootstrap, unique_topic(), server={"admin_bind": ["127.0.0.1:0"]}
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            [main], [admin] = service.binds, service.admin_binds
            async with httpx.AsyncClient(base_url=admin) as client:
                assert (await client.get("/healthz")).text == "ok\n"
                metrics = await client.get("/metrics")
                assert metrics.status_code == 200
                assert "redirect_logger_records_total" in metrics.text
                other = await client.get("/")  # no redirects, no records on the admin port
                assert other.status_code == 404
                assert "x-hit-id" not in other.headers
            async with httpx.AsyncClient(base_url=main) as client:
                hit = await client.get("/metrics")  # an ordinary path on the public port
                assert hit.status_code == 404
                assert "x-hit-id" in hit.headers
                assert (await client.get("/")).status_code == 302
            stop.set()
    assert codes == [0]
    assert service.ledger_snapshot() == ledger_counts(received=2, delivered=2)


async def _until(condition: Callable[[], bool]) -> None:
    """Poll the in-process service's own state (the caller bounds the time)."""
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.1)


@pytest.mark.parametrize("spill", [True, False])
async def test_a_fatal_producer_error_rebuilds_the_producer_and_loses_nothing(
    kafka_broker: Broker, spill: bool
) -> None:
    """librdkafka's fatal errors (e.g. an idempotence sequence gap) cannot be
    provoked from a client, so the error callback is handed one, as librdkafka
    would: readiness turns false, the producer is rebuilt, and what the old one
    held is produced again into the new one, with or without a journal."""
    topic = unique_topic()
    stop = trio.Event()
    ids: list[str] = []
    config = service_config(kafka_broker.bootstrap, topic, spill={"enabled": spill})
    # 400 requests one after another, a rebuild and a replay: about 30 s on a
    # machine at a load average of 25; a record that never settles still fails.
    with trio.fail_after(180):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            sink = service.sink
            assert sink is not None
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                await _until(lambda: service.readiness() is None)
                for n in range(200):
                    ids.append((await client.get(f"/?n={n}")).headers["x-hit-id"])
                sink._on_error(KafkaError(KafkaError._FATAL, "injected", fatal=True))
                # No checkpoint since: the watcher (every 0.2 s) cannot have rebuilt yet.
                assert service.readiness() == "producer failed: injected"
                ready = await client.get("/readyz")
                if sink.rebuilds == 0:  # answered before the rebuild, as on an idle machine
                    assert (ready.status_code, ready.text) == (
                        503,
                        "not ready: producer failed: injected\n",
                    )
                for n in range(200, 400):
                    ids.append((await client.get(f"/?n={n}")).headers["x-hit-id"])
                await _until(lambda: service.readiness() is None)
            ledger = service.ledger
            await _until(lambda: ledger.replayed == ledger.spilled and not service.in_flight())
            stop.set()
    messages = await trio.to_thread.run_sync(
        lambda: read_messages(kafka_broker.bootstrap, topic, expected=400)
    )
    assert codes == [0]
    assert sink.rebuilds == 1
    assert set(ids) <= {message.record["id"] for message in messages}  # at least once
    home = [("schema-version", b"3"), ("kind", b"redirect"), ("rule", b"home")]
    assert all(message.headers == home for message in messages)  # carried ones too
    ledger = service.ledger_snapshot()
    assert (ledger["received"], ledger["failed"], ledger["in_flight"]) == (400, 0, 0)
    assert ledger["delivered"] + ledger["spilled"] == 400
    assert ledger["replayed"] == ledger["spilled"]
    if not spill:
        assert ledger["delivered"] == 400


async def test_a_rule_with_its_own_topic_sends_its_records_there(broker: Broker) -> None:
    main, campaign = unique_topic(), unique_topic("campaign")
    config = service_config(broker.bootstrap, main)
    config["rules"][1]["topic"] = campaign  # "docs"
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                docs = [(await client.get(f"/docs/p{n}")).headers["x-hit-id"] for n in range(3)]
                home = [(await client.get(f"/?n={n}")).headers["x-hit-id"] for n in range(2)]
                missing = (await client.get("/missing")).headers["x-hit-id"]
            stop.set()
    assert codes == [0]
    in_campaign = await trio.to_thread.run_sync(
        lambda: read_topic(broker.bootstrap, campaign, expected=3)
    )
    in_main = await trio.to_thread.run_sync(lambda: read_topic(broker.bootstrap, main, expected=3))
    assert sorted(r["id"] for r in in_campaign) == sorted(docs)
    assert sorted(r["id"] for r in in_main) == sorted([*home, missing])


async def test_host_rules_answer_by_the_host_header_and_record_the_rule(broker: Broker) -> None:
    topic = unique_topic()
    config = service_config(broker.bootstrap, topic)
    config["rules"] += [
        {"name": "go", "host": "go.example.com", "path": "/p", "target": "https://go.test/"},
        {"name": "sub", "host": "*.example.com", "path": "/p", "target": "https://sub.test/"},
        {
            "name": "promo",
            "path": "/Promo",
            "target": "https://promo.test/",
            "case_insensitive": True,
            "trailing_slash": True,
        },
    ]
    requests = [
        ("GO.example.com:8080", "/p", "go", "https://go.test/"),
        ("a.b.example.com", "/p", "sub", "https://sub.test/"),
        ("example.com", "/p", None, None),  # the apex: no host rule, no any-host rule
        ("a.example.com", "/promo/", "promo", "https://promo.test/"),
        ("a.example.com", "/", "home", "https://example.com/"),
    ]
    stop = trio.Event()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, codes = await start_service(nursery, config, stop)
            answered = []
            async with httpx.AsyncClient(base_url=service.binds[0]) as client:
                for host, path, _, _ in requests:
                    response = await client.get(path, headers={"host": host})
                    answered.append(
                        (response.headers["x-hit-id"], response.headers.get("location"))
                    )
            stop.set()
    assert codes == [0]
    assert [location for _, location in answered] == [location for *_, location in requests]
    records = await trio.to_thread.run_sync(
        lambda: read_topic(broker.bootstrap, topic, expected=len(requests))
    )
    by_id = {record["id"]: record for record in records}
    assert [
        (by_id[hit_id]["host"], by_id[hit_id]["path"], by_id[hit_id]["rule"])
        for hit_id, _ in answered
    ] == [(host, path, rule) for host, path, rule, _ in requests]
    for record in records:
        check_record_schema(record)
